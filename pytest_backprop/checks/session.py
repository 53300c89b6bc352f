"""Per-session state of ``--backprop``: settings, the problem, the implementation, cached results.

Everything is built lazily and once: the implementation runs once per exercise per process, and
every test item reads its verdict from that run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .. import options
from ..verdict import Diagnosis, Verdict


@dataclass
class Settings:
    """Resolved settings of one session (see :mod:`pytest_backprop.options`)."""

    impl: str
    names: str | None
    seed: int
    dtype: str
    json: str | None
    timeout: float
    rootdir: Path
    problem: str | None = None  # --backprop-problem (None: the lecture's)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "Settings":
        impl = options.get(config, "impl")
        if not impl:
            raise pytest.UsageError(
                "--backprop needs an implementation to check. Either pass it on the command line:\n"
                "    pytest --backprop --backprop-impl=path/to/backward.py   (or a notebook, or a module name)\n"
                "or set it in your ini file, e.g. in pyproject.toml:\n"
                "    [tool.pytest.ini_options]\n"
                "    backprop_impl = \"path/to/backward.py\"")
        rootdir = Path(config.rootpath)
        names = options.get(config, "names")
        if names is None and (rootdir / "names.txt").is_file():
            names = str(rootdir / "names.txt")
        elif names is not None and not Path(names).is_file() and (rootdir / names).is_file():
            names = str(rootdir / names)
        if names is not None and not Path(names).is_file():
            raise pytest.UsageError(f"--backprop-names: no such file: {names}")
        from ..problems.device import (
            check_device,  # --backprop-device (issue 5): a clear usage error, not a crash later
        )

        check_device(options.get(config, "device"))
        return cls(impl=impl, names=names, seed=options.get(config, "seed"), dtype=options.get(config, "dtype"),
                   json=options.get(config, "json"), timeout=options.get(config, "timeout"), rootdir=rootdir,
                   problem=options.get(config, "problem"))

    def problem_spec(self) -> Any:
        """The problem of ``--backprop-problem`` (loaded once; the lecture's when not given). A problem
        the kit cannot derive from is a usage error naming its line."""
        from ..problems.lecture import LECTURE
        from ..problems.spec import ProblemError, load_spec

        if not self.problem:
            return LECTURE
        target = self.problem
        if (target.endswith(".py") or "/" in target) and (Path.cwd() / target).is_file():
            target = str((Path.cwd() / target).resolve())  # like --backprop-impl: the working directory first
        try:
            return load_spec(target, rootdir=self.rootdir)
        except ProblemError as exc:
            raise pytest.UsageError(f"--backprop-problem={self.problem}: {exc}") from None


@dataclass
class KitState:
    """What the plugin keeps in ``config.stash`` while ``--backprop`` is on."""

    settings: Settings
    config: pytest.Config
    _problem: Any = None
    _implementation: Any = None
    _load_error: str | None = None
    results: dict[str, list[Verdict]] = field(default_factory=dict)
    run_warnings: dict[str, list[Diagnosis]] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)  # how many times the user's code ran, per exercise
    # Gathered from test reports (works the same under xdist): what the report renders.
    reported: dict[str, Verdict] = field(default_factory=dict)
    reported_warnings: dict[tuple[str, str], Diagnosis] = field(default_factory=dict)
    reported_ranks: dict[str, tuple[int, int]] = field(default_factory=dict)  # verdict key -> place in the report

    def option(self, name: str) -> Any:
        """Any ``--backprop-<name>`` setting (command line > ini > default)."""
        return options.get(self.config, name)

    @property
    def spec(self) -> Any:
        """The session's :class:`~pytest_backprop.problems.spec.ProblemSpec` (``--backprop-problem``)."""
        return self.settings.problem_spec()

    @property
    def lecture(self) -> bool:
        """Whether the session checks the lecture's problem (its Exercises 2-4 exist only then)."""
        if not self.settings.problem:
            return True
        from ..problems.lecture import LECTURE

        return self.spec is LECTURE  # --backprop-problem=reference_model.model names it too

    @property
    def problem(self):
        """The problem at the session's settings (the lecture's by default), built on first use."""
        if self._problem is None and not self.lecture:
            import torch

            from ..problems.device import single_thread
            from ..problems.instance import problem_from_spec

            with single_thread():
                self._problem = problem_from_spec(self.spec, seed=self.settings.seed,
                                                  dtype=getattr(torch, self.settings.dtype))
        if self._problem is None:
            import torch

            from reference_model.model import Config

            from ..problems.device import single_thread
            from ..problems.instance import build_problem, resolve_words

            s = self.settings
            with single_thread():  # tiny tensors: one thread is faster, results bit-identical (issue 5, P2)
                self._problem = build_problem(resolve_words(s.names), Config(seed=s.seed), dtype=getattr(torch, s.dtype))
        return self._problem

    @property
    def implementation(self):
        """The loaded implementation, or None when it could not be loaded (see ``load_error``)."""
        if self._implementation is None and self._load_error is None:
            from ..usercode.base import LoadError
            from ..usercode.isolate import load_submission

            try:
                self._implementation = load_submission(self.settings.impl, self.settings.rootdir,
                                                       isolate=self.option("isolate"), timeout=self.settings.timeout,
                                                       user=self.option("isolate-user"),
                                                       problem_spec=None if self.lecture else self.spec)
            except LoadError as exc:
                self._load_error = str(exc)
        return self._implementation

    @property
    def load_error(self) -> str | None:
        self.implementation  # noqa: B018 -- triggers the load
        return self._load_error

    def exercises(self) -> tuple[str, ...]:
        """The exercises the implementation answers (ex1 when it cannot be loaded)."""
        impl = self.implementation
        return impl.exercises() if impl is not None else ("ex1",)

    def collected_exercises(self) -> tuple[str, ...]:
        """Exercises that get items: all of the lecture's (an unanswered one is a row of skips that says
        why), plus the per-line checks when the implementation offers them. Another problem than the
        lecture's has Exercise 1 (its whole backward) and the per-line checks only."""
        if not self.lecture:
            return ("ex1", *(ex for ex in self.exercises() if ex == "lines"))
        return (*KNOWN_EXERCISES, *(ex for ex in self.exercises() if ex not in KNOWN_EXERCISES))

    def verdicts(self, exercise: str) -> list[Verdict]:
        """Run the implementation for ``exercise`` once and return its verdicts."""
        if exercise not in self.results:
            from ..problems.device import single_thread

            with single_thread():  # tiny tensors: one thread is faster, results bit-identical (issue 5, P2)
                self._run_exercise(exercise)
        return self.results[exercise]

    def _run_exercise(self, exercise: str) -> None:
        """Run the implementation for one exercise and store its verdicts and warnings."""
        from ..judge.grade import load_failure_verdicts, missing_exercise_verdicts
        from .independent import grade_exercise
        from ..usercode.perline import EXERCISE as LINES

        if self.implementation is None and exercise == "ex1":
            self.results[exercise] = load_failure_verdicts(exercise, self.load_error or "", self.problem)
            self.run_warnings[exercise] = []
        elif self.implementation is None:
            reason = "not run: the implementation could not be loaded (see ex1)"
            self.results[exercise] = missing_exercise_verdicts(exercise, reason, self.problem)
            self.run_warnings[exercise] = []
        elif exercise == LINES:  # per-line checks: each backward_<output> against its line's VJP
            from ..judge.lines import judge_answers

            answers = self.implementation.line_answers(self.problem, self.settings.timeout)
            self.results[exercise] = judge_answers(answers, self.problem)
            self.run_warnings[exercise] = []
        elif exercise not in self.implementation.exercises():  # every exercise has its rows, never a silent absence
            reason = self.implementation.missing_reason(exercise) or f"{exercise} is not answered"
            self.results[exercise] = missing_exercise_verdicts(exercise, reason, self.problem)
            self.run_warnings[exercise] = []
        else:
            graded = grade_exercise(self.implementation, exercise, self.problem, self.settings.timeout)
            self.results[exercise] = graded.verdicts
            self.run_warnings[exercise] = graded.warnings
            self.runs[exercise] = graded.runs
            if self.option("plots"):  # --backprop-plots (issue 5): a heatmap per failing gradient
                self._plot_failures(exercise, graded.first.grads)

    def _plot_failures(self, exercise: str, grads: dict[str, Any]) -> None:
        try:
            from ..report.plots import failure_heatmaps

            failure_heatmaps(self.option("plots"), exercise, grads, self.results[exercise], self.problem)
        except Exception as exc:  # noqa: BLE001 -- a plot must never turn a verdict into a crash
            self.run_warnings[exercise].append(Diagnosis("plots", f"could not write plots: {exc}"))


STATE_KEY = pytest.StashKey[KitState]()
#: The lecture's exercises answered by gradients: each always has its rows in the report.
KNOWN_EXERCISES = ("ex1", "ex2", "ex3")


def get_state(config: pytest.Config) -> KitState | None:
    """The session's state, or None when ``--backprop`` is off."""
    return config.stash.get(STATE_KEY, None)
