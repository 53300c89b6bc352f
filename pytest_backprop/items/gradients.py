"""The test items ``--backprop`` adds: ``backprop::ex1::counts_sum_inv`` and friends."""

from __future__ import annotations

from typing import Any

import pytest

from ..checks.session import KitState, get_state
from .base import VERDICT_PROPERTY, WARNINGS_PROPERTY, BackpropFailure


class GradientItem(pytest.Item):
    """One gradient of one exercise: passes, fails with a hint, or is skipped as not attempted."""

    def __init__(self, *, exercise: str, tensor: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.exercise, self.tensor = exercise, tensor

    @property
    def kit(self) -> KitState:
        state = get_state(self.config)
        assert state is not None
        return state

    def runtest(self) -> None:
        from ..report.text import render_verdict

        verdicts = self.kit.verdicts(self.exercise)
        verdict = next(v for v in verdicts if v.tensor == self.tensor)
        self.user_properties.append((VERDICT_PROPERTY, verdict.to_json()))
        warnings = [w.__dict__ for w in self.kit.run_warnings.get(self.exercise, [])]
        if warnings:
            self.user_properties.append((WARNINGS_PROPERTY, warnings))
        if verdict.status == "skip":
            pytest.skip(f"d{self.tensor}: {verdict.diagnosis.message}")
        if verdict.status in ("fail", "error"):
            raise BackpropFailure(render_verdict(verdict))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, BackpropFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"backprop::{self.exercise}::{self.tensor}"


class ExerciseCollector(pytest.Collector):
    """The gradients of one exercise."""

    def __init__(self, *, exercise: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.exercise = exercise

    def collect(self) -> list[pytest.Item]:
        from ..judge.grade import exercise_tensors

        state = get_state(self.config)
        spec = None if state is None or state.lecture else state.spec
        return [GradientItem.from_parent(self, name=t, exercise=self.exercise, tensor=t)
                for t in exercise_tensors(self.exercise, spec)]
