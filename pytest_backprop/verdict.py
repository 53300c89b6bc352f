"""Verdicts: the one record that the terminal table, the JSON report and Gradescope all render."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

PASS, FAIL, SKIP, ERROR = "pass", "fail", "skip", "error"
#: The ``user_properties`` keys a test report carries its verdict and run warnings under (so that xdist
#: workers' verdicts reach the controller's table, JSON and Gradescope the same way).
VERDICT_PROPERTY = "backprop_verdict"
WARNINGS_PROPERTY = "backprop_warnings"
#: A verdict's place in the report (exercise, then backward order), computed where the verdict is made:
#: xdist's controller orders the table without importing the problem (or torch).
RANK_PROPERTY = "backprop_rank"


@dataclass(frozen=True)
class Diagnosis:
    """A hint code (``ok``, ``shape``, ``scale``, ...) and a message that names the fix."""

    code: str
    message: str


@dataclass(frozen=True)
class Location:
    """Where something is in the user's own code: a file and line, or a notebook cell and line,
    with the statement's source text. ``file`` is shown relative to the working directory.

    Example::

        Location(file="homework.py", line=21, source="dprobs = 1.0 / probs").describe()   # 'homework.py:21'
        Location(file="ninja.ipynb", cell=4, line=2).describe()                           # 'cell 4, line 2'
    """

    file: str | None = None
    line: int | None = None
    cell: int | None = None
    source: str | None = None

    def describe(self) -> str:
        """``homework.py:21``, ``cell 4, line 2``, or ``<unknown>``."""
        if self.cell is not None:
            return f"cell {self.cell}, line {self.line}" if self.line is not None else f"cell {self.cell}"
        if self.file is None:
            return "<unknown>"
        return f"{self.file}:{self.line}" if self.line is not None else self.file


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one gradient.

    ``status`` is ``pass``, ``fail``, ``skip`` (not attempted) or ``error`` (the code raised).
    ``exact`` and ``maxdiff`` compare with autograd in the run's dtype, like the lecture's ``cmp``;
    ``approximate`` is the verdict of the tolerance rule.
    """

    exercise: str
    tensor: str
    status: str
    exact: bool | None
    approximate: bool | None
    maxdiff: float | None
    expected_shape: tuple[int, ...]
    actual_shape: tuple[int, ...] | None
    diagnosis: Diagnosis
    atol: float | None = None
    mismatched: int | None = None
    numel: int | None = None
    worst_index: tuple[int, ...] | None = None
    line: str | None = None  # the forward line(s) reading the tensor, whose backward gives its gradient
    details: dict[str, Any] = field(default_factory=dict)
    location: Location | None = None  # the user's own statement(s) assigning the gradient (the first one)

    @property
    def key(self) -> str:
        """``ex1::counts_sum_inv``: the verdict's name in reports."""
        return f"{self.exercise}::{self.tensor}"

    def to_json(self) -> dict[str, Any]:
        """The JSON report's ``checks[]`` entry (see docs/reference.md for every field)."""
        data = asdict(self)
        data["expected_shape"] = list(self.expected_shape)
        data["actual_shape"] = None if self.actual_shape is None else list(self.actual_shape)
        data["worst_index"] = None if self.worst_index is None else list(self.worst_index)
        for key in ("maxdiff", "atol"):  # JSON has no NaN/inf: a non-finite answer's maxdiff is null
            if data[key] is not None and not math.isfinite(data[key]):
                data[key] = None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Verdict":
        """Inverse of :meth:`to_json` (used to gather verdicts from xdist workers)."""
        data = dict(data)
        data["diagnosis"] = Diagnosis(**data["diagnosis"])
        if data.get("location") is not None:
            data["location"] = Location(**data["location"])
        data["expected_shape"] = tuple(data["expected_shape"])
        for key in ("actual_shape", "worst_index"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def first_wrong(verdicts: Iterable[Verdict]) -> Verdict | None:
    """The first failing gradient in backward order that is its own fault.

    Example::

        first_wrong(verdicts).tensor   # 'bndiff2' (the ones below it that fail are inherited)
    """
    for v in verdicts:
        if v.status in ("fail", "error") and v.diagnosis.code != "inherited":
            return v
    return None
