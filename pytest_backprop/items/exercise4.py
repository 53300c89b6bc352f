"""``backprop::ex4::sgd``: the Exercise 4 check (:mod:`pytest_backprop.checks.exercise4`) as a test item."""

from __future__ import annotations

from typing import Any

import pytest

from ..checks.exercise4 import EXERCISE, TENSOR, kit_sgd_result
from ..checks.session import get_state
from ..verdict import ERROR, FAIL, SKIP
from .base import VERDICT_PROPERTY, WARNINGS_PROPERTY, BackpropFailure


class SgdItem(pytest.Item):
    """``backprop::ex4::sgd``: the Exercise 4 check as one test item."""

    def runtest(self) -> None:
        kit = get_state(self.config)
        assert kit is not None
        result = kit_sgd_result(kit)
        self.user_properties.append((VERDICT_PROPERTY, result.verdict.to_json()))
        warnings = [w.__dict__ for w in kit.run_warnings.get(EXERCISE, [])]
        if warnings:
            self.user_properties.append((WARNINGS_PROPERTY, warnings))
        verdict = result.verdict
        if verdict.status == SKIP:
            pytest.skip(f"ex4: {verdict.diagnosis.message}")
        if verdict.status in (FAIL, ERROR):
            raise BackpropFailure(f"Exercise 4 [{verdict.diagnosis.code}]: {verdict.diagnosis.message}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, BackpropFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"backprop::{EXERCISE}::{TENSOR}"


class SgdCollector(pytest.Collector):
    """``backprop::ex4``: collected when the implementation answers Exercise 1 and --backprop-steps > 0."""

    def collect(self) -> list[pytest.Item]:
        return [SgdItem.from_parent(self, name=TENSOR)]
