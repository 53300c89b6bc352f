"""The property test items ``--backprop`` adds under ``backprop::properties``.

- ``backprop::properties::ex1`` (and ``ex2``, ``ex3`` when the implementation offers them): the
  whole exercise on sizes and values hypothesis generates;
- ``backprop::properties::lines::<output>``: each ``backward_<output>`` function of a per-line
  module, with random upstream gradients;
- ``backprop::properties::broadcast::ex1`` and ``...::broadcast::<output>`` (``--backprop-broadcast``):
  the same with the parameters in every broadcasting pattern.

Settings: ``--backprop-examples N`` (0: no property items), ``--backprop-broadcast``; hypothesis's
own ``--hypothesis-seed`` picks the seed; with the environment variable ``CI`` set the examples are
derandomized. Each item appends its verdict to ``user_properties`` like the gradient items, so the
terminal table and the JSON report list it (exercise ``prop-ex1``, ``prop-lines``, ``bcast-ex1``, ...).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from ..checks.session import KitState, get_state
from .base import VERDICT_PROPERTY, BackpropFailure


def render_property(verdict: Any) -> str:
    """A failing property's report: the diagnosis, the smallest case, the line, how to reproduce."""
    lines = [f"{verdict.exercise} [{verdict.diagnosis.code}]: {verdict.diagnosis.message}"]
    details = verdict.details or {}
    if details.get("case"):
        lines.append(f"    failing case: {details['case']}")
    if verdict.line:
        lines.append(f"    backprop through: {verdict.line}")
    if details.get("reproduce"):
        lines.append(f"    {details['reproduce']}")
    if details.get("hypothesis"):
        lines.extend("    " + line for line in str(details["hypothesis"]).splitlines())
    return "\n".join(lines)


def _hypothesis_seed(config: pytest.Config) -> int | None:
    raw = config.getoption("hypothesis_seed", default=None)
    try:
        return int(raw) if raw not in (None, "") else None
    except (TypeError, ValueError):
        return None


