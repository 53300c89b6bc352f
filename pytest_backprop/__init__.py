"""pytest-backprop: a pytest plugin and test kit for hand-written backward passes in PyTorch.

The public helpers are imported lazily, so that loading the plugin never imports torch::

    from pytest_backprop import assert_grad_matches, cmp, check_backward

In a notebook, ``%load_ext pytest_backprop`` registers the ``%backprop`` and ``%%backprop`` magics.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "assert_grad_matches": "pytest_backprop.judge.asserts",
    "cmp": "pytest_backprop.judge.asserts",
    "Verdict": "pytest_backprop.verdict",
    "Diagnosis": "pytest_backprop.verdict",
    "check_backward": "pytest_backprop.judge.custom",
    "CheckFailure": "pytest_backprop.judge.custom",
    "Problem": "pytest_backprop.problems.instance",
    "problem_from_batch": "pytest_backprop.problems.instance",
    "build_problem": "pytest_backprop.problems.instance",
    "load_implementation": "pytest_backprop.usercode.loaders",
    "case_problem": "pytest_backprop.properties.checks",
    "whole_backward": "pytest_backprop.properties.checks",
    "sgd_check": "pytest_backprop.checks.exercise4",
}

__all__ = sorted(_LAZY) + ["__version__", "load_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext pytest_backprop`` in IPython, Jupyter or Colab: registers the ``%backprop`` line magic
    (check everything answered so far) and the ``%%backprop`` cell magic (run the cell, check its
    gradients). See docs/notebooks-magic.md.

    Example::

        %load_ext pytest_backprop
    """
    from .magics import load_ipython_extension as load

    load(ipython)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_backprop' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
