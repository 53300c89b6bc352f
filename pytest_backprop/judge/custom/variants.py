"""The same Function called the ways autograd and real code call it, each compared with the truth.

- ``layouts``: inputs and upstream gradient transposed, strided (a slice with step 2) and, for
  4-d tensors, channels_last; a backward that assumes contiguous memory (``.view``) breaks there;
- ``requires_grad``: every pattern of which inputs require grad (``ctx.needs_input_grad`` bugs);
- ``interleaved``: two forwards before one backward (state kept on the class, not on ``ctx``);
- ``retain_graph``: a second backward on the same graph (saved tensors modified in place).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Sequence

import torch

from .calls import Target, backward, forward, make_leaves
from .truth import check_grads, check_outputs

#: Up to this many differentiable inputs, every subset pattern is tried; above, one-in and one-out.
ALL_SUBSETS_UP_TO = 4


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t


def _strided(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0 or t.numel() < 2:
        return t
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


#: Non-contiguous layouts: name -> how a tensor is laid out (same shape and values).
LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "transposed": _transposed, "strided": _strided, "channels_last": _channels_last,
}


def _reversed(t: torch.Tensor) -> torch.Tensor:
    """Other values of the same kind for a second forward: the elements in reverse order."""
    return t.flip(tuple(range(t.dim()))) if t.dim() else t


def subsets(idx: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """The proper, non-empty subsets of ``idx`` that are tried (all of them for up to 4 inputs)."""
    if len(idx) <= 1:
        return
    if len(idx) <= ALL_SUBSETS_UP_TO:
        for size in range(1, len(idx)):
            yield from itertools.combinations(idx, size)
        return
    for i in idx:
        yield (i,)
        yield tuple(j for j in idx if j != i)


def layouts(target: Target, upstream: Sequence[torch.Tensor | None], outputs: Sequence[torch.Tensor],
            grads: dict[int, torch.Tensor]) -> None:
    """Each non-contiguous layout of the inputs (and of the upstream gradient) gives the same results."""
    __tracebackhide__ = True
    for kind, lay in LAYOUTS.items():
        leaves = make_leaves(target.inputs, target.idx, layout=lay)
        ups = [None if u is None else lay(u.clone()) for u in upstream]
        moved = [x for x in (*leaves, *ups) if isinstance(x, torch.Tensor) and x.numel() > 1 and not x.is_contiguous()]
        if not moved:
            continue
        context = (f" for {kind} (non-contiguous) inputs and upstream gradient: does it assume contiguous memory? "
                   "(use .reshape or .contiguous() instead of .view)")
        outs = forward(target, target.fn, leaves, context=context, check="layouts")
        check_outputs(target, "layouts", outs, outputs, context)
        got = backward(target, outs, leaves, target.idx, ups, context=context, check="layouts")
        check_grads(target, "layouts", got, grads, context)


def requires_grad_patterns(target: Target, upstream: Sequence[torch.Tensor | None], grads: dict[int, torch.Tensor]) -> None:
    """With only some inputs requiring grad, those get the same gradients (``ctx.needs_input_grad``)."""
    __tracebackhide__ = True
    for subset in subsets(target.idx):
        names = ", ".join(target.labels[i] for i in subset)
        context = (f" when only {names} require{'s' if len(subset) == 1 else ''} grad (check how backward uses "
                   "ctx.needs_input_grad)")
        leaves = make_leaves(target.inputs, subset)
        outs = forward(target, target.fn, leaves, context=context, check="requires_grad")
        got = backward(target, outs, leaves, subset, upstream, context=context, check="requires_grad")
        check_grads(target, "requires_grad", got, grads, context)


def interleaved(target: Target, upstream: Sequence[torch.Tensor | None], grads: dict[int, torch.Tensor]) -> None:
    """A second forward (other values) before the first one's backward leaves that backward right."""
    __tracebackhide__ = True
    first = make_leaves(target.inputs, target.idx)
    outs = forward(target, target.fn, first, check="interleaved")
    second = make_leaves(target.inputs, target.idx, values=_reversed)
    if all(torch.equal(a, b) for a, b in zip(first, second) if isinstance(a, torch.Tensor)):
        return  # the same values either way: nothing to tell apart
    try:
        with torch.enable_grad():
            target.fn(*second)
    except Exception:  # noqa: BLE001 -- other values may be outside the Function's domain: no finding
        return
    context = (" after a second forward (other inputs) ran before this backward: does forward keep state on the "
               "class or a global instead of ctx (ctx.save_for_backward)?")
    got = backward(target, outs, first, target.idx, upstream, context=context, check="interleaved")
    check_grads(target, "interleaved", got, grads, context)


def retain_graph(target: Target, outs: Sequence[torch.Tensor], leaves: Sequence[Any],
                 upstream: Sequence[torch.Tensor | None], grads: dict[int, torch.Tensor]) -> None:
    """A second backward through the same graph (``retain_graph=True``) gives the same gradients."""
    __tracebackhide__ = True
    context = (" on a second backward through the same graph (retain_graph=True): does backward modify a saved "
               "tensor or ctx in place?")
    got = backward(target, outs, leaves, target.idx, upstream, context=context, check="retain_graph")
    check_grads(target, "retain_graph", got, grads, context)
