"""The truth for check_backward: a reference re-run in float64 with the measured rule, or finite
differences; and comparisons that do not take a reference's corner value for the truth.

With a reference the truth is the reference's output and gradient in float64, and the tolerance
is the measured rule (:func:`~pytest_backprop.problems.tolerance.measured_or_fallback`): how far the
same reference is from that truth at low precision (the input's dtype, or float32 for float64
inputs, widened by :data:`~pytest_backprop.problems.noise.FLOAT64_SLACK`). Where that cannot be
measured, or the reference does not run in float64, ``torch.testing.assert_close``'s defaults
decide, and the message says so. Elements the float64 truth calls NaN are not checked; a value
that overflows in the input's dtype must overflow the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from ...problems.noise import FLOAT64_SLACK
from ...problems.tolerance import Reference, Tolerance, attach, fallback, measured_or_fallback, reference_of
from ..compare import Comparison, compare, describe_failure
from ..diagnose import diagnose
from .calls import Target, backward, forward, make_leaves
from .finite import sides

#: Most mismatched elements per tensor that are re-judged by finite differences (kinks are points).
REJUDGE_LIMIT = 256
MEASURED_REF = "measured rule: the reference re-run in float64"


@dataclass
class Truth:
    """Expected outputs and gradients (in the Function's dtypes, each carrying its float64 truth)."""

    outputs: list[torch.Tensor]
    grads: dict[int, torch.Tensor]


def expected(low: torch.Tensor, truth64: torch.Tensor, tolerance: Tolerance) -> torch.Tensor:
    """``low`` marked with its float64 truth (overflow as in ``low``'s dtype) and tolerance."""
    t64 = truth64.detach().double()
    if low.is_floating_point() and low.dtype != torch.float64:
        cast = t64.to(low.dtype).double()
        t64 = torch.where(torch.isinf(cast) & torch.isfinite(t64), cast, t64)
    return attach(low.detach().clone(), Reference(t64, tolerance, lecture=False))


def judge(actual: Any, want: torch.Tensor, **kwargs: Any) -> Comparison:
    """:func:`compare`, where elements whose float64 truth is NaN do not count."""
    reference = reference_of(want)
    if reference is None or not isinstance(actual, torch.Tensor) or actual.shape != want.shape:
        return compare(actual, want, **kwargs)
    undefined = torch.isnan(reference.truth64)
    if not bool(undefined.any()):
        return compare(actual, want, **kwargs)
    actual = torch.where(undefined, torch.zeros((), dtype=actual.dtype), actual.detach())
    patched = attach(torch.where(undefined, torch.zeros((), dtype=want.dtype), want),
                     replace(reference, truth64=torch.where(undefined, 0.0, reference.truth64)))
    return compare(actual, patched, **kwargs)


def _run(target: Target, fn: Callable[..., Any], upstream: Sequence[torch.Tensor | None], dtype: torch.dtype | None,
         who: str) -> tuple[tuple[torch.Tensor, ...], dict[int, torch.Tensor]]:
    __tracebackhide__ = True
    leaves = make_leaves(target.inputs, target.idx, dtype=dtype)
    outs = forward(target, fn, leaves, who=who, check="reference")
    ups = [None if u is None else (u.to(o.dtype) if o.is_floating_point() else None) for u, o in zip(upstream, outs)]
    grads = backward(target, outs, leaves, target.idx, ups, who=who, check="reference")
    full = {i: (g if g is not None else torch.zeros_like(leaves[i])) for i, g in grads.items()}
    return tuple(o.detach() for o in outs), full


def reference_truth(target: Target, reference: Callable[..., Any], upstream: Sequence[torch.Tensor | None]) -> Truth:
    """The reference's outputs and gradients for ``upstream``, with float64 truths and measured tolerances."""
    __tracebackhide__ = True
    outs_low, grads_low = _run(target, reference, upstream, None, "the reference")
    try:
        outs64, grads64 = _run(target, reference, upstream, torch.float64, "the reference")
        why = "" if all(o.dtype == torch.float64 for o in outs64 if o.is_floating_point()) else \
            "the reference does not compute in float64"
    except AssertionError as exc:
        outs64, grads64, why = outs_low, grads_low, f"the reference fails in float64 ({str(exc).splitlines()[0]})"
    needs32 = any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in target.inputs)
    outs32, grads32 = outs_low, grads_low
    if needs32 and not why:
        try:
            outs32, grads32 = _run(target, reference, upstream, torch.float32, "the reference")
        except AssertionError:
            why = "the reference does not run in float32, so its rounding cannot be measured"

    def tolerance(low: torch.Tensor, measure: torch.Tensor, t64: torch.Tensor) -> Tolerance:
        if why or not low.is_floating_point():
            return fallback(low, why=why) if low.is_floating_point() else Tolerance(0.0, 0.0, "exact")
        if low.dtype == torch.float64:
            return measured_or_fallback(measure, t64, low.dtype, origin=f"{MEASURED_REF}, x{FLOAT64_SLACK}",
                                        slack=FLOAT64_SLACK)
        return measured_or_fallback(low, t64, low.dtype, origin=MEASURED_REF)

    outputs = [expected(lo, t64, tolerance(lo, m, t64)) for lo, m, t64 in zip(outs_low, outs32, outs64)]
    grads = {i: expected(grads_low[i], grads64[i], tolerance(grads_low[i], grads32[i], grads64[i])) for i in target.idx}
    return Truth(outputs, grads)


