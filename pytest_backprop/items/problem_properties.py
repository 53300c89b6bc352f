"""The property items of a problem other than the lecture's (``--backprop-problem``), derived from
its spec (:mod:`pytest_backprop.properties.problem`):

- ``backprop::properties::ex1``: the whole backward on sizes drawn from the problem's ``SIZE_RANGES``;
- ``backprop::properties::lines::<output>``: each ``backward_<output>`` function of a per-line module.

They report like the lecture's property items (exercise ``prop-ex1``, ``prop-lines``).
"""

from __future__ import annotations

from typing import Any

import pytest

from ..checks.session import get_state
from .properties import PropertyItem, line_functions_of


class ProblemPropertyItem(PropertyItem):
    """One derived property: ``kind`` is ``ex1`` or ``line`` (then ``output`` names the line)."""

    def verdict(self) -> Any:
        from ..properties import checks as P
        from ..properties.problem import spec_line_property, spec_whole_backward

        kit, search = self.kit, self.search()
        spec = kit.spec
        if self.kind == "line":
            failing = {v.tensor for v in kit.verdicts("lines") if v.status in ("fail", "error")}
            fn = line_functions_of(kit.implementation, spec).get(self.output)
            if fn is None:
                return P.skipped("prop-lines", self.output, f"no backward_{self.output}() found")
            if self.output in failing:
                return P.skipped("prop-lines", self.output, f"backward_{self.output} already fails at the default "
                                                            f"sizes (backprop::lines::{self.output}): fix that first")
            return spec_line_property(fn, spec, self.output, search=search)
        if self._stopped("ex1"):
            return P.skipped("prop-ex1", "all", "your code did not finish at the default sizes (see its error): "
                                                "the property checks would only repeat that")
        if not self._attempted("ex1"):
            return P.skipped("prop-ex1", "all", "not attempted: no gradient passes at the default sizes yet, so "
                                                "there is nothing to generalise")
        return spec_whole_backward(kit.implementation, spec, search=search,
                                   ignore=frozenset(self._lecture_failures("ex1")))


class ProblemLinesCollector(pytest.Collector):
    """``backprop::properties::lines``: one derived property per ``backward_<output>`` function."""

    def __init__(self, *, outputs: tuple[str, ...], **kwargs: Any):
        super().__init__(**kwargs)
        self.outputs = outputs

    def collect(self) -> list[pytest.Item]:
        return [ProblemPropertyItem.from_parent(self, name=o, kind="line", output=o) for o in self.outputs]


class ProblemPropertyCollector(pytest.Collector):
    """``backprop::properties`` for another problem: the derived checks for what the implementation offers."""

    def collect(self) -> list[pytest.Node]:
        state = get_state(self.config)
        assert state is not None
        children: list[pytest.Node] = []
        if "ex1" in state.exercises():
            children.append(ProblemPropertyItem.from_parent(self, name="ex1", kind="ex1"))
        functions = line_functions_of(state.implementation, state.spec)
        outputs = tuple(line.output for line in reversed(state.spec.lines) if line.output in functions)
        if outputs:
            children.append(ProblemLinesCollector.from_parent(self, name="lines", outputs=outputs))
        return children
