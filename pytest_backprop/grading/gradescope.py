"""Grading: points, hidden checks and Gradescope's ``results.json`` (``--backprop-gradescope PATH``).

Every test of the session becomes one Gradescope test case: the built-in gradient checks (rendered
from the same :class:`~pytest_backprop.verdict.Verdict` records as the terminal table and the JSON
report) and the instructor's own tests. Points:

- built-in checks: 1 point each, changed with ``backprop_points`` (ini) / ``--backprop-points``, a
  list of ``PATTERN=POINTS`` entries, e.g. ``ex1=1 ex2=3 ex1::b1=2``. A pattern is matched against
  the check's key (its node id without ``backprop::``, e.g. ``ex1::b1``); an exercise name alone
  (``ex1``) means all of its checks (``ex1::*``); glob patterns (``*``, ``?``) work. An exact key wins
  over patterns; among patterns the last one that matches wins;
- the instructor's tests: ``@pytest.mark.backprop_points(2)`` (default 1; ``backprop_points`` entries
  matching their node id apply too, the marker wins);
- ``@pytest.mark.backprop_hidden`` (or ``backprop_hidden(visibility="after_due_date")``) and the
  ``backprop_hidden`` setting (patterns, optionally ``=VISIBILITY``) set Gradescope's visibility.

A submission that cannot run still yields a valid file: usage errors, collection errors, internal
errors and an implementation that cannot be loaded all become visible failed test cases, and
``python -m pytest_backprop.gradescope --ensure PATH`` (for ``run_autograder``) writes a valid file
if pytest itself died before writing one.

This module imports neither torch nor hypothesis.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pytest

from .. import options
from ..markers import HIDDEN_MARKER, MARKERS, POINTS_MARKER, add_marker_lines  # noqa: F401 -- defined once, cheap to import

POINTS_PROPERTY = "backprop_points"
VISIBILITY_PROPERTY = "backprop_visibility"
MARKER_ERROR_PROPERTY = "backprop_marker_error"
VISIBILITIES = ("hidden", "after_due_date", "after_published", "visible")
DEFAULT_POINTS = 1.0
MAX_OUTPUT = 8000  # characters of one test's output; Gradescope shows long outputs poorly
BUILTIN_PREFIX = "backprop::"


def register_markers(config: pytest.Config) -> None:
    """Register the grading markers, so that ``--strict-markers`` accepts them (always, even without
    ``--backprop``).

    Example::

        def pytest_configure(config):
            register_markers(config)   # what the plugin does
    """
    add_marker_lines(config)


# --- the points and visibility settings -------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One ``PATTERN=VALUE`` entry of ``backprop_points`` or ``backprop_hidden``."""

    pattern: str
    value: Any

    @property
    def exact(self) -> bool:
        return not any(c in self.pattern for c in "*?[")

    def matches(self, key: str) -> bool:
        return fnmatch.fnmatchcase(key, self.pattern)


def _entries(text: str | Sequence[str] | None) -> list[str]:
    if not text:
        return []
    if not isinstance(text, str):
        text = " ".join(str(t) for t in text)
    return [e for e in text.replace(",", " ").split() if e]


def _pattern(raw: str) -> str:
    # "ex1" alone means every check of exercise 1.
    if "::" not in raw and "/" not in raw and not raw.endswith(".py") and not any(c in raw for c in "*?["):
        return f"{raw}::*"
    return raw


def parse_points(text: str | Sequence[str] | None) -> list[Rule]:
    """Parse ``backprop_points``: whitespace- or comma-separated ``PATTERN=POINTS`` entries.

    Example::

        rules = parse_points("ex1=1 ex2=3 ex1::b1=2")
        points_for("ex1::b1", rules)   # 2.0
        points_for("ex1::h", rules)    # 1.0
    """
    rules = []
    for entry in _entries(text):
        pattern, sep, value = entry.rpartition("=")
        if not sep or not pattern:
            raise pytest.UsageError(f"backprop_points: {entry!r} is not PATTERN=POINTS "
                                    "(e.g. backprop_points = ex1=1 ex2=3 ex1::b1=2)")
        try:
            points = float(value)
        except ValueError:
            points = float("nan")
        if not math.isfinite(points) or points < 0:
            raise pytest.UsageError(f"backprop_points: {entry!r}: points must be a number >= 0, got {value!r}")
        rules.append(Rule(_pattern(pattern), points))
    return rules


