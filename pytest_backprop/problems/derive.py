"""Deriving a :class:`~pytest_backprop.problems.table.LineTable` from a parsed forward and example inputs.

The leaves are the forward's float tensor arguments; a line is differentiable when, run once on
the example inputs with gradients on, its output is a float tensor that requires grad. A line that
computes a constant (``mask = (z1 > 0).float()``) reads only constants and gets no gradient.

Example::

    table = derive_table(parse_forward(forward), inputs)
    table.leaves, table.constants   # ('x', 'W1', 'b1', 'W2', 'b2'), ('y', 'n')
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .errors import ProblemError
from .forward import check_loss, run_checked
from .parse import ParsedForward
from .table import Line, LineTable, backward_order, is_float_tensor


def derive_table(parsed: ParsedForward, inputs: Mapping[str, Any]) -> LineTable:
    """Classify the parsed forward's names by running it once on ``inputs`` (example inputs at the
    default sizes) with gradients on: the leaves are its float tensor arguments, a line is
    differentiable when its output requires grad. Then build the consumer graph and the default
    backward order (:func:`~pytest_backprop.problems.table.backward_order`).

    Example::

        table = derive_table(parse_forward(forward), spec.inputs())
    """
    leaves = tuple(a for a in parsed.arguments if is_float_tensor(inputs[a]))
    constants = tuple(a for a in parsed.arguments if a not in leaves)
    namespace: dict[str, Any] = {a: inputs[a] for a in constants}
    namespace.update({a: inputs[a].detach().clone().requires_grad_(True) for a in leaves})
    differentiable = set(leaves)
    lines: list[Line] = []
    with torch.enable_grad():
        for s in parsed.statements:
            line = Line(s.output, s.source, (), s.reads, s.location, s.code, parsed.env)
            value = run_checked(line, namespace)
            if isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point():
                differentiable.add(s.output)
                line = Line(s.output, s.source, tuple(r for r in s.reads if r in differentiable),
                            tuple(r for r in s.reads if r not in differentiable), s.location, s.code, parsed.env)
            lines.append(line)
    check_loss(namespace[parsed.loss], parsed.loss, where=parsed.return_location, source=parsed.return_source)
    gradients = [g for g in (*leaves, *(l.output for l in lines)) if g in differentiable and g != parsed.loss]
    readers = {name for line in lines for name in line.inputs}
    for name in gradients:
        if name not in readers:
            line = next((l for l in lines if l.output == name), None)
            if line is None and not any(name in s.reads for s in parsed.statements):
                raise ProblemError(f"forward takes the float tensor `{name}` but no line reads it: remove the "
                                   "argument (and the key make_inputs returns)", where=parsed.location,
                                   source=parsed.signature)
            raise ProblemError(f"`{name}` gets no gradient: the loss reads it only through operations that "
                               "do not differentiate (comparisons, argmax, .detach(), integer casts)",
                               where=line.location if line else parsed.location,
                               source=line.source if line else parsed.signature)
    return LineTable(tuple(lines), parsed.arguments, leaves, constants, parsed.loss, backward_order(lines, gradients))
