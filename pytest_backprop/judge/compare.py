"""Comparing one gradient with the truth: the :class:`Comparison` record that every check shares.
Built on ``torch.testing.assert_close``; the public assertions are in :mod:`pytest_backprop.judge.asserts`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..problems.tolerance import EXACT, GIVEN, Reference, Tolerance, fallback, reference_of
from ..usercode.run import describe_type


@dataclass(frozen=True)
class Comparison:
    """Everything measured when ``actual`` is compared with ``expected``.

    ``problem`` is set when the values could not be compared at all (wrong type, dtype or shape).
    """

    actual: Any
    expected: torch.Tensor
    truth: torch.Tensor  # float64 truth where known, else ``expected``
    tolerance: Tolerance
    problem: str | None = None  # "type", "dtype", "shape" or None
    exact: bool | None = None
    approximate: bool | None = None
    maxdiff: float | None = None
    mismatched: int | None = None
    worst_index: tuple[int, ...] | None = None
    nonfinite: bool = False
    close_message: str = ""
    lecture: bool = False  # the tensor is one of the lecture's (hints may use its n and its lines)

    @property
    def numel(self) -> int:
        return self.expected.numel()

    @property
    def actual_shape(self) -> tuple[int, ...] | None:
        return tuple(self.actual.shape) if isinstance(self.actual, torch.Tensor) else None



def _conversion_hint(value: Any) -> str:
    """How to turn what the user returned into a tensor, when there is an obvious way."""
    if type(value).__module__.split(".")[0] == "numpy":
        return " (convert with torch.from_numpy(...), or compute it with torch ops)"
    if isinstance(value, (list, tuple, int, float)):
        return " (build it with torch ops on the forward tensors, e.g. torch.zeros_like(...))"
    return ""


def _truth_and_tolerance(expected: torch.Tensor, rtol: float | None, atol: float | None) -> tuple[torch.Tensor, Tolerance]:
    reference: Reference | None = reference_of(expected)
    if rtol is not None or atol is not None:
        tol = Tolerance(atol=atol or 0.0, rtol=rtol or 0.0, origin=GIVEN)
        return (reference.truth64 if reference else expected), tol
    if reference is not None:
        return reference.truth64, reference.tolerance
    return expected, fallback(expected, why="the kit does not know this tensor's float64 truth")


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Index tuple of a flat (row-major) index, like ``torch.unravel_index`` but in plain Python."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size) if size else (flat, 0)
        index.append(i)
    return tuple(reversed(index))


def compare(actual: Any, expected: torch.Tensor, *, rtol: float | None = None, atol: float | None = None,
            exact: bool = False) -> Comparison:
    """Compare ``actual`` with ``expected`` without raising; see :class:`Comparison`.

    ``expected`` may carry a float64 truth and a measured tolerance (the kit's tensors do); otherwise
    ``expected`` itself is the truth, with ``torch.testing.assert_close``'s defaults for its dtype
    (:mod:`pytest_backprop.problems.tolerance`).

    Example::

        compare(torch.zeros(3), torch.full((3,), 1e-9)).approximate   # True (atol 1e-05)
    """
    truth, tol = _truth_and_tolerance(expected, rtol, atol)
    if exact:
        tol = Tolerance(atol=0.0, rtol=0.0, origin=EXACT)
        truth = expected
    reference = reference_of(expected)
    base = dict(actual=actual, expected=expected, truth=truth, tolerance=tol,
                lecture=reference is not None and reference.lecture)
    if not isinstance(actual, torch.Tensor):
        return Comparison(**base, problem="type")
    if not actual.dtype.is_floating_point or actual.dtype != expected.dtype:
        return Comparison(**base, problem="dtype")
    if actual.shape != expected.shape:
        return Comparison(**base, problem="shape")
    actual = actual.detach()
    if actual.device != expected.device:
        actual = actual.to(expected.device)
    exact_equal = bool(torch.equal(actual, expected))
    diff = (actual.double() - expected.double()).abs()
    finite = bool(torch.isfinite(actual).all())
    maxdiff = float(diff.max()) if diff.numel() else 0.0
    a64, t64 = actual.double(), truth.double()
    err = (a64 - t64).abs()
    allowed = tol.atol + tol.rtol * t64.abs()
    bad = ~torch.isclose(a64, t64, rtol=tol.rtol, atol=tol.atol, equal_nan=False)  # assert_close's own test
    mismatched = int(bad.sum())
    worst = None
    if err.numel():
        excess = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err - allowed)
        worst = _unravel(int(excess.argmax()), tuple(err.shape))  # torch.unravel_index's first call imports sympy (0.5 s)
    if mismatched == 0:  # torch.isclose everywhere is assert_close's pass; calling it costs ~2 ms, so only on failure
        approximate, message = True, ""
    else:
        try:
            torch.testing.assert_close(a64, t64, rtol=tol.rtol, atol=tol.atol, equal_nan=False)
            approximate, message = True, ""
        except AssertionError as exc:
            approximate, message = False, str(exc)
    if exact:
        approximate = exact_equal
    return Comparison(**base, exact=exact_equal, approximate=approximate, maxdiff=maxdiff,
                      mismatched=mismatched if not approximate else 0, worst_index=worst,
                      nonfinite=not finite, close_message=message)


def describe_failure(name: str, cmp_: Comparison, *, prefix: str = "d") -> str:
    """The reason a comparison failed, for a human: types, shapes, or how far off the values are.

    ``prefix`` goes before ``name`` in the values' message (``dW2: 3 of 1728 elements ...``).
    """
    expected = cmp_.expected
    if cmp_.problem == "type":
        return (f"d{name} is {describe_type(cmp_.actual)}; expected a tensor of shape {tuple(expected.shape)}"
                + _conversion_hint(cmp_.actual))
    if cmp_.problem == "dtype":
        return (f"d{name} is {describe_type(cmp_.actual)}; expected a {str(expected.dtype).replace('torch.', '')} "
                f"tensor like {name} (convert with .to({expected.dtype}) or compute it from {name}'s values)")
    if cmp_.problem == "shape":
        return (f"d{name} has shape {tuple(cmp_.actual.shape)} but {name} has shape {tuple(expected.shape)}; "
                "a gradient has exactly the shape of its tensor")
    pct = 100.0 * (cmp_.mismatched or 0) / max(cmp_.numel, 1)
    worst = cmp_.worst_index
    at = ""
    if worst is not None:
        a = float(cmp_.actual.detach()[worst]) if cmp_.actual.dim() else float(cmp_.actual)
        t = float(cmp_.truth[worst]) if cmp_.truth.dim() else float(cmp_.truth)
        got, want = distinct(a, t)
        at = f"; worst at index {list(worst)}: got {got}, expected {want}"
    return (f"{prefix}{name}: {cmp_.mismatched} of {cmp_.numel} elements ({pct:.1f}%) differ beyond "
            f"{cmp_.tolerance.describe()}; maxdiff {cmp_.maxdiff:.3g}{at}")


def distinct(a: float, b: float, *, digits: int = 4) -> tuple[str, str]:
    """``a`` and ``b`` printed with as many significant digits as it takes to tell them apart.

    Example::

        distinct(1.5410001, 1.5410002)   # ('1.5410001', '1.5410002'), never '1.541' twice
    """
    for d in range(digits, 18):
        shown = f"{a:.{d}g}", f"{b:.{d}g}"
        if shown[0] != shown[1]:
            return shown
    return shown
