"""``check_backward``: every check, in order, with the same few lines of user code."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Collection, Sequence

import torch

from ...problems.device import single_thread
from ...problems.tolerance import GIVEN, Reference, Tolerance, attach, fallback, reference_of
from .calls import CheckFailure, Target, as_tuple, backward, forward, make_leaves, random_upstream, target_for, unchanged
from .finite import ATOL, GRADCHECK_RULE, RTOL, gradcheck_failure, sides
from .truth import Truth, check_grads, check_outputs, reference_truth, rejudge
from .variants import interleaved, layouts, requires_grad_patterns, retain_graph

#: Inputs with at most this many elements in all run on one thread (tiny ops: threads cost more than
#: they save, and much more on a busy machine); larger ones keep torch's setting.
SMALL = 1 << 16

#: Every check, in the order they run; those in :data:`OPTIONAL` can be turned off with ``skip=``.
CHECKS = ("forward", "backward", "deterministic", "outputs", "gradients", "retain_graph", "interleaved",
          "requires_grad", "layouts")
OPTIONAL = ("deterministic", "outputs", "retain_graph", "interleaved", "requires_grad", "layouts")


def _own(t: torch.Tensor, why: str) -> torch.Tensor:
    """``t`` as its own truth, under assert_close's defaults (for checks against the Function's own result)."""
    return attach(t.detach().clone(), Reference(t.detach().double(), fallback(t, why=why), lecture=False))


def _given(want: torch.Tensor, rtol: float | None, atol: float | None) -> torch.Tensor:
    if rtol is None and atol is None:
        return want
    ref = reference_of(want)
    assert ref is not None
    tol = Tolerance(atol=atol or 0.0, rtol=rtol or 0.0, origin=GIVEN)
    return attach(want, Reference(ref.truth64, tol, lecture=False))


def check_backward(fn: Callable[..., Any], *inputs: Any, reference: Callable[..., Any] | None = None,
                   grad_outputs: Sequence[torch.Tensor] | torch.Tensor | None = None, rtol: float | None = None,
                   atol: float | None = None, skip: Collection[str] = ()) -> tuple[torch.Tensor | None, ...]:
    """Assert that ``fn``'s forward and backward are right; return its gradients (None for non-tensors).

    ``fn`` is anything differentiable, typically ``MyFunction.apply``. Floating-point tensor inputs
    that require grad are differentiated (all of them when none does). The upstream gradient is
    random (seeded, never ones), unless ``grad_outputs`` is given. The checks, in order
    (:data:`CHECKS`; ``skip=("layouts",)`` turns off any of :data:`OPTIONAL`):

    1. ``forward``: it runs, returns tensors, and leaves its inputs as they were;
    2. ``backward``: it runs, every differentiated input gets a gradient of its shape, and neither
       inputs nor outputs are modified in place;
    3. ``deterministic``: a second call gives the same gradients;
    4. ``outputs``: with ``reference``, the outputs match the reference's; without, they are finite;
    5. ``gradients``: with ``reference`` (the same function in plain torch ops), the gradients
       match its float64 gradients under the measured rule; without, ``torch.autograd.gradcheck``
       (finite differences in float64) passes. Kinks are judged from both sides: no false alarm at
       a ReLU corner, and a reference's corner value is not taken for the truth;
    6. ``retain_graph``: a second backward through the same graph gives the same gradients;
    7. ``interleaved``: a second forward before the first one's backward changes nothing;
    8. ``requires_grad``: every pattern of which inputs require grad gives the same gradients;
    9. ``layouts``: transposed, strided and channels_last inputs (and upstream) give the same results.

    ``rtol``/``atol`` replace the tolerance of checks 4-5. A failure raises :class:`CheckFailure`
    (an ``AssertionError``) whose ``check`` is the name above and whose message names the rule
    that decided.

    Example::

        class Square(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x * x

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensors
                return 2 * x * grad

        x = torch.randn(3, 4, dtype=torch.float64)
        check_backward(Square.apply, x, reference=lambda x: x ** 2)
        check_backward(Square.apply, x)          # finite differences via gradcheck
    """
    __tracebackhide__ = True
    unknown = sorted(set(skip) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"check_backward(skip=...): unknown check(s) {unknown}; choose from {', '.join(OPTIONAL)}")
    small = sum(x.numel() for x in inputs if isinstance(x, torch.Tensor)) <= SMALL
    with single_thread() if small else nullcontext():
        return _check(fn, inputs, reference, grad_outputs, rtol, atol, skip)


def _check(fn: Callable[..., Any], inputs: Sequence[Any], reference: Callable[..., Any] | None,
           grad_outputs: Sequence[torch.Tensor] | torch.Tensor | None, rtol: float | None, atol: float | None,
           skip: Collection[str]) -> tuple[torch.Tensor | None, ...]:
    __tracebackhide__ = True
    target = target_for(fn, inputs)
    if not target.idx:
        raise CheckFailure("forward", "check_backward needs at least one floating-point tensor input")
    originals = make_leaves(inputs, ())
    leaves = make_leaves(inputs, target.idx)
    outs = forward(target, fn, leaves)
    unchanged(target, originals, leaves, "input", "forward")
    upstream = tuple(as_tuple(grad_outputs)) if grad_outputs is not None else random_upstream(outs)
    before = [o.detach().clone() for o in outs]
    grads = backward(target, outs, leaves, target.idx, upstream, retain_graph=True)
    unchanged(target, originals, leaves, "input", "backward")
    unchanged(target, before, outs, "output", "backward")
    _every_input_has_a_gradient(target, grads)
    if "deterministic" not in skip:
        _deterministic(target, upstream, grads)
    if reference is not None:
        truth = reference_truth(target, reference, upstream)
        if "outputs" not in skip:
            check_outputs(target, "outputs", outs, truth.outputs, " (vs the reference)", rtol=rtol, atol=atol)
        accepted = _against_reference(target, reference, upstream, grads, truth, rtol, atol)
        outputs = truth.outputs
    else:
        if "outputs" not in skip:
            _finite_outputs(target, outs)
        _against_finite_differences(target, upstream, rtol, atol)
        accepted = {i: _own(g, "vs its own first result") for i, g in grads.items() if g is not None}
        outputs = [_own(o, "vs its own first result") for o in outs]
    if "retain_graph" not in skip:
        retain_graph(target, outs, leaves, upstream, accepted)
    if "interleaved" not in skip:
        interleaved(target, upstream, accepted)
    if "requires_grad" not in skip:
        requires_grad_patterns(target, upstream, accepted)
    if "layouts" not in skip:
        layouts(target, upstream, outputs, accepted)
    return tuple(grads.get(i) for i in range(len(inputs)))


def _every_input_has_a_gradient(target: Target, grads: dict[int, torch.Tensor | None]) -> None:
    __tracebackhide__ = True
    for i, g in grads.items():
        if g is None:
            raise target.fail("backward", f"{target.label(i)} gets no gradient: backward returned None for it, or the "
                                          "output does not depend on it")


def _deterministic(target: Target, upstream: Sequence[torch.Tensor | None], grads: dict[int, torch.Tensor | None]) -> None:
    __tracebackhide__ = True
    leaves = make_leaves(target.inputs, target.idx)
    outs = forward(target, target.fn, leaves, check="deterministic")
    again = backward(target, outs, leaves, target.idx, upstream, check="deterministic")
    own = {i: _own(g, "vs the first call") for i, g in grads.items() if g is not None}
    check_grads(target, "deterministic", again, own,
                " on a second call with the same inputs: does backward keep state between calls (a class attribute, "
                "a buffer modified in place) or draw random numbers?")


def _finite_outputs(target: Target, outs: Sequence[torch.Tensor]) -> None:
    __tracebackhide__ = True
    finite_inputs = all(bool(torch.isfinite(x).all()) for x in target.inputs
                        if isinstance(x, torch.Tensor) and x.is_floating_point())
    for k, o in enumerate(outs):
        if finite_inputs and o.is_floating_point() and not bool(torch.isfinite(o).all()):
            bad = int((~torch.isfinite(o)).sum())
            raise target.fail("outputs", f"output {k} has {bad} inf/NaN element(s) for finite inputs: an overflow "
                                         "(exp of a large value: subtract the max first), a division by zero or a "
                                         "log of 0? If that is the true value (exp(1000) is inf), pass a reference: "
                                         "matching infinities pass")


def _against_reference(target: Target, reference: Callable[..., Any], upstream: Sequence[torch.Tensor | None],
                       grads: dict[int, torch.Tensor | None], truth: Truth, rtol: float | None,
                       atol: float | None) -> dict[int, torch.Tensor]:
    __tracebackhide__ = True
    accepted: dict[int, torch.Tensor] = {}
    for i, g in grads.items():
        assert g is not None
        want = _given(rejudge(target, reference, i, g, truth.grads[i], upstream), rtol, atol)
        check_grads(target, "gradients", {i: g}, {i: want}, head="the gradients differ from the reference's:")
        accepted[i] = want
    return accepted


def _against_finite_differences(target: Target, upstream: Sequence[torch.Tensor | None], rtol: float | None,
                                atol: float | None) -> None:
    """gradcheck at its defaults; where it fails on values, each element judged from both sides (kinks)."""
    __tracebackhide__ = True
    atol_ = ATOL if atol is None else atol
    rtol_ = RTOL if rtol is None else rtol
    leaves64 = make_leaves(target.inputs, target.idx, dtype=torch.float64)
    failure = gradcheck_failure(target.fn, leaves64, atol=atol_, rtol=rtol_)
    if failure is None:
        return
    kind, text = failure
    if kind != "jacobian":
        text = text if len(text) < 1500 else text[:1500] + " ..."
        raise target.fail("gradients", f"torch.autograd.gradcheck failed (in float64):\n{text}")
    up64 = [None if u is None else u.double() for u in upstream]
    outs = forward(target, target.fn, leaves64, context=" in float64", check="gradients")
    analytic = backward(target, outs, leaves64, target.idx, up64, context=" in float64", check="gradients")
    plain = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves64]
    for i, a in analytic.items():
        assert a is not None
        measured = sides(target.fn, plain, i, up64)
        flat = a.reshape(-1)
        close = (flat - measured.central).abs() <= atol_ + rtol_ * measured.central.abs()
        ok = torch.where(measured.kink(), measured.accepts(flat), close)
        if bool(ok.all()):
            continue
        want64 = torch.where(ok, flat, measured.central).reshape(a.shape)
        tol = Tolerance(atol=atol_, rtol=rtol_, origin=GIVEN if (atol, rtol) != (None, None) else GRADCHECK_RULE)
        want = attach(want64.clone(), Reference(want64, tol, lecture=False))
        check_grads(target, "gradients", {i: a}, {i: want}, head="the gradients differ from finite differences "
                                                                  "(float64):")
    # reaching here: gradcheck's mismatch was only at kinks, where any value between the sides is right
