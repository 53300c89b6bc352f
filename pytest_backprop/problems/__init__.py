"""Problems: a forward pass written once, and what derives from it (line table, autograd truth,
tolerances, noise floor). The lecture's MLP is the default problem; any other is loaded with
:func:`load_spec` from a file or module that defines ``SIZES``, ``make_inputs`` and ``forward``.

Example::

    from pytest_backprop.problems import build_problem, load_spec, problem_from_spec, resolve_words
    p = build_problem(resolve_words(None))
    p.grads["logits"].shape   # (32, 27)
    q = problem_from_spec(load_spec("examples/problems/two_layer_relu.py"))
    q.spec.order[:3]          # ('logp', 'esum', 'e')
"""

from __future__ import annotations

import importlib
from typing import Any

#: Imported on first use, so that a torch-free module of this layer (``device``, ``rule``) costs no torch import.
_LAZY = {"Problem": "instance", "build_problem": "instance", "problem_from_batch": "instance",
         "problem_from_inputs": "instance", "problem_from_spec": "instance", "resolve_words": "instance",
         "ProblemError": "errors", "ProblemSpec": "spec", "load_spec": "spec"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
