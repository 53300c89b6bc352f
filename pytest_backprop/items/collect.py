"""The tree of built-in checks under ``backprop``: exercises, Exercise 4, properties."""

from __future__ import annotations

import pytest

from ..checks.session import get_state
from .gradients import ExerciseCollector


class BackpropCollector(pytest.Collector):
    """Root of the built-in checks, ``backprop``; its children are the exercises."""

    def collect(self) -> list[pytest.Collector]:
        state = get_state(self.config)
        assert state is not None
        children: list[pytest.Collector] = [ExerciseCollector.from_parent(self, name=ex, exercise=ex)
                                            for ex in state.collected_exercises()]
        from ..checks.exercise4 import wanted
        from .exercise4 import SgdCollector

        if wanted(state):
            children.append(SgdCollector.from_parent(self, name="ex4"))
        if state.option("examples") > 0 and state.lecture:  # hypothesis properties (issue 4)
            from .properties import PropertyCollector

            children.append(PropertyCollector.from_parent(self, name="properties"))
        elif state.option("examples") > 0:  # another problem: the properties derived from its spec (issue 16)
            from .problem_properties import ProblemPropertyCollector

            children.append(ProblemPropertyCollector.from_parent(self, name="properties"))
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

