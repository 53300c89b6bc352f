"""Grading: points, hidden checks and Gradescope's ``results.json`` (``--backprop-gradescope PATH``).

Every test of the session becomes one Gradescope test case: the built-in gradient checks (rendered
from the same :class:`~pytest_backprop.verdict.Verdict` records as the terminal table and the JSON
report) and the instructor's own tests. Points (:mod:`pytest_backprop.grading.points`):

- built-in checks: 1 point each, changed with ``backprop_points`` (ini) / ``--backprop-points``, a
  list of ``PATTERN=POINTS`` entries, e.g. ``ex1=1 ex2=3 ex1::b1=2``. A pattern is matched against
  the check's key (its node id without ``backprop::``, e.g. ``ex1::b1``); an exercise name alone
  (``ex1``) means all of its checks (``ex1::*``); glob patterns (``*``, ``?``) work. An exact key wins
  over patterns; among patterns the last one that matches wins. Checks only some forms have
  (``lines::*``) are worth 0 unless an entry names them;
- every built-in check of the session's catalogue is a test case whatever the submission offers: one
  it lacks (Exercise 2 in a script) fails with its points, saying what is missing; so the maximum
  score is set by the configuration alone;
- a gradient that fails only because an earlier one is wrong (``inherited``) keeps its points,
  unless ``backprop_cascade = strict``;
- the instructor's tests: ``@pytest.mark.backprop_points(2)`` (default 1; ``backprop_points`` entries
  matching their node id apply too, the marker wins);
- ``@pytest.mark.backprop_hidden`` (or ``backprop_hidden(visibility="after_due_date")``) and the
  ``backprop_hidden`` setting (patterns, optionally ``=VISIBILITY``) set Gradescope's visibility.

A submission that cannot run still yields a valid file: usage errors, collection errors, internal
errors and an implementation that cannot be loaded all become visible failed test cases, and
``python -m pytest_backprop.gradescope --ensure PATH`` (for ``run_autograder``) writes a valid file
if pytest itself died before writing one. Paths in the file are relative to the submission's
folder (``homework.py:21``), never the temporary folder the autograder unpacked into.

This module imports neither torch nor hypothesis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pytest

from .. import options
from ..markers import HIDDEN_MARKER, MARKERS, POINTS_MARKER, add_marker_lines  # noqa: F401 -- defined once, cheap to import
from .points import (  # noqa: F401 -- the settings' functions, importable from here as before
    BUILTIN_PREFIX,
    DEFAULT_POINTS,
    VISIBILITIES,
    Rule,
    builtin_checks,
    check_key,
    default_points,
    keeps_points,
    marker_points,
    marker_visibility,
    missing_reason,
    parse_hidden,
    parse_points,
    points_for,
    visibility_for,
)

POINTS_PROPERTY = "backprop_points"
VISIBILITY_PROPERTY = "backprop_visibility"
MARKER_ERROR_PROPERTY = "backprop_marker_error"
MAX_OUTPUT = 8000  # characters of one test's output; Gradescope shows long outputs poorly


def register_markers(config: pytest.Config) -> None:
    """Register the grading markers, so that ``--strict-markers`` accepts them (always, even without
    ``--backprop``).

    Example::

        def pytest_configure(config):
            register_markers(config)   # what the plugin does
    """
    add_marker_lines(config)


# --- results.json -----------------------------------------------------------------------------

@dataclass
class Case:
    """One Gradescope test case, before it is written. ``kept``: failed, but keeps its points (an
    ``inherited`` failure under ``backprop_cascade = independent``)."""

    name: str
    max_score: float
    passed: bool
    output: str
    visibility: str = "visible"
    tags: tuple[str, ...] = ()
    kept: bool = False

    @property
    def score(self) -> float:
        return self.max_score if self.passed or self.kept else 0.0

    def to_json(self) -> dict[str, Any]:
        """The ``tests[]`` entry of Gradescope's results.json."""
        output = self.output if len(self.output) <= MAX_OUTPUT else self.output[:MAX_OUTPUT] + "\n... (truncated)"
        data = {"name": self.name, "score": _num(self.score),
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
    score = sum(c.score for c in cases)
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
        self.cascade = options.get(config, "cascade")
        self.folders = submission_folders(config)

    def points(self, key: str, *, builtin: bool) -> float:
        """Points of ``key`` under the ini rules (a built-in check's default from the catalogue)."""
        return points_for(key, self.point_rules, default_points(key) if builtin else DEFAULT_POINTS)

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
            points = self.points(key, builtin=item.nodeid.startswith(BUILTIN_PREFIX))
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

    def _builtin_case(self, o: Outcome, verdict: Any, points: float, visibility: str) -> Case:
        from ..report.text import render_verdict

        passed = verdict.status == "pass" and o.passed
        # a failing item's own report (for a gradient: exactly render_verdict; for a property, its
        # smallest case and seed too); otherwise the verdict's one-line rendering
        failed = verdict.status in ("fail", "error") and o.texts
        text = "\n\n".join(t for t in o.texts if t) if failed else render_verdict(verdict)
        if verdict.status == "error":  # the student's code did not run: always say why
            visibility = "visible"
        kept = not passed and keeps_points(verdict.status, verdict.diagnosis.code, self.cascade)
        if kept:
            text = ("Keeps its points: this gradient is wrong only because an earlier one is (fix that one "
                    "and this one follows).\n\n" + text)
        elif verdict.status == "skip" and points > 0:  # not attempted, or not in the submission at all
            text = f"{text}\n0 of {_num(points)} points."
        return Case(check_key(o.nodeid), points, passed, text, visibility, (verdict.exercise, verdict.diagnosis.code),
                    kept=kept)

    def cases(self) -> list[Case]:
        """The test cases: the built-in catalogue in the table's order (missing checks included), then
        everything else in run order."""
        session = self._session()
        verdicts = {v.key: v for v in session.ordered()} if session is not None else {}
        rank = {key: i for i, key in enumerate(verdicts)}
        builtin: dict[str, Case] = {}
        others: list[Case] = []
        for o in sorted(self.outcomes.values(),
                        key=lambda o: (0, rank[o.verdict_key]) if o.verdict_key in rank else (1, 0)):
            key = check_key(o.nodeid)
            is_builtin = o.nodeid.startswith(BUILTIN_PREFIX)
            points = float(o.properties.get(POINTS_PROPERTY, self.points(key, builtin=is_builtin)))
            visibility = o.properties.get(VISIBILITY_PROPERTY, visibility_for(key, self.hidden_rules))
            verdict = verdicts.get(o.verdict_key) if o.verdict_key else None
            if verdict is not None:
                builtin[key] = self._builtin_case(o, verdict, points, visibility)
            else:
                text = "\n\n".join(t for t in o.texts if t) or ("passed" if o.passed else "failed")
                case = Case(key, points, o.passed, text, visibility)
                if is_builtin:
                    builtin[key] = case
                else:
                    others.append(case)
        ordered: list[Case] = []
        if session is not None:
            for key, default in self.catalogue():
                if key in builtin:
                    ordered.append(builtin.pop(key))
                    continue
                points = points_for(key, self.point_rules, default)
                if points > 0:
                    ordered.append(Case(key, points, False, f"{missing_reason(key)} 0 of {_num(points)} points.",
                                        visibility_for(key, self.hidden_rules), ("missing",)))
        return self.problems + ordered + list(builtin.values()) + others

    def catalogue(self) -> list[tuple[str, float]]:
        """The built-in checks this session grades whatever the submission (:func:`builtin_checks`)."""
        from ..checks.session import get_state

        state = get_state(self.config)
        spec = state.spec if state is not None and not state.lecture else None  # --backprop-problem
        return builtin_checks(steps=options.get(self.config, "steps"), examples=options.get(self.config, "examples"),
                              broadcast=options.get(self.config, "broadcast"), spec=spec)

    def output(self, cases: Sequence[Case]) -> str:
        """The top-level output: the lecture's table (as in the terminal) and the score."""
        from ..report.text import render_summary

        lines: list[str] = []
        session = self._session()
        if session is not None and session.state.reported:
            lines += render_summary(session.ordered(), session.state.reported_warnings.values())
            lines.append("")
        lines += [f"{c.name}: {c.output.splitlines()[0] if c.output else ''}" for c in self.problems]
        score = sum(c.score for c in cases)
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
            for case in cases:
                case.output = relative_paths(case.output, self.folders)
            data = results_json(cases, output=relative_paths(self.output(cases), self.folders),
                                execution_time=elapsed, extra={"exit_status": self.exitstatus})
        except Exception as exc:  # noqa: BLE001 -- still write a valid file
            data = crash_results(f"the grader failed while writing results: {type(exc).__name__}: {exc}",
                                 execution_time=elapsed)
        try:
            write_results(self.path, data)
            self.summary = (f"backprop: Gradescope results written to {self.path} "
                            f"(score {data['score']} / {data['extra_data'].get('max_score')})")
        except OSError as exc:
            sys.stderr.write(f"backprop: cannot write Gradescope results to {self.path}: {exc}\n")


def submission_folders(config: pytest.Config) -> list[str]:
    """The folders paths in reports are made relative to: the rootdir and the working directory
    (as given and resolved), longest first.

    Example::

        submission_folders(config)   # ['/tmp/tmp.x1y2/', ...]
    """
    found: set[str] = set()
    for folder in (Path(config.rootpath), Path(config.invocation_params.dir), Path.cwd()):
        for variant in (folder, folder.resolve()):
            text = str(variant).rstrip(os.sep)
            if text:
                found.add(text + os.sep)
    return sorted(found, key=len, reverse=True)


def relative_paths(text: str, folders: Sequence[str]) -> str:
    """``text`` with the submission's folders cut from every path: ``/tmp/tmp.x1y2/homework.py:21``
    becomes ``homework.py:21``.

    Example::

        relative_paths("raised at /tmp/ag/homework.py:3", ["/tmp/ag/"])   # 'raised at homework.py:3'
        relative_paths("looked in /tmp/ag", ["/tmp/ag/"])                   # 'looked in .'
    """
    import re

    for folder in folders:
        text = text.replace(folder, "")
        # the folder itself, as a word ("looked in /tmp/ag and ..."): the submission's folder is "."
        text = re.sub(re.escape(folder.rstrip(os.sep)) + r"(?=$|[\s'\"),:;])", ".", text)
    return text


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
    """The command line (``python -m pytest_backprop.gradescope``, or ``backprop-autograder``):

    - ``build [FOLDER] [-o autograder.zip] [--kit WHEEL_OR_SOURCE]``: write Gradescope's upload;
    - ``try autograder.zip SUBMISSION``: run it locally on one submission and print the score;
    - ``--ensure PATH [--log FILE]``: make sure a valid results.json exists (for ``run_autograder``).

    Example::

        python -m pytest_backprop.gradescope build examples/homework -o autograder.zip
        python -m pytest_backprop.gradescope try autograder.zip examples/ex1_solution.py
        python -m pytest_backprop.gradescope --ensure results.json --log pytest.log
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["build"], ["try"]):
        return _autograder_command(argv)
    parser = argparse.ArgumentParser(prog="python -m pytest_backprop.gradescope",
                                     description="Make sure a valid Gradescope results.json exists "
                                                 "(or: build FOLDER, try ZIP SUBMISSION; see --help of each).")
    parser.add_argument("--ensure", metavar="PATH", required=True,
                        help="write a crash result here unless a valid results.json already exists")
    parser.add_argument("--log", metavar="FILE", help="pytest's output, quoted in the crash result")
    args = parser.parse_args(argv)
    wrote = ensure_results(args.ensure, log=args.log)
    print(f"{args.ensure}: {'wrote a crash result' if wrote else 'valid'}")
    return 0


def _autograder_command(argv: list[str]) -> int:
    from . import autograder

    parser = argparse.ArgumentParser(prog="python -m pytest_backprop.gradescope")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write Gradescope's autograder upload from a course folder")
    build.add_argument("folder", nargs="?", default=".", help="the course folder (its pytest configuration "
                       "names backprop_impl; default: the current folder)")
    build.add_argument("-o", "--output", default="autograder.zip", help="the zip to write (default autograder.zip)")
    build.add_argument("--kit", metavar="WHEEL_OR_SOURCE", help="ship this wheel of pytest-backprop (or one built "
                       "from this source folder) instead of installing it from PyPI")
    build.add_argument("--impl", help="the file students hand in (default: backprop_impl of the folder)")
    build.add_argument("--time-limit", type=int, default=autograder.DEFAULT_TIME_LIMIT, metavar="SECONDS",
                       help=f"seconds for one submission's whole run (default {autograder.DEFAULT_TIME_LIMIT})")
    build.add_argument("--sandbox-user", default=autograder.DEFAULT_SANDBOX_USER, metavar="USER",
                       help="the unprivileged user students' code runs as on Gradescope (created by setup.sh; "
                            f"default {autograder.DEFAULT_SANDBOX_USER}; empty: the grader's user)")
    attempt = commands.add_parser("try", help="run an upload's run_autograder on one submission, here")
    attempt.add_argument("zip", help="the upload (autograder.zip)")
    attempt.add_argument("submission", help="the student's file (or a folder of their files)")
    attempt.add_argument("--root", help="the folder to unpack into (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            path = autograder.build(args.folder, args.output, kit=args.kit, impl=args.impl,
                                    time_limit=args.time_limit, sandbox_user=args.sandbox_user)
        except autograder.BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}: upload it as the autograder of a Gradescope programming assignment")
        return 0
    root = Path(args.root) if args.root else None
    data = autograder.try_autograder(args.zip, args.submission, root=root)
    print(autograder.describe_results(data))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
