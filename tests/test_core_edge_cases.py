"""Edge cases of real student code: placeholders, late crashes, code that cannot load."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLES, run_inprocess, solution_with, write_script

from pytest_backprop.checks.independent import grade_exercise
from pytest_backprop.judge.compare import compare
from pytest_backprop.judge.diagnose import diagnose
from pytest_backprop.judge.grade import verdicts_for_run
from pytest_backprop.problems.instance import build_problem
from pytest_backprop.usercode.modules import ScriptImplementation
from reference_model.data import load_words


@pytest.fixture(scope="module")
def problem():
    return build_problem(load_words())


def run(tmp_path, source, problem, timeout=None):
    path = tmp_path / "student.py"
    path.write_text(source)
    graded = grade_exercise(ScriptImplementation(path), "ex1", problem, timeout)  # as `pytest --backprop` grades
    return graded.first, {v.tensor: v for v in graded.verdicts}


def test_an_endless_loop_after_every_gradient_is_assigned_is_still_an_error(problem, tmp_path):
    source = solution_with("dC = torch.zeros_like(C)", "dC = torch.zeros_like(C)\nwhile True:\n    pass")
    result, verdicts = run(tmp_path, source, problem, timeout=1)
    assert result.error is not None and result.error.timeout
    assert verdicts["C"].status == "error" and verdicts["C"].diagnosis.code == "timeout"
    assert "still running after 1 s" in verdicts["C"].diagnosis.message  # the loop that never ends, at its line
    assert verdicts["C"].location.source == "for k in range(Xb.shape[0]):"  # dC's own statement that never ran
    assert all(v.status == "pass" for name, v in verdicts.items() if name != "C")


def test_a_crash_after_correct_gradients_becomes_a_warning(problem, tmp_path):
    source = (EXAMPLES / "ex1_solution.py").read_text() + "\nraise RuntimeError('plotting failed')\n"
    result, verdicts = run(tmp_path, source, problem)
    assert all(v.status == "pass" for v in verdicts.values())
    assert [w.code for w in result.warnings] == ["statement_error"]  # the line that raised assigns no gradient
    assert "plotting failed" in result.warnings[0].message and "raise RuntimeError" in result.warnings[0].message


@pytest.mark.parametrize("actual_shape, expected_shape, fix", [
    ((32,), (32, 1), ".sum(1, keepdim=True)"),
    ((64,), (1, 64), ".sum(0, keepdim=True)"),
    ((1, 64), (64,), ".sum(0)` without keepdim"),
])
def test_keepdim_hint_names_the_dimension(actual_shape, expected_shape, fix):
    truth = torch.randn(expected_shape)
    hint = diagnose("x", compare(truth.reshape(actual_shape), truth))
    assert hint.code == "keepdim" and fix in hint.message


def test_a_list_below_a_wrong_gradient_is_its_own_type_mistake(problem, tmp_path):
    source = solution_with("dprobs = (1.0 / probs) * dlogprobs", "dprobs = (2.0 / probs) * dlogprobs")
    source = source.replace("dbnbias = dhpreact.sum(0, keepdim=True)", "dbnbias = [0.0] * 64")
    _, verdicts = run(tmp_path, source, problem)
    assert verdicts["probs"].diagnosis.code == "scale"
    assert verdicts["bnbias"].diagnosis.code == "type" and "list" in verdicts["bnbias"].diagnosis.message
    assert verdicts["bnraw"].diagnosis.code == "inherited"


def test_code_that_cannot_load_keeps_the_same_items_and_says_so(pytester):
    script = write_script(pytester, "def broken(:\n")
    result = run_inprocess(pytester, "--backprop", f"--backprop-impl={script}", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes == {"failed": 1, "skipped": 29}  # as many items as a loadable script gets (ex2, ex3 too)
    result.stdout.fnmatch_lines(["your code did not finish (ex1) [[]exception[]]:", "*invalid syntax*"])
    assert "look at: loss" not in result.stdout.str()


def test_timeout_skips_the_property_and_training_checks(pytester):
    source = solution_with("dC = torch.zeros_like(C)", "dC = torch.zeros_like(C)\nwhile True:\n    pass")
    script = write_script(pytester, source)
    result = run_inprocess(pytester, "--backprop", f"--backprop-impl={script}", "--backprop-timeout=1", "-rs")
    result.assert_outcomes(passed=25, failed=1, skipped=4)
    result.stdout.fnmatch_lines(["*ex4: not run: your code did not finish Exercise 1*",
                                 "*your code did not finish ex1 at the lecture's sizes*"])


def test_module_keys_may_carry_the_d_and_unknown_keys_are_warned(problem, tmp_path):
    from pytest_backprop.usercode.modules import ModuleImplementation

    path = tmp_path / "mod.py"
    path.write_text("import torch\n"
                    "def backward(cache):\n"
                    "    d = torch.zeros_like(cache['logprobs'])\n"
                    "    d[range(cache['n']), cache['Yb']] = -1.0 / cache['n']\n"
                    "    return {'dlogprobs': d, 'prob': d}\n")
    result = ModuleImplementation(str(path), path).run("ex1", problem, None)
    verdicts = {v.tensor: v for v in verdicts_for_run("ex1", result, problem)}
    assert verdicts["logprobs"].status == "pass"
    assert [w.code for w in result.warnings] == ["unknown_key"]
    assert "'prob'" in result.warnings[0].message and "did you mean 'probs'" in result.warnings[0].message


def test_time_limit_re_arms_an_outer_timer():
    import signal

    from pytest_backprop.usercode.run import UserCodeTimeout, time_limit

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)  # e.g. pytest-timeout's
        with time_limit(1.0):
            pass
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3.0 < left <= 5.0
        with pytest.raises(UserCodeTimeout):
            with time_limit(0.05):
                while True:
                    pass
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired


def test_os_exit_in_user_code_ends_the_run_not_pytest(problem, tmp_path):
    import os

    source = solution_with("dh = dlogits @ W2.T", "import os\nos._exit(3)\ndh = dlogits @ W2.T")
    result, verdicts = run(tmp_path, source, problem)
    assert result.error.type == "SystemExit" and "os._exit(3)" in result.error.message
    assert verdicts["logits"].status == "pass"  # computed before the exit: still checked
    assert verdicts["h"].status == "error"
    assert os._exit.__module__ == "posix"  # restored
