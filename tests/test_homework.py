"""The ready assignment in examples/homework: the template (all not attempted), a filled-in copy
(all green, full marks through the Gradescope script), and a submission that kills pytest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES

HOMEWORK = EXAMPLES / "homework"
RUN_AUTOGRADER = HOMEWORK / "autograder" / "run_autograder"


def copy_homework(dest: Path) -> Path:
    shutil.copytree(HOMEWORK, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    return dest


def test_template_is_all_not_attempted(pytester):
    """`pytest --backprop` on the template: nothing fails, every gradient and test is skipped, exit 0."""
    copy_homework(pytester.path)
    result = pytester.runpytest_subprocess("--backprop", "-p", "no:cacheprovider", "-rs")
    assert result.ret == pytest.ExitCode.OK
    outcomes = result.parseoutcomes()
    # nothing passes either: an empty template must not earn points (property checks included)
    assert outcomes.get("failed", 0) == outcomes.get("errors", 0) == outcomes.get("passed", 0) == 0, outcomes
    assert outcomes["skipped"] >= 26 + 5  # 26 gradients, 5 instructor tests
    result.stdout.fnmatch_lines_random(["SKIPPED*dlogprobs: not attempted: no dlogprobs yet*",
                                        "SKIPPED*test_homework_backprop.py*not attempted: dlogprobs, dprobs*"])
    assert "| ok" not in "\n".join(line for line in result.outlines if line.startswith("ex1 "))


def run_autograder(root: Path, submission: str) -> dict:
    (root / "source").mkdir(parents=True)
    (root / "submission").mkdir()
    copy_homework(root / "source" / "homework")
    (root / "submission" / "homework.py").write_text(submission)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": sys.executable}
    subprocess.run(["bash", str(RUN_AUTOGRADER)], env=env, capture_output=True, text=True, timeout=600, check=True)
    return json.loads((root / "results" / "results.json").read_text())


def test_filled_in_copy_gets_full_marks_through_run_autograder(tmp_path, ex1_solution):
    data = run_autograder(tmp_path / "autograder", ex1_solution.read_text())
    failed = [t["name"] for t in data["tests"] if t["status"] != "passed"]
    assert failed == []
    assert data["score"] == data["extra_data"]["max_score"] >= 26 + 2 + 2 + 1 + 3 + 1 + 1  # dC is worth 2
    tests = {t["name"]: t for t in data["tests"]}
    assert tests["ex1::C"]["max_score"] == 2
    assert tests["tests/test_homework_backprop.py::test_every_size"]["visibility"] == "hidden"
    assert tests["tests/test_homework_backprop.py::test_first_layer_float64"]["visibility"] == "after_due_date"


def test_submission_that_kills_pytest_still_gets_a_valid_result(tmp_path):
    data = run_autograder(tmp_path / "autograder", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert data["score"] == 0
    assert data["tests"][0]["status"] == "failed" and data["tests"][0]["visibility"] == "visible"
    assert "stopped before it could grade" in data["tests"][0]["output"]
