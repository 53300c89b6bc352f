"""Shared helpers for the test suite.

Plugin behaviour is tested as users run it, with the installed plugin (entry point ``backprop``):
``run_kit`` runs pytest in this process (``pytester.runpytest_inprocess``: torch, hypothesis and the
kit are imported once, so a run costs the kit's work, not three imports); tests of what only a
process shows (torch never imported, exit codes, xdist, isolation) use ``runpytest_subprocess``,
which :func:`_bytecode_for_subprocesses` lets cache its bytecode. Paths below point at the
repository's example implementations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

# One thread for torch in the workers and in every process the tests start: xdist already runs one
# worker per core, and the kit's tensors are too small to gain from more; a second OpenMP thread per
# process only spins against the other worker (measured: the homework's autograder tests 172 -> 143 s CPU).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SHARED_NAMES = REPO.parent / "shared" / "names.txt"

try:  # hypothesis profiles: derandomized under CI, so the suite is deterministic
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("dev", deadline=None, print_blob=True)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def ex1_solution() -> Path:
    """The lecture-style straight-line Exercise 1 solution script."""
    return EXAMPLES / "ex1_solution.py"


@pytest.fixture
def shared_names() -> Path:
    """../shared/names.txt (the lecture's dataset); the test is skipped when it is absent."""
    if not SHARED_NAMES.is_file():
        pytest.skip("../shared/names.txt is not present")
    return SHARED_NAMES


#: Only the per-gradient items: no hypothesis properties, no Exercise-4 training check.
GRADIENTS_ONLY = ("--backprop", "--backprop-examples=0", "--backprop-steps=0")


def run_kit(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """``pytest --backprop`` in this process, restricted to the per-gradient items."""
    return run_inprocess(pytester, *GRADIENTS_ONLY, *args)


def run_inprocess(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """``pytest *args`` in this process (``pytester.runpytest_inprocess``), with what the kit imports
    lazily imported when this conftest is (:func:`_preload_kit`): pytester drops the modules imported
    while a test that uses it runs, and torch's must not be imported twice."""
    return pytester.runpytest_inprocess(*args)


_PRELOAD = ("pytest_backprop.plugin", "pytest_backprop.checks.session", "pytest_backprop.checks.exercise4",
            "pytest_backprop.items.collect", "pytest_backprop.items.properties", "pytest_backprop.properties.checks",
            "pytest_backprop.properties.explain", "pytest_backprop.grading.gradescope", "pytest_backprop.grading.points",
            "pytest_backprop.grading.student", "pytest_backprop.usercode.isolate", "pytest_backprop.usercode.notebook",
            "pytest_backprop.report.plots", "pytest_backprop.fixtures", "reference_model.backward",
            "reference_model.backward_lines", "reference_model.train")


def _preload_kit() -> None:
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra
            pass


_preload_kit()


def _keep_libraries_between_inprocess_runs() -> None:
    """pytester restores ``sys.modules`` after each in-process run, dropping what the run imported;
    for the user's modules that is right (each run imports them afresh), but a torch submodule
    imported twice registers its operators twice and fails. Keep libraries' modules."""
    import _pytest.pytester as pytester_module

    keep = ("torch", "torchgen", "functorch", "numpy", "sympy", "mpmath", "hypothesis", "_hypothesis_pytestplugin",
            "pytest_backprop", "reference_model", "matplotlib", "PIL", "IPython", "jupyter_client", "nbformat",
            "nbclient", "ipykernel", "zmq", "tornado", "traitlets")
    original = pytester_module.SysModulesSnapshot

    class KeepLibraries(original):  # type: ignore[misc,valid-type]
        def __init__(self, preserve=None):
            super().__init__(preserve=lambda name: name.split(".")[0] in keep or bool(preserve and preserve(name)))

    pytester_module.SysModulesSnapshot = KeepLibraries


_keep_libraries_between_inprocess_runs()


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, compute: Callable[[Path], Any]) -> Any:
    """``compute(folder)`` once for the whole test run, however many xdist workers ask: the first
    computes it under a file lock in a folder all workers share, the others wait and read its JSON
    result. (The homework's end-to-end grades and the docs build take a minute of CPU; a session
    fixture alone would compute them once per worker.)

    Example::

        data = once_per_run(tmp_path_factory, "graded", lambda folder: {"score": 38})
    """
    import fcntl
    import json

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by this run's workers
    folder = root / f"once-{name}"
    folder.mkdir(exist_ok=True)
    with open(root / f"once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = folder / "result.json"
        if not result.is_file():
            result.write_text(json.dumps(compute(folder)))
        return json.loads(result.read_text())


@pytest.fixture(autouse=True, scope="session")
def _bytecode_for_subprocesses() -> None:
    """Let the pytest subprocesses of the tests write bytecode (where PYTHONDONTWRITEBYTECODE is set,
    each would otherwise re-compile and assertion-rewrite hypothesis and the kit: ~1.5 s a run)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def write_script(pytester: pytest.Pytester, source: str, name: str = "student.py") -> Path:
    """Write a user implementation into the pytester directory and return its path."""
    path = pytester.path / name
    path.write_text(source)
    return path


def solution_with(edit_from: str, edit_to: str, count: int = 1) -> str:
    """The example Exercise 1 solution with one textual edit (a single mutation)."""
    source = (EXAMPLES / "ex1_solution.py").read_text()
    assert source.count(edit_from) >= 1, f"edit target not found: {edit_from!r}"
    return source.replace(edit_from, edit_to, count)


#: Test files whose tests start whole pytest or autograder processes (seconds each), run first: xdist
#: hands out tests in order, round robin at first, so the long ones spread over the workers and the
#: quick ones fill in at the end instead of one worker finishing a long test alone.
LONG_FIRST = ("test_homework.py", "test_loaders_isolate.py", "test_xdist.py", "test_exercise4.py", "test_magics.py",
              "test_docs.py", "test_smoke.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of LONG_FIRST first (a stable sort: every worker collects the same order)."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))
