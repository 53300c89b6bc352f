"""The tolerance rule: a gradient is right when it is no worse than K times PyTorch itself.

For each of the kit's tensors the truth is autograd in float64 on the same parameters, and the
allowed error is derived from how far PyTorch's own float32 autograd is from that truth::

    atol = (K * max|t32 - t64| + FLOOR * eps32 * max|t64|) * eps(dtype) / eps32

with K = 10 and FLOOR = 16. The first term lets through the float32 rounding that any correct
derivation makes (fused multiply-adds, a different summation order: maxdiff 5e-10..7e-9 in the
lecture's network); the floor keeps a tensor whose float32 gradient happens to be exact (dlogprobs)
from having a zero tolerance. A correct ``db1`` (truth 0, autograd noise ~3e-9) gets atol ~6e-8;
real mistakes are orders of magnitude larger (1/n for 1/(n-1): 7.8e-6).

Tensors that are not the kit's (plain tensors passed to :func:`~pytest_backprop.assert_grad_matches`)
fall back to ``torch.testing.assert_close``'s default rtol for their dtype, with an atol of that
rtol times the tensor's largest magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

K = 10
FLOOR = 16
RULE = f"no worse than {K}x PyTorch's own float32 error vs a float64 truth (floor {FLOOR} eps x max|grad|)"
_TRUTH_ATTR = "_backprop_truth"


@dataclass(frozen=True)
class Tolerance:
    """Allowed absolute and relative error for one tensor, and where they came from."""

    atol: float
    rtol: float = 0.0
    origin: str = "rule"


@dataclass(frozen=True)
class Reference:
    """What a kit tensor carries so that any check of it uses the rule: float64 truth and tolerance."""

    truth64: torch.Tensor
    tolerance: Tolerance


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps


def derive(t32: torch.Tensor, t64: torch.Tensor, dtype: torch.dtype = torch.float32) -> Tolerance:
    """The rule's tolerance for one tensor from its float32 and float64 autograd gradients.

    Example::

        tol = derive(truth32.grads["b1"], truth64.grads["b1"])
        tol.atol   # ~6e-8
    """
    f32 = torch.finfo(torch.float32).eps
    torch_error = float((t32.double() - t64.double()).abs().max()) if t64.numel() else 0.0
    scale = float(t64.abs().max()) if t64.numel() else 0.0
    atol = (K * torch_error + FLOOR * f32 * scale) * (_eps(dtype) / f32)
    return Tolerance(atol=max(atol, torch.finfo(dtype).tiny), origin="rule")


def fallback(expected: torch.Tensor) -> Tolerance:
    """Tolerance for a tensor the kit knows nothing about: assert_close's rtol, scaled atol."""
    rtol = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-7}.get(expected.dtype, 1.3e-6)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return Tolerance(atol=max(rtol * scale, torch.finfo(torch.float32).tiny), rtol=rtol, origin="assert_close default")


def attach(tensor: torch.Tensor, reference: Reference) -> torch.Tensor:
    """Mark a kit tensor with its float64 truth and tolerance (used by assert_grad_matches)."""
    setattr(tensor, _TRUTH_ATTR, reference)
    return tensor


def reference_of(tensor: torch.Tensor) -> Reference | None:
    """The :class:`Reference` attached to a kit tensor, or None."""
    return getattr(tensor, _TRUTH_ATTR, None)
