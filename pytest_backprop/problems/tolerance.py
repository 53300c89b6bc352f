"""The tolerance rule: one rule for every comparison the kit makes, and which part of it decided.

**Where the kit knows the truth in float64** (its own forward: the ``--backprop`` checks, the
``makemore_forward`` fixture, ``cmp`` after the lecture's own forward; or a reference that
:func:`~pytest_backprop.check_backward` re-runs in float64), the truth is that float64 value and
the allowed error is derived from how far PyTorch's own lower-precision autograd is from it
(the *measured rule*)::

    atol = (K * max|t_low - t64| + FLOOR * eps_low * max|t64|) * eps(dtype) / eps_low

with K = 10 and FLOOR = 16; ``t_low`` is the same truth computed in float32 (or in the input's own
low precision). The first term lets through the rounding that any correct derivation makes (fused
multiply-adds, a different summation order: maxdiff 5e-10..7e-9 in the lecture's network); the
floor keeps a tensor whose float32 gradient happens to be exact (dlogprobs) from having a zero
tolerance. A correct ``db1`` (truth 0, autograd noise ~3e-9) gets atol ~6e-8; real mistakes are
orders of magnitude larger (1/n for 1/(n-1): 7.8e-6). In float64 the kit widens it further
(:mod:`pytest_backprop.problems.noise`).

**Where it does not** (plain tensors passed to :func:`~pytest_backprop.assert_grad_matches` or
``cmp``, a measurement that is not possible), it is never stricter than
``torch.testing.assert_close``'s defaults for the dtype (:data:`ASSERT_CLOSE_DEFAULTS`: float32
rtol 1.3e-6 and atol 1e-5, float64 rtol 1e-7 and atol 1e-7, ...): an element passes when
``|actual - expected| <= atol + rtol * |expected|``.

Every failure message names the rule that decided, e.g. ``atol=6.1e-08 (measured rule)`` or
``atol=1e-05, rtol=1.3e-06 (assert_close default for float32)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rule import FLOOR, K, RULE  # noqa: F401 -- the rule's numbers, torch-free for the report header

_TRUTH_ATTR = "_backprop_truth"

#: Origins of a tolerance, as messages print them.
MEASURED = "measured rule"
GIVEN = "given"
EXACT = "exact"


def _assert_close_defaults() -> dict[torch.dtype, tuple[float, float]]:
    return {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
            torch.float64: (1e-7, 1e-7), torch.complex32: (1e-3, 1e-5), torch.complex64: (1.3e-6, 1e-5),
            torch.complex128: (1e-7, 1e-7)}


#: ``torch.testing.assert_close``'s default ``(rtol, atol)`` per dtype; other dtypes compare exactly.
ASSERT_CLOSE_DEFAULTS: dict[torch.dtype, tuple[float, float]] = _assert_close_defaults()


@dataclass(frozen=True)
class Tolerance:
    """Allowed absolute and relative error for one tensor, and the rule that set them.

    Example::

        Tolerance(atol=6.1e-08, origin="measured rule").describe()   # 'atol=6.1e-08 (measured rule)'
    """

    atol: float
    rtol: float = 0.0
    origin: str = MEASURED

    def describe(self) -> str:
        """``atol=1e-05, rtol=1.3e-06 (assert_close default for float32)``: the numbers and the rule."""
        rtol = f", rtol={self.rtol:.2g}" if self.rtol else ""
        return f"atol={self.atol:.2g}{rtol} ({self.origin})"


@dataclass(frozen=True)
class Reference:
    """What a checked tensor carries so that any check of it uses the rule: float64 truth and tolerance.

    ``lecture`` says the tensor belongs to the lecture's network (hints may then speak of n, 1/n,
    Bessel's correction and the lecture's lines); check_backward's references set it to False.
    """

    truth64: torch.Tensor
    tolerance: Tolerance
    lecture: bool = True


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps


def derive(t32: torch.Tensor, t64: torch.Tensor, dtype: torch.dtype = torch.float32, *,
           origin: str = MEASURED) -> Tolerance:
    """The measured rule's tolerance for one tensor from its lower-precision and float64 truths.

    ``t32`` is the truth computed the way PyTorch computes it at low precision (float32 autograd,
    or the input's own dtype); its error against ``t64`` is scaled to ``dtype``'s epsilon.

    Example::

        tol = derive(truth32.grads["b1"], truth64.grads["b1"])
        tol.atol   # ~6e-8
    """
    low = _eps(t32.dtype)
    torch_error = float((t32.double() - t64.double()).abs().max()) if t64.numel() else 0.0
    scale = float(t64.abs().max()) if t64.numel() else 0.0
    atol = (K * torch_error + FLOOR * low * scale) * (_eps(dtype) / low)
    return Tolerance(atol=max(atol, torch.finfo(dtype).tiny if dtype.is_floating_point else 0.0), origin=origin)


def fallback(expected: torch.Tensor, *, why: str = "") -> Tolerance:
    """``torch.testing.assert_close``'s default tolerance for ``expected``'s dtype, labelled as such.

    ``why`` (optional) says why the measured rule could not be used.

    Example::

        fallback(torch.zeros(3))           # atol=1e-05, rtol=1.3e-06 (assert_close default for float32)
    """
    rtol, atol = ASSERT_CLOSE_DEFAULTS.get(expected.dtype, (0.0, 0.0))
    name = str(expected.dtype).replace("torch.", "")
    return Tolerance(atol=atol, rtol=rtol, origin=f"assert_close default for {name}" + (f": {why}" if why else ""))


def measured_or_fallback(t_low: torch.Tensor, t64: torch.Tensor, dtype: torch.dtype, *,
                         origin: str = MEASURED, slack: float = 1.0) -> Tolerance:
    """The measured rule where it measures something, else assert_close's default for ``dtype``.

    Used where the truth comes from re-running a reference in float64 (check_backward): the
    measurement is impossible when the low-precision truth is not finite where the float64 one is
    (overflow) or when both are exactly 0 (nothing to measure a noise from). ``slack`` widens the
    measured value (float64: see :mod:`pytest_backprop.problems.noise`). The kit does not know the
    Function's intermediate values, whose rounding a correct alternative derivation may carry, so
    the measured atol is at least ``FLOOR`` eps of 1.0 (``log(exp(x))`` at x = 1e-66 is 0, not a bug).

    Example::

        measured_or_fallback(ref32_grad, ref64_grad, torch.float32).origin   # 'measured rule'
    """
    low, high = t_low.detach().double(), t64.detach().double()
    both = torch.isfinite(low) & torch.isfinite(high)
    like = torch.empty((), dtype=dtype)
    if bool((torch.isfinite(high) & ~torch.isfinite(low)).any()):
        return fallback(like, why=f"the truth overflows in {str(t_low.dtype).replace('torch.', '')}")
    low, high = torch.where(both, low, 0.0).to(t_low.dtype), torch.where(both, high, 0.0)
    if not bool(high.any()) and not bool(low.any()):
        return fallback(like, why="the truth is exactly 0, no noise to measure")
    tol = derive(low, high, dtype, origin=origin)
    atol = max(tol.atol, FLOOR * _eps(dtype)) * slack
    return Tolerance(atol=atol if math.isfinite(atol) else math.inf, rtol=tol.rtol, origin=origin)


def attach(tensor: torch.Tensor, reference: Reference) -> torch.Tensor:
    """Mark a tensor with its float64 truth and tolerance (every comparison of it then uses them)."""
    setattr(tensor, _TRUTH_ATTR, reference)
    return tensor


def reference_of(tensor: torch.Tensor) -> Reference | None:
    """The :class:`Reference` attached to a checked tensor, or None."""
    return getattr(tensor, _TRUTH_ATTR, None)
