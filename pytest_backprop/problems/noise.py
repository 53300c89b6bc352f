"""The float64 noise floor: how far a correct float64 derivation may be from autograd.

The tolerance rule (:mod:`pytest_backprop.problems.tolerance`) scales PyTorch's own float32 error down to
float64. That error can be luckily tiny where a true gradient is a cancellation (db1 is exactly 0;
at n = 2 everything below batchnorm nearly is), while a correct derivation is a few ulps of the
*terms* that cancel away. So in float64 every tolerance is widened to the larger of the rule's times
:data:`FLOAT64_SLACK` and :func:`noise_floor`. Real mistakes are off by a sizable fraction of those
terms, far above either.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from reference_model.model import LINES, Line, run_line

#: Factor on the rule's float64 tolerance, and ulps per term of the noise floor.
FLOAT64_SLACK = 1024
EPS64 = torch.finfo(torch.float64).eps
DTYPE = torch.float64

#: Lines whose Jacobian entries are signed input values (products, squares): |J| needs |inputs|.
_ABS_INPUT_LINES = frozenset({"hprebn", "bndiff2", "bnraw", "hpreact", "logits", "probs"})


def _abs_vjp(line: Line, values: Mapping[str, Any], level: torch.Tensor) -> dict[str, torch.Tensor]:
    """``|J|^T level`` for one line (``level`` >= 0): the VJP with |inputs| where the Jacobian's entries
    are input values, then abs. Exact for every line of the table (products, sums, elementwise maps)."""
    absolute = line.output in _ABS_INPUT_LINES
    namespace: dict[str, Any] = {k: values[k] for k in line.constants}
    leaves = {k: (values[k].detach().abs() if absolute else values[k].detach()).clone().requires_grad_(True)
              for k in line.inputs}
    namespace.update(leaves)
    with torch.enable_grad():
        out = run_line(line, namespace)
        # a scalar objective: autograd.grad without grad_outputs (that path imports sympy, ~0.3 s)
        parts = torch.autograd.grad((out * level).sum(), list(leaves.values()), allow_unused=True)
    return {k: (p.abs() if p is not None else torch.zeros_like(leaves[k])) for k, p in zip(leaves, parts)}


def noise_floor(values: Mapping[str, Any], grads: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How far a correct float64 derivation may be from autograd, per gradient.

    Rounding error analysis of backprop, with ``FLOAT64_SLACK`` ulps per term: each tensor's
    gradient carries ``FLOAT64_SLACK * eps64 * |gradient|`` plus the error its consumers pass on;
    both go back through each line's absolute Jacobian (``|J|^T``, so nothing cancels). The floor
    of a gradient is its largest element. Where a true gradient is a cancellation (db1 is exactly
    0; at n=2 everything below batchnorm is nearly 0) the floor is the size of the terms that
    cancel, not the noise-sized result.

    Example::

        floor = noise_floor(problem.truth64.values, problem.truth64.grads)
        floor["b1"]   # ~1e-13 x sum|dhprebn|, although db1 is 0
    """
    unit = FLOAT64_SLACK * EPS64
    noise: dict[str, torch.Tensor] = {"loss": torch.full((), unit, dtype=DTYPE)}
    for line in reversed(LINES):
        out = line.output
        level = noise.get(out, torch.zeros((), dtype=DTYPE))
        if out in grads:
            level = level + unit * grads[out].abs().to(DTYPE)
        for name, part in _abs_vjp(line, values, level.to(values[out].dtype)).items():
            noise[name] = part.to(DTYPE) if name not in noise else noise[name] + part.to(DTYPE)
    return {name: _absmax(noise.get(name, torch.zeros(())) + unit * grad.abs().to(DTYPE)) for name, grad in grads.items()}



def _absmax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0