class PropertyItem(pytest.Item):
    """One property: ``kind`` is ``ex1``, ``ex2``, ``ex3`` or ``line`` (then ``output`` names the line)."""

    def __init__(self, *, kind: str, output: str | None = None, broadcast: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.kind, self.output, self.broadcast = kind, output, broadcast

    @property
    def kit(self) -> KitState:
        state = get_state(self.config)
        assert state is not None
        return state

    def search(self) -> Any:
        from hypothesis import settings

        from ..properties.checks import Search

        seed = _hypothesis_seed(self.config)
        derandomize = bool(os.environ.get("CI")) or bool(settings.default.derandomize)
        timeout = self.kit.settings.timeout or None
        return Search(examples=self.kit.option("examples"), seed=seed, timeout=timeout,
                      derandomize=derandomize and seed is None)

    def _lecture_failures(self, exercise: str) -> set[str]:
        """Gradients that already fail (or raise) at the lecture's sizes: left to their own items."""
        try:
            return {v.tensor for v in self.kit.verdicts(exercise) if v.status in ("fail", "error")}
        except Exception:  # noqa: BLE001 -- the lecture's items report their own errors
            return set()

    def _attempted(self, exercise: str) -> bool:
        """Whether at least one gradient of ``exercise`` passes at the lecture's sizes."""
        try:
            return any(v.status == "pass" for v in self.kit.verdicts(exercise))
        except Exception:  # noqa: BLE001 -- the lecture's items report their own errors
            return False

    def _stopped(self, exercise: str) -> bool:
        """Whether the run at the lecture's sizes raised or timed out."""
        try:
            return any(v.status == "error" for v in self.kit.verdicts(exercise))
        except Exception:  # noqa: BLE001
            return True

    def verdict(self) -> Any:
        from ..problems.lecture import LINE_OF

        from ..judge.lines import check_line
        from ..properties import checks as P

        kit, impl, search = self.kit, self.kit.implementation, self.search()
        lecture = kit.problem.config
        label = ("bcast-" if self.broadcast else "prop-") + ("lines" if self.kind == "line" else self.kind)
        if self.kind == "line":
            fn = line_functions_of(impl).get(self.output)
            if fn is None:
                return P.skipped(label, self.output, f"no backward_{self.output}() found")
            values = kit.problem.truth.values
            if not check_line(fn, LINE_OF[self.output], values, timeout=search.timeout).passed:
                return P.skipped(label, self.output, f"backward_{self.output} already fails at the lecture's sizes "
                                                     f"(backprop::lines::{self.output}): fix that first")
            return P.line_property(fn, self.output, search=search, broadcast=self.broadcast,
                                   lecture_values=values, lecture=lecture)
        if self.kind in ("ex1", "ex2", "ex3") and self._stopped(self.kind):
            return P.skipped(label, "all", f"your code did not finish {self.kind} at the lecture's sizes "
                                           "(see its error): the property checks would only repeat that")
        if self.kind in ("ex1", "ex2", "ex3") and not self._attempted(self.kind):
            return P.skipped(label, "all", f"not attempted: no gradient of {self.kind} passes at the lecture's "
                                           "sizes yet, so there is nothing to generalise")
        if self.kind in ("ex2", "ex3"):
            tensor = "logits" if self.kind == "ex2" else "hprebn"
            if self._lecture_failures(self.kind):
                return P.skipped(label, tensor, f"d{tensor} already fails at the lecture's sizes "
                                                f"(backprop::{self.kind}::{tensor}): fix that first")
            if self.kind == "ex2":
                return P.cross_entropy_property(impl, search=search, lecture_passed=True)
            return P.batchnorm_property(impl, search=search, lecture=lecture, lecture_passed=True)
        return P.whole_backward(impl, "ex1", search=search, broadcast=self.broadcast, lecture=lecture,
                                lecture_failures=self._lecture_failures("ex1"))

    def runtest(self) -> None:
        from ..properties.checks import single_thread

        with single_thread():
            try:
                verdict = self.verdict()
            except Exception as exc:  # noqa: BLE001 -- a verdict, never a crash (flaky user code, a kit bug)
                verdict = self.error_verdict(exc)
        self.user_properties.append((VERDICT_PROPERTY, verdict.to_json()))
        if verdict.status == "skip":
            pytest.skip(verdict.diagnosis.message)
        if verdict.status in ("fail", "error"):
            raise BackpropFailure(render_property(verdict))

    def error_verdict(self, exc: BaseException) -> Any:
        """The verdict when the search itself could not finish (e.g. hypothesis saw flaky results)."""
        from hypothesis.errors import Flaky

        from ..verdict import Diagnosis, Verdict

        label = ("bcast-" if self.broadcast else "prop-") + ("lines" if self.kind == "line" else self.kind)
        if isinstance(exc, Flaky):
            code, message = "flaky", ("the same generated case failed once and passed when run again: does your "
                                      f"code use random numbers or keep state between runs? ({type(exc).__name__})")
        else:
            code, message = "exception", f"the property check could not run: {type(exc).__name__}: {exc}"
        return Verdict(label, self.output or "all", "error", None, None, None, (), None, Diagnosis(code, message))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, BackpropFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, self.nodeid


def line_functions_of(impl: Any, spec: Any = None) -> dict[str, Any]:
    """The ``backward_<output>`` functions an implementation offers (per-line modules, or modules with
    both), for the lines of ``spec`` (the lecture's by default)."""
    functions = getattr(impl, "functions", None)
    if isinstance(functions, dict):
        return dict(functions)
    module = getattr(impl, "module", None)
    if module is None:
        return {}
    from ..usercode.perline import line_functions

    return line_functions(module) if spec is None else line_functions(module, spec)


class LinesCollector(pytest.Collector):
    """``backprop::properties::lines``: one property per ``backward_<output>`` function."""

    def __init__(self, *, outputs: tuple[str, ...], broadcast: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.outputs, self.broadcast = outputs, broadcast

    def collect(self) -> list[pytest.Item]:
        return [PropertyItem.from_parent(self, name=o, kind="line", output=o, broadcast=self.broadcast)
                for o in self.outputs]


class BroadcastCollector(pytest.Collector):
    """``backprop::properties::broadcast``: Exercise 1 and the lines that read a parameter, in every pattern."""

    def collect(self) -> list[pytest.Node]:
        from ..properties.checks import BROADCAST_LINES

        state = get_state(self.config)
        impl = state.implementation
        children: list[pytest.Node] = []
        if "ex1" in state.exercises():
            children.append(PropertyItem.from_parent(self, name="ex1", kind="ex1", broadcast=True))
        functions = line_functions_of(impl)
        children += [PropertyItem.from_parent(self, name=o, kind="line", output=o, broadcast=True)
                     for o in BROADCAST_LINES if o in functions]
        return children


class PropertyCollector(pytest.Collector):
    """``backprop::properties``: the property checks for what the implementation offers."""

    def collect(self) -> list[pytest.Node]:
        state = get_state(self.config)
        assert state is not None
        impl = state.implementation  # None when it cannot be loaded: its items are then skipped
        offered = state.exercises()
        children: list[pytest.Node] = [PropertyItem.from_parent(self, name=ex, kind=ex)
                                       for ex in ("ex1", "ex2", "ex3") if ex in offered]
        functions = line_functions_of(impl)
        if functions:
            from ..problems.lecture import LINES

            outputs = tuple(line.output for line in reversed(LINES) if line.output in functions)
            children.append(LinesCollector.from_parent(self, name="lines", outputs=outputs))
        if state.option("broadcast"):
            children.append(BroadcastCollector.from_parent(self, name="broadcast"))
        return children
