"""The pytest plugin (entry point ``backprop``): options, fixtures, and -- only with ``--backprop`` --
the hooks that collect the built-in checks and report their verdicts.

This module imports neither torch nor hypothesis: with ``--backprop`` off and no kit fixture
requested, the plugin costs nothing. The work happens in modules imported lazily from the hooks.
"""

from __future__ import annotations

import functools
import gc
import sys
from typing import TYPE_CHECKING, Any

import pytest

from . import options
from .fixtures import (  # noqa: F401 -- imported so that pytest registers the fixtures with the plugin
    backprop_student,
    makemore_batch,
    makemore_config,
    makemore_dataset,
    makemore_forward,
    makemore_params,
    makemore_words,
)

if TYPE_CHECKING:
    from .checks.session import KitState


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    from .markers import add_marker_lines

    add_marker_lines(config)  # always, so that --strict-markers accepts them (without importing gradescope: P1)
    grader = None
    if options.get(config, "gradescope"):  # no torch: results.json only
        from .grading import gradescope

        grader = gradescope.configure(config)
    if options.get(config, ""):
        from .checks.session import (  # only with --backprop: P1, the plugin off costs ~nothing
            STATE_KEY,
            KitState,
            Settings,
        )

        try:
            settings = Settings.from_config(config)
            if settings.problem:  # --backprop-problem: a forward the kit cannot derive from is a usage error now
                settings.problem_spec()
        except pytest.UsageError as exc:
            if grader is not None:  # results.json must say why nothing was graded
                grader.usage_error(str(exc))
            raise
        state = KitState(settings, config)
        config.stash[STATE_KEY] = state
        if state.option("isolate"):  # the child loads the submission while pytest collects
            from .usercode.isolate import start_early

            start_early(settings.impl, settings.rootdir, timeout=settings.timeout, user=state.option("isolate-user"),
                        problem_spec=None if state.lecture else state.spec)
        config.pluginmanager.register(BackpropSession(config, state), "backprop-session")
    else:
        needs_checks = [o.flag for o in options.OPTIONS if o.name in KIT_ONLY and config.getoption(o.dest, None)]
        if needs_checks:
            config.issue_config_time_warning(pytest.PytestConfigWarning(
                f"{', '.join(needs_checks)} has no effect without --backprop (the built-in checks are off)"), stacklevel=2)


#: Options that only mean something while the built-in checks run (impl and isolate serve backprop_student too).
KIT_ONLY = ("json", "examples", "broadcast", "steps", "plots")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # Before any report is written: the isolated children end, with every process they spawned.
    isolate = sys.modules.get("pytest_backprop.usercode.isolate")  # loaded only if isolation was used
    if isolate is not None:
        isolate.close_all()