def parse_hidden(text: str | Sequence[str] | None) -> list[Rule]:
    """Parse ``backprop_hidden``: ``PATTERN`` (hidden) or ``PATTERN=VISIBILITY`` entries.

    Example::

        rules = parse_hidden("ex3 ex1::b1=after_due_date")
        visibility_for("ex3::hprebn", rules)   # "hidden"
    """
    rules = []
    for entry in _entries(text):
        pattern, sep, value = entry.partition("=")
        value = value if sep else "hidden"
        if not pattern or value not in VISIBILITIES:
            raise pytest.UsageError(f"backprop_hidden: {entry!r}: expected PATTERN or PATTERN=VISIBILITY with "
                                    f"VISIBILITY one of {', '.join(VISIBILITIES)}")
        rules.append(Rule(_pattern(pattern), value))
    return rules


def _lookup(key: str, rules: Iterable[Rule], default: Any) -> Any:
    rules = list(rules)
    for rule in rules:
        if rule.exact and rule.pattern == key:
            return rule.value
    found = default
    for rule in rules:
        if rule.matches(key):
            found = rule.value
    return found


def points_for(key: str, rules: Iterable[Rule], default: float = DEFAULT_POINTS) -> float:
    """Points of the check or test ``key`` (``ex1::b1``, or a node id): exact entry, else the last
    matching pattern, else ``default``.

    Example::

        points_for("ex1::C", parse_points("ex1=1 ex1::C=2"))   # 2.0
    """
    return float(_lookup(key, rules, default))


def visibility_for(key: str, rules: Iterable[Rule], default: str = "visible") -> str:
    """Gradescope visibility of ``key`` under the ``backprop_hidden`` rules.

    Example::

        visibility_for("properties::ex1", parse_hidden("properties::*"))   # "hidden"
    """
    return str(_lookup(key, rules, default))


def check_key(nodeid: str) -> str:
    """The key points patterns match: ``ex1::b1`` for ``backprop::ex1::b1``, else the node id.

    Example::

        check_key("backprop::ex1::b1")        # "ex1::b1"
        check_key("tests/test_hw.py::test_a")  # unchanged
    """
    return nodeid[len(BUILTIN_PREFIX):] if nodeid.startswith(BUILTIN_PREFIX) else nodeid


def marker_points(item: pytest.Item) -> float | None:
    """Points given by ``@pytest.mark.backprop_points(n)`` on ``item`` (closest marker), or None.

    Raises ValueError with a clear message for a malformed marker.

    Example::

        @pytest.mark.backprop_points(2)
        def test_worth_two(): ...          # marker_points(item) == 2.0
    """
    marker = item.get_closest_marker(POINTS_MARKER)
    if marker is None:
        return None
    value = marker.args[0] if marker.args else marker.kwargs.get("points")
    if len(marker.args) > 1 or (value is None) or isinstance(value, bool):
        raise ValueError(f"@pytest.mark.{POINTS_MARKER} takes one number, e.g. @pytest.mark.{POINTS_MARKER}(2); "
                         f"got args={marker.args!r} kwargs={marker.kwargs!r}")
    try:
        points = float(value)
    except (TypeError, ValueError):
        points = float("nan")
    if not math.isfinite(points) or points < 0:
        raise ValueError(f"@pytest.mark.{POINTS_MARKER}: points must be a number >= 0, got {value!r}")
    return points


def marker_visibility(item: pytest.Item) -> str | None:
    """Visibility given by ``@pytest.mark.backprop_hidden`` on ``item``, or None.

    Example::

        @pytest.mark.backprop_hidden(visibility="after_due_date")
        def test_later(): ...              # marker_visibility(item) == "after_due_date"
    """
    marker = item.get_closest_marker(HIDDEN_MARKER)
    if marker is None:
        return None
    value = marker.args[0] if marker.args else marker.kwargs.get("visibility", "hidden")
    if value not in VISIBILITIES:
        raise ValueError(f"@pytest.mark.{HIDDEN_MARKER}: visibility must be one of {', '.join(VISIBILITIES)}; "
                         f"got {value!r}")
    return value


