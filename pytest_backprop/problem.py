"""Compatibility name of :mod:`pytest_backprop.problems` (``from pytest_backprop.problem import problem_from_batch``)."""

from .problems import Problem, build_problem, problem_from_batch, resolve_words  # noqa: F401

__all__ = ["Problem", "build_problem", "problem_from_batch", "resolve_words"]
