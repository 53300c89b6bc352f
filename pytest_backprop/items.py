"""The test items ``--backprop`` adds: ``backprop::ex1::counts_sum_inv`` and friends."""

from __future__ import annotations

from typing import Any

import pytest

from .state import KitState, get_state

VERDICT_PROPERTY = "backprop_verdict"
WARNINGS_PROPERTY = "backprop_warnings"


class BackpropFailure(Exception):
    """Raised by a gradient item whose verdict is fail or error; carries the rendered verdict."""


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
        from .report import render_verdict

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
        from .checks import EXERCISE_TENSORS

        return [GradientItem.from_parent(self, name=t, exercise=self.exercise, tensor=t)
                for t in EXERCISE_TENSORS[self.exercise]]


class BackpropCollector(pytest.Collector):
    """Root of the built-in checks, ``backprop``; its children are the exercises."""

    def collect(self) -> list[pytest.Collector]:
        state = get_state(self.config)
        assert state is not None
        children: list[pytest.Collector] = [ExerciseCollector.from_parent(self, name=ex, exercise=ex)
                                            for ex in state.exercises()]
        from .exercise4 import SgdCollector, wanted  # Exercise 4 (issue 5)

        if wanted(state):
            children.append(SgdCollector.from_parent(self, name="ex4"))
        if state.option("examples") > 0:  # hypothesis properties (issue 4)
            from .property_items import PropertyCollector

            children.append(PropertyCollector.from_parent(self, name="properties"))
        return children


def collect_builtin_items(session: pytest.Session) -> list[pytest.Item]:
    """All built-in items, to be put in front of the user's own tests.

    Each collector's report goes through the ``pytest_collectreport`` hook, so the terminal's
    "collected N items" counts them and ``--collect-only`` lists them like any other test.
    """
    from _pytest.reports import CollectReport

    def flatten(node: pytest.Collector) -> list[pytest.Item]:
        children = node.collect()
        session.ihook.pytest_collectreport(report=CollectReport(node.nodeid, "passed", None, children))
        items: list[pytest.Item] = []
        for child in children:
            if isinstance(child, pytest.Item):
                session.ihook.pytest_itemcollected(item=child)
                items.append(child)
            else:
                items.extend(flatten(child))
        return items

    return flatten(BackpropCollector.from_parent(session, name="backprop", nodeid="backprop"))