# --- results.json -----------------------------------------------------------------------------

@dataclass
class Case:
    """One Gradescope test case, before it is written."""

    name: str
    max_score: float
    passed: bool
    output: str
    visibility: str = "visible"
    tags: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The ``tests[]`` entry of Gradescope's results.json."""
        output = self.output if len(self.output) <= MAX_OUTPUT else self.output[:MAX_OUTPUT] + "\n... (truncated)"
        data = {"name": self.name, "score": _num(self.max_score if self.passed else 0.0),
                "max_score": _num(self.max_score), "status": "passed" if self.passed else "failed",
                "output": output, "visibility": self.visibility}
        if self.tags:
            data["tags"] = list(self.tags)
        return data


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(float(x), 6)


def results_json(cases: Sequence[Case], *, output: str, execution_time: float,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gradescope's results.json as a dict: ``score`` (sum of the cases), ``execution_time``,
    ``output``, ``tests``.

    Example::

        results_json([Case("ex1: dlogprobs", 1, True, "ok")], output="", execution_time=1.0)["score"]  # 1
    """
    score = sum(c.max_score for c in cases if c.passed)
    return {"score": _num(score), "execution_time": round(max(execution_time, 0.0), 3), "output": output,
            "output_format": "text", "test_output_format": "text",
            "tests": [c.to_json() for c in cases],
            "extra_data": {"max_score": _num(sum(c.max_score for c in cases)), **(extra or {})}}


def crash_results(message: str, *, execution_time: float = 0.0) -> dict[str, Any]:
    """A valid results.json for a run that produced nothing else: one visible failed test, score 0.

    Example::

        crash_results("pytest was killed")["score"]   # 0
    """
    case = Case("The autograder could not run your submission", 0.0, False, message)
    return results_json([case], output=message, execution_time=execution_time, extra={"crashed": True})


def write_results(path: str | Path, data: dict[str, Any]) -> None:
    """Write results.json atomically (a reader never sees half a file), creating parent folders.

    Example::

        write_results("out/results.json", crash_results("no submission"))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_valid_results(path: str | Path) -> bool:
    """Whether ``path`` holds a results.json Gradescope can read (score and tests well formed).

    Example::

        is_valid_results("results.json")   # False for a missing or half-written file
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or not isinstance(data.get("tests", []), list):
        return False
    if "score" in data and not isinstance(data["score"], (int, float)):
        return False
    return all(isinstance(t, dict) and isinstance(t.get("max_score", 0), (int, float)) for t in data.get("tests", []))


def ensure_results(path: str | Path, *, log: str | Path | None = None, tail: int = 3000) -> bool:
    """Write a crash results.json at ``path`` unless a valid one is there; True when it wrote one.

    For ``run_autograder``: pytest killed by a segfault, ``os._exit`` or an out-of-memory kill
    writes nothing, so the grader calls this afterwards; ``log`` (pytest's captured output) is
    quoted in the message.

    Example::

        ensure_results("/autograder/results/results.json", log="pytest.log")   # True: it wrote one
    """
    if is_valid_results(path):
        return False
    message = "The autograder stopped before it could grade your submission (a crash or a time-out)."
    if log is not None:
        try:
            text = Path(log).read_text(errors="replace")
            message += "\n\nThe last lines of its output:\n" + text[-tail:]
        except OSError:
            pass
    write_results(path, crash_results(message))
    return True


# --- the reporter: pytest hooks -----------------------------------------------------------------

@dataclass
class Outcome:
    """Everything reported for one test item (all phases)."""

    nodeid: str
    passed: bool = True
    skipped: bool = False
    texts: list[str] = field(default_factory=list)
    properties: dict[str, Any] = field(default_factory=dict)
    verdict_key: str | None = None


class GradescopeReporter:
    """Hooks registered with ``--backprop-gradescope``: gathers reports, writes results.json at the end.

    Works with ``--backprop`` off too: then only the instructor's own tests are graded.
    """

    def __init__(self, config: pytest.Config, path: str):
        self.config = config
        self.path = Path(path).resolve()  # pytest chdirs back before sessionfinish; resolve now
        self.started = time.monotonic()
        self.outcomes: dict[str, Outcome] = {}
        self.problems: list[Case] = []  # usage, collection and internal errors
        self.exitstatus: int | None = None
        self.written = False
        self.summary: str | None = None
        self.point_rules = parse_points(options.get(config, "points"))
        self.hidden_rules = parse_hidden(options.get(config, "hidden"))

    # Annotate every item with its points and visibility (runs on xdist workers too).
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Any) -> None:
        key = check_key(item.nodeid)
        try:
            points = marker_points(item)
            visibility = marker_visibility(item)
        except ValueError as exc:
            item.user_properties.append((MARKER_ERROR_PROPERTY, str(exc)))
            points, visibility = 0.0, "visible"
        if points is None:
            points = points_for(key, self.point_rules)
        if visibility is None:
            visibility = visibility_for(key, self.hidden_rules)
        item.user_properties.append((POINTS_PROPERTY, points))
        item.user_properties.append((VISIBILITY_PROPERTY, visibility))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        for key, message in item.user_properties:
            if key == MARKER_ERROR_PROPERTY:
                pytest.fail(f"grading marker error: {message}", pytrace=False)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            where = report.nodeid or "the test files"
            self.problems.append(Case(f"Collection error: {where}", 0.0, False,
                                      "The tests could not be collected (the instructor's tests, or code they "
                                      "import, raised an error):\n\n" + (report.longreprtext or "")))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        from ..verdict import VERDICT_PROPERTY

        outcome = self.outcomes.setdefault(report.nodeid, Outcome(report.nodeid))
        for key, value in report.user_properties:
            if key == VERDICT_PROPERTY and isinstance(value, dict):
                outcome.verdict_key = f"{value.get('exercise')}::{value.get('tensor')}"
            elif key in (POINTS_PROPERTY, VISIBILITY_PROPERTY):
                outcome.properties[key] = value
        wasxfail = hasattr(report, "wasxfail")
        if report.failed:
            outcome.passed = False
            phase = "" if report.when == "call" else f"error in {report.when}: "
            outcome.texts.append(phase + (report.longreprtext or "failed"))
        elif report.skipped and not wasxfail:
            outcome.passed, outcome.skipped = False, True
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr or "")
            outcome.texts.append(reason.replace("Skipped: ", "skipped: ", 1))
        elif wasxfail and report.when == "call":
            outcome.texts.append(f"expected failure (xfail): {report.wasxfail}".rstrip(": "))

    def pytest_internalerror(self, excrepr: Any, excinfo: Any) -> None:
        self.problems.append(Case("Internal error of the test run", 0.0, False,
                                  f"pytest stopped with an internal error:\n{excrepr}"))

    def usage_error(self, message: str) -> None:
        """Record a usage error raised while configuring (called by the plugin before it re-raises)."""
        self.problems.append(Case("The grader is misconfigured", 0.0, False,
                                  f"pytest could not start (usage error):\n{message}"))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.exitstatus = int(exitstatus)
        self.write()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.summary:
            terminalreporter.write_line(self.summary)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if not self.written:  # pytest stopped before the session ran (usage error, crash in a hook)
            self.write()

    # --- building the results ---

    def _session(self) -> Any:
        return self.config.pluginmanager.get_plugin("backprop-session")

    def cases(self) -> list[Case]:
        """The test cases: built-in verdicts in the table's order, then everything else in run order."""
        from ..report.text import render_verdict

        session = self._session()
        verdicts = {v.key: v for v in session.ordered()} if session is not None else {}
        rank = {key: i for i, key in enumerate(verdicts)}
        outcomes = sorted(self.outcomes.values(),
                          key=lambda o: (0, rank[o.verdict_key]) if o.verdict_key in rank else (1, 0))
        cases = []
        for o in outcomes:
            points = float(o.properties.get(POINTS_PROPERTY, points_for(check_key(o.nodeid), self.point_rules)))
            visibility = o.properties.get(VISIBILITY_PROPERTY, visibility_for(check_key(o.nodeid), self.hidden_rules))
            verdict = verdicts.get(o.verdict_key) if o.verdict_key else None
            if verdict is not None:
                passed = verdict.status == "pass" and o.passed
                # a failing item's own report (for a gradient: exactly render_verdict; for a property,
                # its smallest case and seed too); otherwise the verdict's one-line rendering
                failed = verdict.status in ("fail", "error") and o.texts
                text = "\n\n".join(t for t in o.texts if t) if failed else render_verdict(verdict)
                if verdict.status == "error":  # the student's code did not run: always say why
                    visibility = "visible"
                name = check_key(o.nodeid)  # the key backprop_points/backprop_hidden match
                tags = (verdict.exercise, verdict.diagnosis.code)
            else:
                passed = o.passed
                text = "\n\n".join(t for t in o.texts if t) or ("passed" if passed else "failed")
                name = check_key(o.nodeid)
                tags = ()
            cases.append(Case(name, points, passed, text, visibility, tags))
        return self.problems + cases

    def output(self, cases: Sequence[Case]) -> str:
        """The top-level output: the lecture's table (as in the terminal) and the score."""
        from ..report.text import render_summary

        lines: list[str] = []
        session = self._session()
        if session is not None and session.state.reported:
            lines += render_summary(session.ordered(), session.state.reported_warnings.values())
            lines.append("")
        lines += [f"{c.name}: {c.output.splitlines()[0] if c.output else ''}" for c in self.problems]
        score = sum(c.max_score for c in cases if c.passed)
        total = sum(c.max_score for c in cases)
        passed = sum(c.passed for c in cases)
        lines.append(f"{passed} of {len(cases)} tests passed; score {_num(score)} / {_num(total)}")
        if not cases or (self.exitstatus == 5 and not self.outcomes):
            lines.append("no tests ran")
        return "\n".join(lines)

    def write(self) -> None:
        """Write results.json; never raises (a broken reporter must not hide the test run)."""
        if hasattr(self.config, "workerinput"):
            return
        self.written = True
        elapsed = time.monotonic() - self.started
        try:
            cases = self.cases()
            if not cases and self.exitstatus == 4:
                cases = [Case("The grader is misconfigured", 0.0, False, "pytest stopped with a usage error "
                              "(exit status 4, e.g. a test path that does not exist); see the autograder's log")]
            elif not cases:
                cases = [Case("No tests ran", 0.0, False, "pytest collected no tests: check the grader's "
                                                          "configuration (testpaths, backprop_impl)")]
            data = results_json(cases, output=self.output(cases), execution_time=elapsed,
                                extra={"exit_status": self.exitstatus})
        except Exception as exc:  # noqa: BLE001 -- still write a valid file
            data = crash_results(f"the grader failed while writing results: {type(exc).__name__}: {exc}",
                                 execution_time=elapsed)
        try:
            write_results(self.path, data)
            self.summary = (f"backprop: Gradescope results written to {self.path} "
                            f"(score {data['score']} / {data['extra_data'].get('max_score')})")
        except OSError as exc:
            sys.stderr.write(f"backprop: cannot write Gradescope results to {self.path}: {exc}\n")


def configure(config: pytest.Config) -> GradescopeReporter | None:
    """Register the reporter when ``--backprop-gradescope`` is given; return it (else None).

    Called by the plugin's ``pytest_configure``: ``grader = configure(config)``. A malformed ``backprop_points``/``backprop_hidden`` still leaves a valid results.json behind
    (with the usage error as a visible failed test) before the error is raised.
    """
    path = options.get(config, "gradescope")
    if not path:
        return None
    try:
        reporter = GradescopeReporter(config, path)
    except pytest.UsageError as exc:
        write_results(Path(path), results_json(
            [Case("The grader is misconfigured", 0.0, False, str(exc))], output=str(exc), execution_time=0.0))
        raise
    config.pluginmanager.register(reporter, "backprop-gradescope")
    return reporter


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: make sure a valid results.json exists (for ``run_autograder``).

    Example::

        python -m pytest_backprop.gradescope --ensure results.json --log pytest.log
    """
    parser = argparse.ArgumentParser(prog="python -m pytest_backprop.gradescope",
                                     description="Make sure a valid Gradescope results.json exists.")
    parser.add_argument("--ensure", metavar="PATH", required=True,
                        help="write a crash result here unless a valid results.json already exists")
    parser.add_argument("--log", metavar="FILE", help="pytest's output, quoted in the crash result")
    args = parser.parse_args(argv)
    wrote = ensure_results(args.ensure, log=args.log)
    print(f"{args.ensure}: {'wrote a crash result' if wrote else 'valid'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
