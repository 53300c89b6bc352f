"""Finite differences in float64, aware of kinks.

``torch.autograd.gradcheck`` compares the whole Jacobian with central differences. At a corner of
the function (ReLU or ``abs`` at 0, a tie in ``max``) a central difference is the average of the two
sides, which no backward returns, so gradcheck fails a correct Function there. Here each element's
derivative is measured from both sides: where the sides agree the function is smooth and the
gradient must match; where they differ it is a kink, and any value between the two one-sided
derivatives (a subgradient) is right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .calls import as_tuple

#: torch.autograd.gradcheck's defaults: step, absolute and relative tolerance.
EPS, ATOL, RTOL = 1e-6, 1e-5, 1e-3
GRADCHECK_RULE = f"gradcheck default: finite differences in float64, eps {EPS:g}"


def objective(fn: Callable[..., Any], args: Sequence[Any], upstream: Sequence[torch.Tensor | None]) -> float:
    """``sum(upstream * fn(*args))`` in float64, without autograd."""
    with torch.no_grad():
        outs = as_tuple(fn(*args))
    total = 0.0
    for o, g in zip(outs, upstream):
        if g is not None and isinstance(o, torch.Tensor) and o.is_floating_point():
            total += float((o.double() * g.double()).sum())
    return total


@dataclass(frozen=True)
class Sides:
    """One-sided derivatives of the objective along some elements of one input (flattened order)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def central(self) -> torch.Tensor:
        return (self.left + self.right) / 2

    def kink(self) -> torch.Tensor:
        """Where the two sides disagree beyond finite differences' own error: a corner."""
        return ~agrees(self.left, self.right)

    def accepts(self, value: torch.Tensor) -> torch.Tensor:
        """Where ``value`` is a valid derivative: the central one at smooth points, between the sides at kinks."""
        lo, hi = torch.minimum(self.left, self.right), torch.maximum(self.left, self.right)
        slack = ATOL + RTOL * torch.maximum(lo.abs(), hi.abs())
        return (value >= lo - slack) & (value <= hi + slack)


def agrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gradcheck's test, elementwise: ``|a - b| <= atol + rtol * |b|``."""
    return (a - b).abs() <= ATOL + RTOL * b.abs()


def sides(fn: Callable[..., Any], args: Sequence[Any], i: int, upstream: Sequence[torch.Tensor | None],
          positions: Sequence[int] | None = None) -> Sides:
    """One-sided derivatives of ``sum(upstream * fn(*args))`` w.r.t. elements of ``args[i]`` (float64).

    The step is ``EPS * max(1, |x|)``. ``positions`` (flat indices) default to every element.
    """
    base = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    x = base[i].contiguous()
    base[i] = x
    flat = x.view(-1)
    where = range(flat.numel()) if positions is None else positions
    f0 = objective(fn, base, upstream)
    left, right = [], []
    for k in where:
        old = float(flat[k])
        h = EPS * max(1.0, abs(old))
        flat[k] = old + h
        plus = objective(fn, base, upstream)
        flat[k] = old - h
        minus = objective(fn, base, upstream)
        flat[k] = old
        left.append((f0 - minus) / h)
        right.append((plus - f0) / h)
    return Sides(torch.tensor(left, dtype=torch.float64), torch.tensor(right, dtype=torch.float64))


def gradcheck_failure(fn: Callable[..., Any], leaves64: Sequence[Any], *, atol: float = ATOL,
                      rtol: float = RTOL) -> tuple[str, str] | None:
    """Run ``torch.autograd.gradcheck`` (its defaults); None when it passes, else (kind, message).

    ``kind`` is ``"jacobian"`` for a value mismatch (which may be a kink: see :func:`sides`) and
    ``"other"`` for the rest (undefined gradients, a backward that is not reentrant, ...).
    """
    from torch.autograd.gradcheck import GradcheckError

    try:
        torch.autograd.gradcheck(fn, tuple(leaves64), eps=EPS, atol=atol, rtol=rtol, raise_exception=True)
        return None
    except GradcheckError as exc:
        text = str(exc)
        return ("jacobian" if text.startswith("Jacobian mismatch") else "other"), text
    except Exception as exc:  # noqa: BLE001 -- e.g. a Function that only works in float32
        return "other", f"{type(exc).__name__}: {exc}"
