"""Running a line table: the reference forward, one line's VJP, and the autograd truth.

Every line runs its exact source text (compiled once when the table is derived) in the globals of
the module that defines the forward, so ``torch``, ``F`` or a helper of that module mean what they
mean there.

Example::

    values = run_table(table, inputs)                     # every tensor by name, loss included
    truth = autograd_truth(table, inputs, dtype=torch.float64)
    truth.grads["W1"]                                     # autograd's dW1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from types import CodeType
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .errors import ProblemError
from .table import Line, LineTable

#: Globals of a :class:`~pytest_backprop.problems.table.Line` built by hand (no forward module).
DEFAULT_ENV: dict[str, Any] = {"torch": torch, "F": F}


@lru_cache(maxsize=None)
def _compiled(source: str) -> CodeType:
    return compile(source, f"<forward: {source}>", "exec")


def run_line(line: Line, namespace: dict) -> Any:
    """Execute one line's exact source text in ``namespace`` and return its output.

    Example::

        run_line(table.line_of["probs"], values)   # counts * counts_sum_inv, also stored in values["probs"]
    """
    exec(line.code or _compiled(line.source), line.env if line.env is not None else DEFAULT_ENV, namespace)  # noqa: S102
    return namespace[line.output]


def run_table(table: LineTable, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Run every line on ``inputs`` and return every value by name (arguments and loss included).

    Tensors keep whatever autograd history ``inputs`` gives them.
    """
    namespace: dict[str, Any] = dict(inputs)
    for line in table.lines:
        run_line(line, namespace)
    return namespace


def run_checked(line: Line, namespace: dict[str, Any]) -> Any:
    """Run one line of a problem's forward; an exception becomes a :class:`ProblemError` naming it."""
    try:
        return run_line(line, namespace)
    except Exception as exc:  # noqa: BLE001 -- the problem author's line: report it, with its site
        raise ProblemError(f"raised {type(exc).__name__}: {exc}", where=line.location, source=line.source) from exc


def check_loss(loss: Any, name: str, *, where: str, source: str) -> None:
    """The loss must be a float tensor with one element that depends on a leaf (checked when run)."""
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        got = loss.dtype if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ProblemError(f"forward must return the scalar loss, a float tensor; `{name}` is {got}",
                           where=where, source=source)
    if loss.numel() != 1:
        raise ProblemError(f"forward must return a scalar loss; `{name}` has shape {tuple(loss.shape)} "
                           "(reduce it, e.g. with .mean() or .sum())", where=where, source=source)
    if not loss.requires_grad:
        raise ProblemError("the loss depends on no float tensor input, so nothing gets a gradient",
                           where=where, source=source)


@dataclass(frozen=True)
class Truth:
    """The forward values (detached) and autograd's gradient of every leaf and intermediate, in one dtype."""

    dtype: torch.dtype
    values: dict[str, Any]  # every line output and argument, detached
    grads: dict[str, torch.Tensor]  # every gradient, keyed by tensor name
    loss: float = field(default=float("nan"))


def autograd_truth(table: LineTable, inputs: Mapping[str, Any], *, dtype: torch.dtype = torch.float32) -> Truth:
    """Autograd's gradients of every leaf and intermediate: the leaves cast to ``dtype``,
    ``retain_grad`` on every differentiable line, then ``loss.backward()``.

    A line that raises, a loss that is not a scalar, or a tensor that gets no gradient is a
    :class:`~pytest_backprop.problems.table.ProblemError` naming the line.

    Example::

        t = autograd_truth(table, inputs, dtype=torch.float64)
        t.grads["counts_sum_inv"].shape   # torch.Size([32, 1])
    """
    leaves = set(table.leaves)
    retained = set(table.intermediates)
    namespace: dict[str, Any] = {k: (v.detach().to(dtype).requires_grad_(True) if k in leaves else v)
                                 for k, v in inputs.items()}
    with torch.enable_grad():
        line = table.lines[0]
        try:
            for line in table.lines:
                out = run_line(line, namespace)
                if line.output in retained and out.requires_grad:
                    out.retain_grad()
        except Exception as exc:  # noqa: BLE001 -- the problem author's line: report it, with its site
            raise ProblemError(f"raised {type(exc).__name__}: {exc}", where=line.location, source=line.source) from exc
        loss_line = table.line_of[table.loss]
        loss = namespace[table.loss]
        check_loss(loss, table.loss, where=loss_line.location, source=loss_line.source)
        loss.backward()
    grads = {}
    for name in table.order:
        grad = namespace[name].grad
        if grad is None:
            line = table.producer(name)
            raise ProblemError(f"`{name}` got no gradient from loss.backward() at these inputs",
                               where=line.location if line else "", source=line.source if line else "")
        grads[name] = grad.detach()
    values = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in namespace.items()}
    return Truth(dtype, values, grads, float(loss.detach()))


def line_vjp(line: Line, values: Mapping[str, Any], upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autograd's vector-Jacobian product of one line: the contribution of ``upstream`` (the gradient
    of ``line.output``) to the gradient of each of the line's inputs.

    ``values`` holds the line's inputs and constants. Used for per-line checks, for
    ``missing_branch`` hints and for chaining per-line answers.

    Example::

        vjp = line_vjp(table.line_of["probs"], values, dprobs)
        vjp["counts"], vjp["counts_sum_inv"]   # counts_sum_inv * dprobs, (counts * dprobs).sum(1, keepdim=True)
    """
    namespace: dict = {k: values[k] for k in line.constants}
    leaves = {k: values[k].detach().clone().requires_grad_(True) for k in line.inputs}
    namespace.update(leaves)
    with torch.enable_grad():
        out = run_line(line, namespace)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=upstream.to(out.dtype), allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(leaves[k])).detach() for k, g in zip(leaves, grads)}
