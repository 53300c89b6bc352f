"""Checking custom autograd code: ``check_backward(MyFunction.apply, x, w)``.

The gradients of ``fn`` for a random upstream gradient (never ones: a backward that forgets to
multiply by it must fail) are compared with those of a ``reference`` written with ordinary torch
ops, or, without a reference, checked by :func:`torch.autograd.gradcheck` (finite differences in
float64). Failures go through :func:`~pytest_backprop.compare.assert_grad_matches`, so they carry
the same hints (``keepdim``, ``scale``, ``transpose``, ...) as the lecture's checks.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch

from ..usercode.run import describe_type
from .asserts import assert_grad_matches

__all__ = ["check_backward"]

#: torch.autograd.gradcheck's defaults, used for the finite-difference comparison's hint.
GRADCHECK_ATOL, GRADCHECK_RTOL, GRADCHECK_EPS = 1e-5, 1e-3, 1e-6


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _leaves(inputs: Sequence[Any], dtype: torch.dtype | None = None) -> list[Any]:
    """Fresh copies of the inputs; floating tensors require grad (those that asked, or all when none did)."""
    asked = any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            y = x.detach().clone()
            if dtype is not None and y.is_floating_point():
                y = y.to(dtype)
            if y.is_floating_point() and (x.requires_grad or not asked):
                y.requires_grad_(True)
            out.append(y)
        else:
            out.append(x)
    return out


def _differentiable(leaves: Sequence[Any]) -> list[int]:
    return [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]


def _outputs(fn: Callable[..., Any], leaves: Sequence[Any], who: str) -> tuple[torch.Tensor, ...]:
    with torch.enable_grad():
        outs = _as_tuple(fn(*leaves))
    bad = [describe_type(o) for o in outs if not isinstance(o, torch.Tensor)]
    if bad:
        raise AssertionError(f"{who} returned {', '.join(bad)}; expected a tensor or a tuple of tensors")
    return outs


def _random_like(outs: Sequence[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs)


def _grads(fn: Callable[..., Any], inputs: Sequence[Any], grad_outputs: Sequence[torch.Tensor] | None, who: str,
           dtype: torch.dtype | None = None) -> tuple[list[Any], list[int], tuple[torch.Tensor, ...]]:
    leaves = _leaves(inputs, dtype)
    idx = _differentiable(leaves)
    if not idx:
        raise AssertionError("check_backward needs at least one floating-point tensor input")
    outs = _outputs(fn, leaves, who)
    if grad_outputs is None:
        grad_outputs = _random_like(outs, seed=0)
    grad_outputs = tuple(g.to(o.dtype) for g, o in zip(grad_outputs, outs))
    used = [(o, g) for o, g in zip(outs, grad_outputs) if o.requires_grad]
    if not used:
        raise AssertionError(f"{who}'s output does not require grad: is it computed from the inputs with "
                             "differentiable ops (or a torch.autograd.Function)?")
    try:
        grads = torch.autograd.grad([o for o, _ in used], [leaves[i] for i in idx], [g for _, g in used],
                                    allow_unused=True)
    except RuntimeError as exc:
        raise AssertionError(f"{who}'s backward failed: {exc}\n(a gradient must have exactly the shape of "
                             "its input; reduce a broadcast gradient with .sum(dim, keepdim=...) or "
                             ".sum_to_size(input.shape))") from exc
    return list(grads), idx, grad_outputs


def _numerical_vjp(fn: Callable[..., Any], leaves: Sequence[Any], i: int, grad_outputs: Sequence[torch.Tensor],
                   eps: float = GRADCHECK_EPS) -> torch.Tensor:
    """Central-difference gradient of ``sum(grad_output * fn(x))`` w.r.t. input ``i`` (float64; for the hint)."""
    base = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
    x = base[i].clone()
    out = torch.zeros_like(x)
    flat, res = x.view(-1), out.view(-1)

    def objective() -> float:
        with torch.no_grad():
            outs = _as_tuple(fn(*[x if j == i else b for j, b in enumerate(base)]))
        return float(sum((o.double() * g.double()).sum() for o, g in zip(outs, grad_outputs)))

    for k in range(flat.numel()):
        old = float(flat[k])
        flat[k] = old + eps
        plus = objective()
        flat[k] = old - eps
        minus = objective()
        flat[k] = old
        res[k] = (plus - minus) / (2 * eps)
    return out


def check_backward(fn: Callable[..., Any], *inputs: Any, reference: Callable[..., Any] | None = None,
                   grad_outputs: Sequence[torch.Tensor] | torch.Tensor | None = None, rtol: float | None = None,
                   atol: float | None = None) -> tuple[torch.Tensor | None, ...]:
    """Assert that ``fn``'s backward is right; return its gradients (one per input, None for non-tensors).

    ``fn`` is anything differentiable, typically ``MyFunction.apply``. Floating-point tensor inputs
    that require grad are differentiated (all of them when none does). The upstream gradient is
    random (seeded), unless ``grad_outputs`` is given. Checks, in order:

    1. backward runs and each gradient has its input's shape (autograd rejects other shapes);
    2. each gradient is finite;
    3. a second call gives the same gradients (no state kept between calls);
    4. with ``reference`` (the same function written with plain torch ops): the gradients match the
       reference's under ``rtol``/``atol`` (default: ``torch.testing.assert_close``'s for the dtype);
       without it: :func:`torch.autograd.gradcheck` passes on float64 copies of the inputs, and a
       failure shows the finite-difference gradient that was expected.

    Raises ``AssertionError`` with a hint on failure (via ``assert_grad_matches``).

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
    name, labels = _names(fn, len(inputs))
    if grad_outputs is not None:
        grad_outputs = _as_tuple(grad_outputs)
    grads, idx, upstream = _grads(fn, inputs, grad_outputs, name)
    for i, g in zip(idx, grads):
        x = inputs[i]
        label = f"{labels[i]} (input {i} of {name})"
        if g is None:
            raise AssertionError(f"{label} gets no gradient: backward returned None for it, or the output does "
                                 "not depend on it")
        if tuple(g.shape) != tuple(x.shape):
            raise AssertionError(f"the gradient of {label} has shape {tuple(g.shape)}, the input {tuple(x.shape)}")
        if not bool(torch.isfinite(g).all()) and bool(torch.isfinite(x).all()):
            raise AssertionError(f"the gradient of {label} contains NaN or inf for finite inputs: look for a "
                                 "division by zero, log of 0 or exp overflow in backward")
    again, _, _ = _grads(fn, inputs, upstream, name)
    for i, g, h in zip(idx, grads, again):
        if not torch.equal(g, h):
            raise AssertionError(f"the gradient of {labels[i]} (input {i} of {name}) differs on a second call with the same "
                                 f"inputs (maxdiff {float((g.double() - h.double()).abs().max()):.3g}): does backward "
                                 "keep state between calls (a class attribute, a buffer modified in place)?")
    if reference is not None:
        expected, ref_idx, _ = _grads(reference, inputs, upstream, "reference")
        if ref_idx != idx:
            raise AssertionError("reference and fn disagree on which inputs are differentiable")
        for i, g, e in zip(idx, grads, expected):
            if e is None:
                e = torch.zeros_like(inputs[i], dtype=g.dtype)
            _matches(g, e.detach(), labels[i], f"{name} vs reference", rtol, atol)
        return _full(inputs, idx, grads)
    _gradcheck(fn, inputs, idx, upstream, name, labels, rtol, atol)
    return _full(inputs, idx, grads)


