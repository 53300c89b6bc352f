"""Problems: a forward pass written once, and what derives from it (line table, autograd truth,
tolerances, noise floor). The lecture's MLP is the default problem.

Example::

    from pytest_backprop.problems import build_problem, resolve_words
    p = build_problem(resolve_words(None))
    p.grads["logits"].shape   # (32, 27)
"""

from .instance import Problem, build_problem, problem_from_batch, resolve_words

__all__ = ["Problem", "build_problem", "problem_from_batch", "resolve_words"]
