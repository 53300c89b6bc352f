"""The line table of a forward pass: its lines, leaves, constants, loss, consumer graph and order.

A problem's ``forward`` is read by :func:`~pytest_backprop.problems.parse.parse_forward` and
classified by :func:`~pytest_backprop.problems.derive.derive_table` into a :class:`LineTable`:

- one :class:`Line` per assignment ``out = <expr>``: its output, its exact source text, the
  differentiable names it reads (``inputs``, in order of first appearance) and the other names it
  reads (``constants``); a ``return <expr>`` is the line ``loss = <expr>``;
- the leaves (arguments that are float tensors: they get gradients) and the constants (every other
  argument: ints, integer tensors, Python numbers);
- the consumer graph (:meth:`LineTable.consumers`, :meth:`LineTable.producer`) and the backward
  order the reports use (:func:`backward_order`, or the problem's ``ORDER``).

Example::

    table.line_of["probs"].inputs                   # ('counts', 'counts_sum_inv')
    [l.output for l in table.consumers("counts")]   # ['counts_sum', 'probs']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import CodeType
from typing import Any, Mapping, Sequence

from .errors import ProblemError


@dataclass(frozen=True)
class Line:
    """One line of the forward pass: ``output = <source right-hand side>``.

    Equality compares the four public fields; ``location`` (``file:line``), the compiled code and
    the globals it runs in are carried along for running it and for messages.
    """

    output: str
    source: str
    inputs: tuple[str, ...]  # differentiable names the line reads, in order of first appearance
    constants: tuple[str, ...] = ()  # the other names it reads (n, Xb, Yb), in order
    location: str = field(default="", compare=False)
    code: CodeType | None = field(default=None, compare=False, repr=False)
    env: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def differentiable(self) -> bool:
        """Whether a gradient flows through the line (its output gets one, its inputs receive one)."""
        return bool(self.inputs)


@dataclass(frozen=True)
class LineTable:
    """A forward pass as a table: every line in order, the leaves and constants, the loss, the order.

    Example::

        table.lines[-1].output          # 'loss'
        table.order[:3]                 # ('logprobs', 'probs', 'counts_sum_inv')
        table.consumers("counts")       # the lines counts_sum and probs
        table.producer("W1")            # None: a leaf
    """

    lines: tuple[Line, ...]
    arguments: tuple[str, ...]  # forward's arguments, in its signature's order
    leaves: tuple[str, ...]  # arguments that are float tensors: they get gradients
    constants: tuple[str, ...]  # every other argument
    loss: str
    order: tuple[str, ...]  # every name that gets a gradient (leaves and intermediates), backward order
    line_of: Mapping[str, Line] = field(init=False, repr=False, compare=False)
    _consumers: Mapping[str, tuple[Line, ...]] = field(init=False, repr=False, compare=False)
    _intermediates: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "line_of", {line.output: line for line in self.lines})
        readers: dict[str, list[Line]] = {}
        for line in self.lines:
            for name in line.inputs:
                readers.setdefault(name, []).append(line)
        object.__setattr__(self, "_consumers", {k: tuple(v) for k, v in readers.items()})
        object.__setattr__(self, "_intermediates", tuple(line.output for line in self.lines
                                                         if line.differentiable and line.output != self.loss))

    def consumers(self, tensor: str) -> tuple[Line, ...]:
        """The lines that read ``tensor`` (differentiably); its gradient is the sum of their contributions."""
        return self._consumers.get(tensor, ())

    def producer(self, tensor: str) -> Line | None:
        """The line that computes ``tensor``, or None for an argument."""
        return self.line_of.get(tensor)

    @property
    def intermediates(self) -> tuple[str, ...]:
        """Line outputs that get a gradient (every differentiable line but the loss), forward order."""
        return self._intermediates

    @property
    def differentiable_lines(self) -> tuple[Line, ...]:
        """The lines a gradient flows through (the per-line checks' lines), forward order."""
        return tuple(line for line in self.lines if line.differentiable)


def backward_order(lines: Sequence[Line], gradients: Sequence[str]) -> tuple[str, ...]:
    """The default backward order: walking the lines from the last to the first, a tensor is listed
    as soon as its gradient is complete -- right after the earliest line that reads it -- and the
    tensors one line completes are listed in the order the line reads them.

    So every gradient comes after the gradients of all the lines that read it (what a hand-written
    backward needs), leaves come right after the line that last needs them, and a line's output
    comes before its inputs.

    Example::

        backward_order(table.lines, table.order)[:4]   # ('logprobs', 'probs', 'counts_sum_inv', 'counts_sum')
    """
    key: dict[str, tuple[int, int]] = {}
    for index, line in enumerate(lines):
        for position, name in enumerate(line.inputs):
            key.setdefault(name, (-index, position))
    return tuple(sorted(gradients, key=lambda name: key[name]))


def check_order(order: Sequence[str], table_lines: Sequence[Line], gradients: Sequence[str], *,
                where: str = "") -> tuple[str, ...]:
    """A problem's own ``ORDER``: every gradient once, each after the outputs of the lines reading it."""
    order = tuple(order)
    missing = [g for g in gradients if g not in order]
    extra = [o for o in order if o not in gradients]
    twice = sorted({o for o in order if order.count(o) > 1})
    if missing or extra or twice:
        parts = [f"misses {', '.join(missing)}" if missing else "",
                 f"names {', '.join(extra)}, which get no gradient" if extra else "",
                 f"lists {', '.join(twice)} twice" if twice else ""]
        raise ProblemError(f"ORDER {'; '.join(p for p in parts if p)} (the gradients are: {', '.join(gradients)})",
                           where=where)
    position = {name: i for i, name in enumerate(order)}
    for line in table_lines:
        if line.output not in position:
            continue  # the loss
        for name in line.inputs:
            if position[name] < position[line.output]:
                raise ProblemError(f"ORDER lists {name} before {line.output}, whose gradient d{name} needs "
                                   f"(`{line.source}` reads {name})", where=where)
    return order


def is_float_tensor(value: Any) -> bool:
    """A float tensor: a leaf when it is an argument, a differentiable output when it requires grad."""
    return hasattr(value, "is_floating_point") and value.is_floating_point()