def rejudge(target: Target, reference: Callable[..., Any], i: int, actual: torch.Tensor, want: torch.Tensor,
            upstream: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``want`` with the elements where the reference's own gradient is not the truth replaced by ``actual``'s.

    At an element where ``actual`` and the reference disagree, the reference is measured from both
    sides by finite differences (float64). If its autograd value agrees with them, it stands. If not
    (a corner: ``relu``/``abs`` at 0, where any value between the sides is right; or a corner value
    of autograd at a smooth point, ``sign(x) * log1p(|x|)`` at 0, whose derivative is 1, not 0),
    ``actual`` is accepted when finite differences accept it.
    """
    reference_info = reference_of(want)
    result = judge(actual, want)
    if reference_info is None or result.problem is not None or result.approximate:
        return want
    t64, tol = reference_info.truth64, reference_info.tolerance
    a64 = actual.detach().double()
    bad = ~torch.isclose(a64, t64, rtol=tol.rtol, atol=tol.atol) & ~torch.isnan(t64)
    positions = torch.nonzero(bad.reshape(-1)).reshape(-1).tolist()
    if not positions or len(positions) > REJUDGE_LIMIT:
        return want
    args64 = make_leaves(target.inputs, (), dtype=torch.float64)
    up64 = [None if u is None else u.double() for u in upstream]
    measured = sides(reference, args64, i, up64, positions)
    flat_t, flat_a = t64.reshape(-1)[positions], a64.reshape(-1)[positions]
    trustworthy = ~measured.kink() & measured.accepts(flat_t)
    accepted = ~trustworthy & measured.accepts(flat_a)
    if not bool(accepted.any()):
        return want
    keep = torch.tensor(positions)[accepted]
    new64 = t64.clone().reshape(-1)
    new64[keep] = flat_a[accepted]
    low = want.detach().clone().reshape(-1)
    low[keep] = actual.detach().reshape(-1)[keep].to(low.dtype)
    return attach(low.reshape(want.shape), replace(reference_info, truth64=new64.reshape(t64.shape)))


def check_outputs(target: Target, check: str, outs: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                  context: str = "", *, rtol: float | None = None, atol: float | None = None) -> None:
    """Fail ``check`` unless each output matches its expected value (count, dtype, shape, values)."""
    __tracebackhide__ = True
    if len(outs) != len(want):
        raise target.fail(check, f"returns {len(outs)} output(s); expected {len(want)}{context}")
    for k, (o, w) in enumerate(zip(outs, want)):
        result = judge(o.detach(), w, rtol=rtol, atol=atol)
        if result.problem in ("dtype", "shape"):
            got, exp = (o.dtype, w.dtype) if result.problem == "dtype" else (tuple(o.shape), tuple(w.shape))
            raise target.fail(check, f"output {k} has {result.problem} {got}; expected {exp}{context}")
        if not result.approximate:
            overflow = ("\nhint [nonfinite]: inf/NaN where the truth is finite: an overflow (exp of a large value: "
                        "subtract the max first) or a division by zero?") if result.nonfinite else ""
            raise target.fail(check, f"output {k} is wrong{context}:\n"
                                     f"{describe_failure(f'output {k}', result, prefix='')}{overflow}")


def check_grads(target: Target, check: str, got: dict[int, torch.Tensor | None], want: dict[int, torch.Tensor],
                context: str = "", *, rtol: float | None = None, atol: float | None = None, head: str = "") -> None:
    """Fail ``check`` unless each gradient matches its expected value; the first wrong one is named,
    with a hint (``scale``, ``transposed``, ...) where one fits."""
    __tracebackhide__ = True
    for i, g in got.items():
        if g is None:
            raise target.fail(check, f"{target.label(i)} gets no gradient{context}: backward returned None for it")
        result = judge(g, want[i], rtol=rtol, atol=atol)
        if result.problem is None and result.approximate:
            continue
        label = target.labels[i]
        lines = [describe_failure(label, result)]
        hint = diagnose(label, result)
        if hint.code not in ("mismatch", "shape", "type", "dtype", "ok"):
            lines.append(f"hint [{hint.code}]: {hint.message}")
        what = head or f"the gradient of {target.label(i)} is wrong{context}:"
        raise target.fail(check, what + "\n" + "\n".join(lines))