def _names(fn: Callable[..., Any], count: int) -> tuple[str, list[str]]:
    """``Softmax.apply`` and the inputs' names (from ``forward``'s signature, else ``input0``...)."""
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type):
        name, target = f"{owner.__name__}.{getattr(fn, '__name__', 'apply')}", getattr(owner, "forward", None)
        skip = 1  # ctx
    else:
        name, target, skip = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or "fn", fn, 0
    labels = [f"input{i}" for i in range(count)]
    try:
        params = [p for p in inspect.signature(target).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][skip:]
        for i, p in enumerate(params[:count]):
            labels[i] = p.name
    except (TypeError, ValueError):
        pass
    return name, labels


def _matches(actual: torch.Tensor, expected: torch.Tensor, label: str, context: str, rtol: float | None,
             atol: float | None) -> None:
    __tracebackhide__ = True
    try:
        assert_grad_matches(actual, expected, name=label, rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise AssertionError(f"{context}:\n{exc}") from None


def _full(inputs: Sequence[Any], idx: list[int], grads: Sequence[Any]) -> tuple[Any, ...]:
    by_index = dict(zip(idx, grads))
    return tuple(by_index.get(i) for i in range(len(inputs)))


def _gradcheck(fn: Callable[..., Any], inputs: Sequence[Any], idx: list[int], upstream: Sequence[torch.Tensor],
               name: str, labels: list[str], rtol: float | None, atol: float | None) -> None:
    __tracebackhide__ = True
    from torch.autograd.gradcheck import GradcheckError

    leaves = _leaves(inputs, torch.float64)
    atol_ = GRADCHECK_ATOL if atol is None else atol
    rtol_ = GRADCHECK_RTOL if rtol is None else rtol
    try:
        torch.autograd.gradcheck(fn, tuple(leaves), eps=GRADCHECK_EPS, atol=atol_, rtol=rtol_, raise_exception=True)
        return
    except GradcheckError as exc:
        failure = str(exc)
    except RuntimeError as exc:  # e.g. a Function that only works in float32
        failure = f"gradcheck could not run {name} in float64: {exc}"
    # Explain with the VJP for our upstream gradient: finite differences vs fn's backward, in float64.
    up64 = tuple(u.double() for u in upstream)
    actual, _, _ = _grads(fn, leaves, up64, name, torch.float64)
    for i, g in zip(idx, actual):
        expected = _numerical_vjp(fn, leaves, i, up64)
        _matches(g, expected, labels[i], f"{name} vs finite differences (float64)", rtol_, atol_)
    if len(failure) > 2000:
        failure = failure[:2000] + " ..."
    raise AssertionError(f"torch.autograd.gradcheck failed for {name}:\n{failure}")
