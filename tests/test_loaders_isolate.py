"""--backprop-isolate: user code in a child process cannot end pytest or change a verdict.

Each isolated run starts a Python process (~1-3 s), so this file keeps to a few cases.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pytest_backprop.judge.grade import verdicts_for_run
from pytest_backprop.problems.instance import build_problem, resolve_words
from pytest_backprop.usercode.base import LoadError
from pytest_backprop.usercode.isolate import IsolatedImplementation, static_description

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ex1_solution.py"


@pytest.fixture(scope="module")
def problem():
    return build_problem(resolve_words(None))


def isolated(tmp_path: Path, source: str, name: str = "student.py") -> IsolatedImplementation:
    (tmp_path / name).write_text(textwrap.dedent(source))
    return IsolatedImplementation(name, tmp_path)


def test_os_exit_in_user_code_is_a_verdict(tmp_path, problem):
    impl = isolated(tmp_path, """
        import os
        dlogprobs = torch.zeros_like(logprobs)
        os._exit(3)
    """)
    run = impl.run("ex1", problem, 10)
    # os._exit raises SystemExit while user code runs: what was computed before it comes back
    assert run.error.type == "SystemExit" and "os._exit(3)" in run.error.message
    verdicts = verdicts_for_run("ex1", run, problem)
    assert verdicts[0].tensor == "logprobs" and verdicts[0].status == "fail"  # checked, not lost
    assert verdicts[1].status == "skip"  # dprobs is not written at all: not attempted
    assert any(w.code == "statement_error" and "os._exit(3)" in w.message for w in run.warnings)


def test_a_process_that_really_dies_is_a_verdict(tmp_path, problem):
    impl = isolated(tmp_path, """
        import os, signal
        dlogprobs = torch.zeros_like(logprobs)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = impl.run("ex1", problem, 10)
    assert run.error.type == "ProcessDied"
    verdicts = verdicts_for_run("ex1", run, problem)
    assert verdicts[0].status == "error" and "ProcessDied" in verdicts[0].diagnosis.message


def test_monkeypatching_in_the_child_cannot_change_the_verdict(tmp_path, problem):
    impl = isolated(tmp_path, """
        import torch
        torch.allclose = lambda *a, **k: True
        torch.testing.assert_close = lambda *a, **k: None
        torch.equal = lambda *a, **k: True
        # not restored by the in-process guard: would make every assert_close pass in pytest's process
        torch.testing._comparison.TensorLikePair.compare = lambda self: None
        dlogprobs = torch.zeros_like(logprobs)   # wrong
        dprobs = (1.0 / probs) * torch.ones_like(probs)   # wrong
    """)
    run = impl.run("ex1", problem, 10)
    statuses = {v.tensor: v.status for v in verdicts_for_run("ex1", run, problem)}
    assert statuses["logprobs"] == "fail" and statuses["probs"] == "fail"


def test_segfault_in_user_code_is_a_verdict(tmp_path, problem):
    impl = isolated(tmp_path, "import ctypes\ndlogprobs = torch.zeros_like(logprobs)\nctypes.string_at(0)\n")
    run = impl.run("ex1", problem, 10)
    assert run.error.type == "ProcessDied" and "signal" in run.error.message


def test_correct_code_passes_isolated_with_tensors_sent_back(tmp_path, problem):
    impl = isolated(tmp_path, EXAMPLE.read_text())
    assert impl.exercises() == ("ex1",) and "isolated" in impl.description
    run = impl.run("ex1", problem, 30)
    assert run.error is None and len(run.grads) == 26
    assert all(v.status == "pass" for v in verdicts_for_run("ex1", run, problem))


def test_static_description_runs_no_code(tmp_path):
    (tmp_path / "boom.py").write_text("raise SystemExit('ran!')\ndef backward(cache):\n    return {}\n")
    assert static_description("boom.py", tmp_path)[0] == ("ex1",)
    (tmp_path / "lines.py").write_text("def backward_h(dh, h):\n    return dh\n"
                                       "def cross_entropy_backward(logits):\n    return logits\n")
    assert static_description("lines.py", tmp_path)[0] == ("ex1", "ex2", "lines")
    assert static_description("some.module", tmp_path) is None
    with pytest.raises(LoadError, match="no such file"):
        static_description("missing.py", tmp_path)


def test_isolate_end_to_end_session_survives(pytester):
    pytester.makepyfile(student="import os, signal\ndlogprobs = torch.zeros_like(logprobs)\n"
                                "os.kill(os.getpid(), signal.SIGKILL)\n",
                        test_mine="def test_mine():\n    assert True\n")
    result = pytester.runpytest_subprocess("--backprop", "--backprop-impl=student.py", "--backprop-isolate",
                                           "-k", "not properties and not ex4", "test_mine.py")
    result.stdout.fnmatch_lines(["*test_mine.py*", "*ProcessDied*"])
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 1 and outcomes["failed"] == 1 and outcomes["skipped"] == 27
