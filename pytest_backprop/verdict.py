"""Verdicts: the one record that the terminal table, the JSON report and Gradescope all render."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

PASS, FAIL, SKIP, ERROR = "pass", "fail", "skip", "error"


@dataclass(frozen=True)
class Diagnosis:
    """A hint code (``ok``, ``shape``, ``scale``, ...) and a message that names the fix."""

    code: str
    message: str


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
        data["expected_shape"] = tuple(data["expected_shape"])
        for key in ("actual_shape", "worst_index"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)
