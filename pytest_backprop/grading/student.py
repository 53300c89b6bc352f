"""``backprop_student``: the submission under grading, for the instructor's own tests.

The submission is the one ``--backprop-impl`` / ``backprop_impl`` names (a script, module or
notebook), loaded once per session with the kit's settings: its time limit
(``--backprop-timeout``) and its isolation (``--backprop-isolate``: one warm child process runs the
student's code; with ``--backprop`` on it is the very implementation, and the very child, the
built-in checks use). Instructors' tests then run it on any problem: the lecture's
(``makemore_forward``), one at other sizes (:func:`~pytest_backprop.problems.instance.problem_from_batch`),
or one hypothesis generates (:func:`~pytest_backprop.properties.checks.case_problem`).

What a test sees:

- gradients by tensor name, for each exercise the submission answers (``ex1``, ``ex2``, ``ex3``);
- *skipped* ("not attempted") when a gradient it needs is not written yet, or the submission has no
  such exercise: the test scores 0, and a student working through the template sees no failure;
- *failed*, with the student's file and line, when their code raised or ran past the time limit;
  with the reason when the submission cannot be loaded at all; and when an answer was copied from
  autograd (``reads_autograd``).
"""

from __future__ import annotations

from typing import Any

import pytest

from .. import options
from ..checks.session import get_state
from .gradescope import relative_paths, submission_folders

_EXERCISE_NAMES = {"ex1": "Exercise 1", "ex2": "Exercise 2 (cross-entropy in one go)",
                   "ex3": "Exercise 3 (batchnorm in one go)"}


class Student:
    """The submission, loaded on first use (see the module docstring); the ``backprop_student`` fixture.

    Example::

        def test_first_layer(backprop_student, makemore_forward):
            grads = backprop_student.gradients(makemore_forward, "W1", "b1")
            assert_grad_matches(grads["W1"], makemore_forward["W1"], name="W1")
    """

    def __init__(self, config: pytest.Config):
        self._config = config
        self._implementation: Any = None
        self._error: str | None = None
        self._loaded = False
        self._own = False  # loaded here (not the built-in checks' implementation): closed here
        self.timeout: float | None = options.get(config, "timeout") or None

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        kit = get_state(self._config)
        if kit is not None:  # --backprop on: share the built-in checks' implementation (and child process)
            self._implementation, self._error = kit.implementation, kit.load_error
            return
        spec = options.get(self._config, "impl")
        if not spec:
            self._error = "no submission: set backprop_impl in the ini file or pass --backprop-impl"
            return
        from ..usercode.base import LoadError
        from ..usercode.isolate import load_submission

        try:
            self._implementation = load_submission(spec, self._config.rootpath, isolate=options.get(self._config, "isolate"),
                                                   timeout=self.timeout, user=options.get(self._config, "isolate-user"))
            self._own = True
        except LoadError as exc:
            self._error = str(exc)

    def _fail(self, message: str) -> None:
        __tracebackhide__ = True
        pytest.fail(relative_paths(message, submission_folders(self._config)), pytrace=False)

    @property
    def implementation(self) -> Any:
        """The loaded :class:`~pytest_backprop.usercode.base.Implementation`; fails the test when the
        submission cannot be loaded, with the reason (a syntax error and its line, a missing file)."""
        __tracebackhide__ = True
        self._load()
        if self._implementation is None:
            self._fail(f"your submission could not be loaded: {self._error}")
        return self._implementation

    @property
    def exercises(self) -> tuple[str, ...]:
        """The exercises the submission answers, e.g. ``("ex1",)`` for a script, ``("ex1", "ex2", "ex3")``."""
        return tuple(self.implementation.exercises())

    def run(self, problem: Any, *, exercise: str = "ex1", **kwargs: Any) -> Any:
        """Run the submission's ``exercise`` on ``problem`` under the kit's time limit and isolation; the
        raw :class:`~pytest_backprop.usercode.base.RunResult` (``grads``, ``error``, ``warnings``).

        Example::

            result = backprop_student.run(makemore_forward)
            result.error   # None, or where the student's code raised
        """
        __tracebackhide__ = True
        impl = self.implementation
        if exercise not in impl.exercises():
            pytest.skip(f"not attempted: your submission has no {_EXERCISE_NAMES.get(exercise, exercise)}")
        from ..problems.device import single_thread

        with single_thread():  # as the built-in checks run it
            return impl.run(exercise, problem, self.timeout, **kwargs)

    def gradients(self, problem: Any, *needed: str, exercise: str = "ex1") -> dict[str, Any]:
        """The submission's gradients on ``problem`` by tensor name (``{"logits": tensor, ...}``).

        Skips the test unless every name in ``needed`` was answered (``None`` placeholders count as
        not attempted); with no ``needed``, unless at least one was. Fails it when the code raised
        before answering them, or when an answer was copied from autograd.

        Example::

            grads = backprop_student.gradients(makemore_forward, "logits", "probs")
            dlogits = backprop_student.gradients(problem, "logits", exercise="ex2")["logits"]
        """
        __tracebackhide__ = True
        result = self.run(problem, exercise=exercise)
        grads = {name: value for name, value in result.grads.items() if value is not None}
        missing = [name for name in needed if name not in grads]
        if result.error is not None and (missing or not needed):
            self._fail(result.error.describe())
        copied = [name for name in (needed or grads) if name in result.overrides]
        if copied:
            self._fail("; ".join(f"d{name}: {result.overrides[name].message}" for name in copied))
        if missing or not grads:
            pytest.skip("not attempted: " + (", ".join(f"d{m}" for m in missing) or "no gradients yet"))
        return grads

    def close(self) -> None:
        """End what this fixture started (an isolated child process); the built-in checks' is theirs."""
        if self._own and hasattr(self._implementation, "close"):
            self._implementation.close()