class BackpropSession:
    """Hooks active only while ``--backprop`` is on."""

    def __init__(self, config: pytest.Config, state: KitState):
        self.config, self.state = config, state

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        from .problems.rule import RULE

        s = self.state.settings
        if not self.state.lecture:
            spec = self.state.spec
            sizes = ", ".join(f"{k}={v}" for k, v in spec.sizes.items())
            first = (f"backprop: problem {spec.name} ({s.problem}: {len(spec.lines)} lines, {len(spec.order)} "
                     f"gradients; sizes {sizes}), seed {s.seed}, dtype {s.dtype}")
        else:
            first = (f"backprop: dataset {self.dataset()['source']} ({self.dataset()['words']} words), seed {s.seed}, "
                     f"dtype {s.dtype}")
        return [
            first,
            f"backprop: tolerance rule: {RULE}",
            f"backprop: implementation {s.impl}"
            + (f" ({self.state.implementation.description})" if self.state.implementation else ""),
        ]

    def dataset(self) -> dict[str, Any]:
        if not self.state.lecture:  # another problem's inputs come from its make_inputs
            return {"source": "make_inputs", "words": 0}
        from reference_model.data import load_words  # torch-free: xdist's controller builds no problem

        words = load_words(self.state.settings.names)
        return {"source": words.source, "words": len(words)}

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        # tryfirst: our items must exist before -k/-m deselection runs.
        from .items.collect import collect_builtin_items

        items[:0] = collect_builtin_items(session)
        if "torch" in sys.modules and gc.get_freeze_count() == 0:
            # What is alive now (torch's and hypothesis's modules, ~10^5 objects) lives to the end anyway;
            # frozen, the full collections of the run (pytest's at exit, hypothesis's first example) skip
            # it instead of walking it for ~0.1 s each, and so does Python's own at exit. (Someone else's
            # freeze is left alone.) Who runs pytest.main in a long-lived process calls gc.unfreeze()
            # afterwards, so that the session's objects become collectable: %backprop does.
            gc.freeze()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        # Where the verdict is made (this process or an xdist worker), give it its place in the report.
        outcome = yield
        report = outcome.get_result()
        from .verdict import RANK_PROPERTY, VERDICT_PROPERTY

        verdicts = [value for key, value in report.user_properties if key == VERDICT_PROPERTY]
        if call.when == "call" and verdicts:
            ranks = self._ranks
            key = f"{verdicts[0]['exercise']}::{verdicts[0]['tensor']}"
            report.user_properties.append((RANK_PROPERTY, list(ranks.get(key, (99, 0)))))

    @functools.cached_property
    def _ranks(self) -> dict[str, tuple[int, int]]:
        """Exercise order, then backward order, for the session's problem."""
        from .judge.grade import EXERCISE_TENSORS, LECTURE_ONLY, exercise_tensors

        spec = None if self.state.lecture else self.state.spec
        tensors = {ex: exercise_tensors(ex, spec) for ex in EXERCISE_TENSORS if spec is None or ex not in LECTURE_ONLY}
        return {f"{ex}::{t}": (i, j) for i, (ex, ts) in enumerate(tensors.items()) for j, t in enumerate(ts)}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Verdicts travel in user_properties, so xdist workers' reports are gathered the same way.
        if report.when != "call" or not report.user_properties:
            return
        from .verdict import RANK_PROPERTY, VERDICT_PROPERTY, WARNINGS_PROPERTY, Diagnosis, Verdict

        verdict = None
        for key, value in report.user_properties:
            if key == VERDICT_PROPERTY:
                verdict = Verdict.from_json(value)
                self.state.reported[verdict.key] = verdict
            elif key == WARNINGS_PROPERTY:
                for w in value:
                    self.state.reported_warnings[(w["code"], w["message"])] = Diagnosis(**w)
            elif key == RANK_PROPERTY and verdict is not None:
                self.state.reported_ranks[verdict.key] = tuple(value)

    def ordered(self) -> list[Any]:
        """Reported verdicts in exercise order, then backward order; unranked checks (properties) by
        name, since xdist delivers reports in no fixed order."""
        ranks = self.state.reported_ranks
        return sorted(self.state.reported.values(), key=lambda v: (*ranks.get(v.key, (99, 0)), v.key))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.state.reported:
            return
        from .report.text import render_summary

        terminalreporter.section("backprop: gradients vs autograd")
        for line in render_summary(self.ordered(), self.state.reported_warnings.values()):
            terminalreporter.write_line(line)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput") or not self.state.settings.json:
            return
        from .report.json import report_json, write_json

        s = self.state.settings
        if s.problem:  # another problem (its spec is loaded at configure anyway)
            problem = {"name": self.state.spec.name, "origin": self.state.spec.origin}
        else:  # the lecture's, without importing it: xdist's controller has no torch
            from .problems.meta import lecture_meta

            problem = lecture_meta()
        meta = {"implementation": s.impl, "problem": problem, "dataset": self.dataset(), "seed": s.seed,
                "dtype": s.dtype}
        write_json(s.json, report_json(meta, self.ordered(), self.state.reported_warnings.values()))
