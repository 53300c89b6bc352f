"""Comparing one gradient with the truth: ``assert_grad_matches``, the lecture's ``cmp``, and the
comparison record they share. Built on ``torch.testing.assert_close``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .tolerance import Reference, Tolerance, fallback, reference_of


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

    @property
    def numel(self) -> int:
        return self.expected.numel()

    @property
    def actual_shape(self) -> tuple[int, ...] | None:
        return tuple(self.actual.shape) if isinstance(self.actual, torch.Tensor) else None


def describe_type(value: Any) -> str:
    """A short description of what the user returned, for messages."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{'an' if dtype[0] in 'aeiou' else 'a'} {dtype} tensor of shape {tuple(value.shape)}"
    shape = getattr(value, "shape", None)
    module = type(value).__module__.split(".")[0]
    kind = type(value).__qualname__ if module == "builtins" else f"{module}.{type(value).__qualname__}"
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{article} {kind}" + (f" of shape {tuple(shape)}" if shape is not None else "")


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
        tol = Tolerance(atol=atol or 0.0, rtol=rtol or 0.0, origin="given")
        return (reference.truth64 if reference else expected), tol
    if reference is not None:
        return reference.truth64, reference.tolerance
    return expected, fallback(expected)


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

    ``expected`` may carry a float64 truth and a rule tolerance (the kit's tensors do); otherwise
    ``expected`` itself is the truth, with assert_close's default rtol for its dtype.
    """
    truth, tol = _truth_and_tolerance(expected, rtol, atol)
    if exact:
        tol = Tolerance(atol=0.0, rtol=0.0, origin="exact")
        truth = expected
    base = dict(actual=actual, expected=expected, truth=truth, tolerance=tol)
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


def describe_failure(name: str, cmp_: Comparison) -> str:
    """The reason a comparison failed, for a human: types, shapes, or how far off the values are."""
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
        at = f"; worst at index {list(worst)}: got {a:.6g}, expected {t:.6g}"
    return (f"d{name}: {cmp_.mismatched} of {cmp_.numel} elements ({pct:.1f}%) differ beyond atol={cmp_.tolerance.atol:.2g}"
            f" ({cmp_.tolerance.origin}); maxdiff {cmp_.maxdiff:.3g}{at}")


def _truth_of(t: Any) -> Any:
    """``t.grad`` when ``t`` is a forward tensor holding its gradient, else ``t`` itself (the truth).

    A tensor that requires grad but has no ``.grad`` is a forward tensor whose gradient was never
    computed: using its values as the truth would be silently wrong, so that is an error.
    """
    if not isinstance(t, torch.Tensor):
        return t
    readable = t.is_leaf or t.retains_grad  # .grad of any other tensor is never populated (and warns)
    if readable and t.grad is not None:
        return t.grad
    if t.requires_grad:
        raise ValueError("the tensor to compare with has no .grad: call .retain_grad() on it before "
                         "loss.backward() (or pass the true gradient itself)")
    return t


def assert_grad_matches(actual: Any, expected: torch.Tensor, *, name: str | None = None, exact: bool = False,
                        rtol: float | None = None, atol: float | None = None) -> None:
    """Assert that a hand-written gradient matches the truth, with a hint when it does not.

    ``expected`` is the true gradient, or a tensor whose ``.grad`` holds it (the lecture's ``t``).
    Shapes must be equal (no broadcasting: a (64,) answer for a (1, 64) tensor fails). With
    ``exact=True`` the values must be bitwise equal; otherwise the tolerance rule applies (or the
    given ``rtol``/``atol``).

    Example::

        def test_counts_sum_inv(makemore_forward):
            f = makemore_forward
            dcounts_sum_inv = (f["counts"] * f.grads["probs"]).sum(1, keepdim=True)
            assert_grad_matches(dcounts_sum_inv, f.grads["counts_sum_inv"], name="counts_sum_inv")
    """
    __tracebackhide__ = True
    truth = _truth_of(expected)
    if not isinstance(truth, torch.Tensor):
        raise TypeError(f"expected must be a tensor (or a tensor with .grad), got {describe_type(expected)}")
    label = name or "tensor"
    result = compare(actual, truth, rtol=rtol, atol=atol, exact=exact)
    if result.problem is None and result.approximate:
        return
    from .diagnose import diagnose  # local: diagnose is heavier and only needed on failure

    hint = diagnose(label, result)
    lines = [describe_failure(label, result)]
    if hint.code not in ("mismatch", "shape", "type", "dtype"):
        lines.append(f"hint [{hint.code}]: {hint.message}")
    raise AssertionError("\n".join(lines))


def cmp(s: str, dt: Any, t: torch.Tensor) -> bool:
    """Drop-in for the lecture's ``cmp``: prints ``name | exact | approximate | maxdiff`` plus a verdict.

    ``t`` is the forward tensor whose ``.grad`` holds the truth (or the true gradient itself).
    Returns True when the gradient passes the tolerance rule.

    Example::

        cmp('logprobs', dlogprobs, logprobs)
        # logprobs        | exact: True  | approximate: True  | maxdiff: 0.0 | ok
    """
    truth = _truth_of(t)
    result = compare(dt, truth)
    if result.problem is not None:
        print(f"{s:15s} | exact: False | approximate: False | maxdiff: n/a | FAIL: {describe_failure(s, result)}")
        return False
    verdict = "ok" if result.approximate else "FAIL"
    print(f"{s:15s} | exact: {str(result.exact):5s} | approximate: {str(result.approximate):5s} | "
          f"maxdiff: {result.maxdiff} | {verdict}")
    return bool(result.approximate)
