"""Calling the Function under test: fresh leaves, forward, backward, and failures that read short.

Every exception the user's forward or backward raises (``RuntimeError``, ``IndexError``, ...) becomes
one :class:`CheckFailure` naming the check, the Function and the user's own line; torch's engine
frames stay out of the traceback (``from None``, ``__tracebackhide__``).
"""

from __future__ import annotations

import inspect
import linecache
import os
import sysconfig
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

import torch

from ...usercode.run import describe_type, locate

_TORCH_DIR = os.path.dirname(torch.__file__)
_KIT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STDLIB = sysconfig.get_paths()["stdlib"]


class CheckFailure(AssertionError):
    """A failed check of :func:`~pytest_backprop.check_backward`; ``check`` names which one.

    Example::

        try:
            check_backward(MyFunction.apply, x)
        except CheckFailure as failure:
            failure.check   # 'layouts'
    """

    def __init__(self, check: str, message: str):
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class Target:
    """The Function under test, its name, its inputs and which of them are differentiated."""

    fn: Callable[..., Any]
    name: str
    labels: tuple[str, ...]
    inputs: tuple[Any, ...]
    idx: tuple[int, ...]

    def label(self, i: int) -> str:
        """``x (input 0 of Softmax.apply)``."""
        return f"{self.labels[i]} (input {i} of {self.name})"

    def fail(self, check: str, text: str) -> CheckFailure:
        """The failure of one check, headed by the Function's name and the check's."""
        return CheckFailure(check, f"{self.name} [{check}]: {text}")


def target_for(fn: Callable[..., Any], inputs: Sequence[Any]) -> Target:
    """``Softmax.apply`` and the inputs' names (from ``forward``'s signature, else ``input0``...)."""
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type):
        name, sig_of, skip = f"{owner.__name__}.{getattr(fn, '__name__', 'apply')}", getattr(owner, "forward", None), 1
    else:
        name, sig_of, skip = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or "fn", fn, 0
    labels = [f"input{i}" for i in range(len(inputs))]
    try:
        params = [p for p in inspect.signature(sig_of).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][skip:]
        for i, p in enumerate(params[:len(inputs)]):
            labels[i] = p.name
    except (TypeError, ValueError):
        pass
    asked = any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)
    idx = tuple(i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()
                and (x.requires_grad or not asked))
    return Target(fn, name, tuple(labels), tuple(inputs), idx)


def _is_user_file(filename: str) -> bool:
    return not (filename.startswith((_TORCH_DIR, _KIT_DIR, _STDLIB)) or filename.startswith("<frozen")
                or f"{os.sep}hypothesis{os.sep}" in filename)


def raised(exc: BaseException) -> str:
    """``IndexError: index 3 is out of bounds ... at my_ops.py:12`` plus the line, for any exception."""
    error = locate(exc, _is_user_file, linecache.getline)
    head = f"{error.type}: {error.message}" if error.message else error.type
    where = f" at {error.location}" if error.filename else ""
    return head + where + (f"\n    {error.source_line}" if error.source_line else "")


def as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def make_leaves(inputs: Sequence[Any], requires: Collection[int], *, dtype: torch.dtype | None = None,
                layout: Callable[[torch.Tensor], torch.Tensor] | None = None,
                values: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[Any]:
    """Fresh copies of the inputs: floating ones cast to ``dtype``, rearranged by ``values`` (same
    shape) and laid out by ``layout``; those in ``requires`` require grad."""
    out: list[Any] = []
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            out.append(x)
            continue
        y = x.detach().clone()
        if dtype is not None and y.is_floating_point():
            y = y.to(dtype)
        if values is not None:
            y = values(y)
        if layout is not None:
            y = layout(y)
        if i in requires:
            y.requires_grad_(True)
        out.append(y)
    return out


def _whose(who: str) -> str:
    return f"{who}'s " if who else ""


def forward(target: Target, fn: Callable[..., Any], leaves: Sequence[Any], *, who: str = "",
            context: str = "", check: str = "forward") -> tuple[torch.Tensor, ...]:
    """``fn(*leaves)`` as a tuple of tensors; anything else, or an exception, fails ``check``.

    ``who`` names a callable other than the Function under test (``"the reference"``).
    """
    __tracebackhide__ = True
    try:
        with torch.enable_grad():
            outs = as_tuple(fn(*leaves))
    except Exception as exc:  # noqa: BLE001 -- any error of user code is a finding, not a crash
        raise target.fail(check, f"{_whose(who)}forward raised {raised(exc)}{context}") from None
    bad = [describe_type(o) for o in outs if not isinstance(o, torch.Tensor)]
    if bad:
        raise target.fail(check, f"{who or 'it'} returned {', '.join(bad)}; expected a tensor or a tuple of tensors")
    return outs


def differentiable(outs: Sequence[torch.Tensor]) -> list[int]:
    return [k for k, o in enumerate(outs) if o.is_floating_point() and o.requires_grad]


def random_upstream(outs: Sequence[torch.Tensor], *, seed: int = 0) -> tuple[torch.Tensor | None, ...]:
    """A seeded random gradient for each floating output (never ones: a forgotten ``* grad`` must show)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) if o.is_floating_point() else None
                 for o in outs)


def backward(target: Target, outs: Sequence[torch.Tensor], leaves: Sequence[Any], wanted: Sequence[int],
             upstream: Sequence[torch.Tensor | None], *, who: str = "", context: str = "",
             check: str = "backward", retain_graph: bool = False) -> dict[int, torch.Tensor | None]:
    """The gradients of ``leaves[i]`` for ``i`` in ``wanted``, for ``upstream``; errors fail ``check``."""
    __tracebackhide__ = True
    used = [k for k in differentiable(outs) if upstream[k] is not None]
    if not used:
        raise target.fail(check, f"{_whose(who)}output does not require grad{context}: is it computed from the inputs "
                                 "with differentiable ops (or a torch.autograd.Function)?")
    try:
        grads = torch.autograd.grad([outs[k] for k in used], [leaves[i] for i in wanted],
                                    [upstream[k].to(outs[k].dtype) for k in used],  # type: ignore[union-attr]
                                    allow_unused=True, retain_graph=retain_graph)
    except Exception as exc:  # noqa: BLE001
        text = raised(exc)
        shape = ("\n(a gradient must have exactly the shape of its input; reduce a broadcast gradient with "
                 ".sum(dim, keepdim=...) or .sum_to_size(input.shape))") if "shape" in str(exc) else ""
        raise target.fail(check, f"{_whose(who)}backward raised {text}{context}{shape}") from None
    return {i: (g.detach() if g is not None else None) for i, g in zip(wanted, grads)}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def unchanged(target: Target, before: Sequence[Any], after: Sequence[Any], what: str, check: str) -> None:
    """Fail ``check`` when a tensor in ``after`` no longer equals its copy in ``before`` (modified in place)."""
    __tracebackhide__ = True
    for i, (b, a) in enumerate(zip(before, after)):
        if isinstance(b, torch.Tensor) and not same(b, a.detach()):
            label = target.label(i) if what == "input" else f"output {i}"
            raise target.fail(check, f"{label} was modified in place by {check}: keep inputs and saved tensors as they "
                                     "are (clone before an in-place op, or declare it with ctx.mark_dirty)")
