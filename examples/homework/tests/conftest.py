"""The instructor's fixture: the student's submission, runnable on any instance of the exercise.

``student.gradients(problem, "logits", ...)`` runs the submission (the file named by
``backprop_impl``, or ``--backprop-impl``: a script, module or notebook) on ``problem`` in a fresh
namespace and returns its gradients by tensor name. A test is *skipped* when a gradient it needs
was not attempted, and *fails* with the student's file and line when their code raised.
"""

from __future__ import annotations

from typing import Any

import pytest


class Student:
    """A loaded submission (see the module docstring)."""

    def __init__(self, implementation: Any, timeout: float):
        self.implementation, self.timeout = implementation, timeout

    def gradients(self, problem: Any, *needed: str) -> dict[str, Any]:
        """The submission's Exercise-1 gradients on ``problem``; skip unless all of ``needed`` are there."""
        __tracebackhide__ = True
        run = self.implementation.run("ex1", problem, self.timeout)
        missing = [name for name in needed if name not in run.grads]
        if run.error is not None and (missing or not needed):
            raise AssertionError(run.error.describe())
        if missing or not run.grads:
            pytest.skip("not attempted: " + (", ".join(f"d{m}" for m in missing) or "no gradients yet"))
        return run.grads


@pytest.fixture(scope="session")
def student(pytestconfig: pytest.Config) -> Student:
    """The submission named by ``backprop_impl`` (session-scoped: hypothesis tests may use it).

    With ``--backprop`` on, it is the very implementation the built-in checks run (so
    ``--backprop-isolate`` applies to these tests too); otherwise it is loaded here.
    """
    from pytest_backprop import options
    from pytest_backprop.checks.session import get_state
    from pytest_backprop.usercode.base import LoadError
    from pytest_backprop.usercode.loaders import load_implementation

    kit = get_state(pytestconfig)
    if kit is not None:
        if kit.implementation is None:
            pytest.fail(f"the submission could not be loaded: {kit.load_error}", pytrace=False)
        return Student(kit.implementation, kit.settings.timeout)
    spec = options.get(pytestconfig, "impl")
    if not spec:
        pytest.fail("no submission: set backprop_impl in pyproject.toml or pass --backprop-impl", pytrace=False)
    try:
        implementation = load_implementation(spec, pytestconfig.rootpath)
    except LoadError as exc:
        pytest.fail(f"the submission could not be loaded: {exc}", pytrace=False)
    return Student(implementation, options.get(pytestconfig, "timeout"))
