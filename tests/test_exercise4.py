"""The kit's Exercise 4 check (backprop::ex4::sgd), its plots, and --backprop-device validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, run_inprocess, solution_with, write_script

from pytest_backprop.checks import exercise4 as E4
from pytest_backprop.problems.device import check_device, single_thread
from pytest_backprop.usercode.base import Implementation, RunResult
from pytest_backprop.usercode.loaders import load_implementation
from pytest_backprop.usercode.run import UserError
from reference_model.data import build_splits, load_words
from reference_model.model import Config
from pytest_backprop.problems.lecture import PARAMETERS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def words():
    return load_words(None)


@pytest.fixture(scope="module")
def dataset(words):
    return build_splits(words)


def check(impl, words, dataset, steps=8):
    with single_thread():
        return E4.sgd_check(impl, words, Config(), steps=steps, dataset=dataset)


def script(tmp_path: Path, source: str) -> Implementation:
    path = tmp_path / "student.py"
    path.write_text(source)
    return load_implementation(str(path), tmp_path)


def test_correct_solution_tracks_autograd(words, dataset):
    result = check(load_implementation(str(EXAMPLES / "ex1_solution.py"), EXAMPLES), words, dataset, steps=10)
    v = result.verdict
    assert (v.exercise, v.tensor, v.status, v.diagnosis.code) == ("ex4", "sgd", "pass", "ok")
    assert len(result.losses["yours"]) == len(result.losses["autograd"]) == 10
    assert result.losses["yours"][-1] < result.losses["yours"][0]
    assert max(abs(a - b) for a, b in zip(result.losses["yours"], result.losses["autograd"])) < 1e-5
    assert set(v.details["final_maxdiff"]) == set(PARAMETERS)
    json.dumps(v.to_json(), allow_nan=False)


def test_reference_module_tracks_autograd(words, dataset):
    assert check(load_implementation("reference_model.backward", Path.cwd()), words, dataset, steps=5).verdict.status == "pass"


@pytest.mark.parametrize("edit_from, edit_to, parameter", [
    ("(1.0 / (n - 1))", "(1.0 / n)", "W1"),                      # Bessel: wrong from dhprebn down
    ("dC[ix] += demb[k, j]", "dC[ix] = demb[k, j]", "C"),          # forgot += on the repeated rows
    ("db1 = dhprebn.sum(0)", "db1 = dhprebn.sum(0, keepdim=True)", "b1"),  # shape
    ("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h", "W2"),           # transposed
])
def test_gradient_wrong_at_step_0_is_inherited_from_exercise_1(tmp_path, words, dataset, edit_from, edit_to, parameter):
    """Step 0 is Exercise 1's own problem: a wrong gradient there is Exercise 1's failure, not a divergence."""
    result = check(script(tmp_path, solution_with(edit_from, edit_to)), words, dataset)
    v = result.verdict
    assert v.status == "fail" and v.diagnosis.code == "inherited", v.diagnosis.message
    assert v.diagnosis.message.startswith("inherited from Exercise 1's ")
    assert "diverged" not in v.diagnosis.message and "fix that first" in v.diagnosis.message
    assert f"d{parameter}" in v.diagnosis.message
    assert v.details["step"] == 0 and v.details["parameter"] == parameter and v.details["exercise"] == "ex1"
    assert parameter in result.failing
    assert len(result.losses["yours"]) == len(result.losses["autograd"]) == 1
    assert abs(result.losses["yours"][0] - result.losses["autograd"][0]) < 1e-6  # nothing separated yet


def test_db2_of_shape_1_27_names_the_exercise_1_verdict(tmp_path, words, dataset):
    """db2 (1, 27) for b2 (27,): Exercise 1 fails it [keepdim]; Exercise 4 says so, once, instead of
    updating b2 into a (1, 27) parameter and calling that a divergence."""
    from pytest_backprop.judge.grade import verdicts_for_run
    from pytest_backprop.problems.instance import build_problem

    impl = script(tmp_path, solution_with("db2 = dlogits.sum(0)", "db2 = dlogits.sum(0, keepdim=True)"))
    problem = build_problem(words)
    ex1 = {v.tensor: v for v in verdicts_for_run("ex1", impl.run("ex1", problem, 10), problem)}
    assert ex1["b2"].status == "fail"
    with single_thread():
        result = E4.sgd_check(impl, words, Config(), steps=8, dataset=dataset, exercise1=ex1)
    v = result.verdict
    assert (v.status, v.diagnosis.code) == ("fail", "inherited")
    assert v.diagnosis.message == (f"inherited from Exercise 1's db2 [{ex1['b2'].diagnosis.code}]: db2 already fails "
                                   "there; fix that first (training with a wrong gradient cannot track autograd)")
    assert v.details["inherited_from"] == "b2" and v.details["wrong"] == ["b2"]


def test_exercise_1_root_is_named_for_an_inherited_parameter(tmp_path, words, dataset):
    """Bessel's 1/n: dW1 fails in Exercise 1 only as inherited from dbndiff2; Exercise 4 names dbndiff2."""
    from pytest_backprop.checks.independent import grade_exercise
    from pytest_backprop.problems.instance import build_problem

    impl = script(tmp_path, solution_with("(1.0 / (n - 1))", "(1.0 / n)"))
    problem = build_problem(words)
    ex1 = {v.tensor: v for v in grade_exercise(impl, "ex1", problem, 10).verdicts}
    with single_thread():
        v = E4.sgd_check(impl, words, Config(), steps=4, dataset=dataset, exercise1=ex1).verdict
    assert v.diagnosis.code == "inherited" and v.details["inherited_from"] == "bndiff2"
    assert v.diagnosis.message.startswith("inherited from Exercise 1's dbndiff2 [scale]: ")


def test_wrong_at_step_0_but_right_in_exercise_1_is_its_own_failure(tmp_path, words, dataset):
    """When Exercise 1 passed (e.g. it ran in float64), a step-0 failure is not inherited from it."""
    impl = script(tmp_path, solution_with("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h"))
    with single_thread():
        v = E4.sgd_check(impl, words, Config(), steps=3, dataset=dataset, exercise1={}).verdict
    assert v.status == "fail" and v.diagnosis.code == "transposed"
    assert "though Exercise 1 passes it" in v.diagnosis.message


class LateBug(Implementation):
    """Correct gradients until ``step``, then dW1 scaled by 1.001 (a bug that only shows when training)."""

    def __init__(self, inner: Implementation, step: int):
        self.inner, self.step, self.calls = inner, step, 0

    def run(self, exercise, problem, timeout):
        run = self.inner.run(exercise, problem, timeout)
        if self.calls >= self.step:
            run.grads["W1"] = run.grads["W1"] * 1.001
        self.calls += 1
        return run


def test_failure_names_the_step_and_parameter(words, dataset):
    inner = load_implementation(str(EXAMPLES / "ex1_solution.py"), EXAMPLES)
    result = check(LateBug(inner, 3), words, dataset)
    assert result.verdict.diagnosis.code == "diverged"
    assert result.verdict.details["step"] == 3 and result.verdict.details["parameter"] == "W1"
    assert "diverged at step 3 in W1" in result.verdict.diagnosis.message
    assert "right at every earlier step" in result.verdict.diagnosis.message
    assert len(result.losses["yours"]) == 4


ACCUMULATING = """
from reference_model.backward import backward as correct_backward

seen = []

def backward(cache):
    grads = correct_backward(cache)
    seen.append(grads["W1"])
    grads["W1"] = sum(seen)  # accumulated across calls, like a .grad never zeroed
    return grads
"""


def test_state_kept_between_steps_diverges_at_step_1(tmp_path, words, dataset):
    """A module that keeps gradients between calls is right at step 0 (Exercise 1 passes) and diverges at 1."""
    path = tmp_path / "accumulating.py"
    path.write_text(ACCUMULATING)
    v = check(load_implementation(str(path), tmp_path), words, dataset, steps=4).verdict
    assert (v.status, v.diagnosis.code, v.details["step"], v.details["parameter"]) == ("fail", "diverged", 1, "W1")
    assert v.diagnosis.message.startswith("diverged at step 1 in W1")


def _params(value: float) -> dict[str, torch.Tensor]:
    return {p: torch.full((3, 4), value) for p in PARAMETERS}


def test_trajectory_rule_allows_autograds_own_drift_and_no_more():
    truth = {p: t.double() for p, t in _params(0.5).items()}
    autograd = {p: t + 1e-6 for p, t in _params(0.5).items()}
    # within 10x autograd's own drift (+ a floor of 16 eps x max|truth|): passes
    assert E4.first_divergence(4, {p: t + 5e-6 for p, t in _params(0.5).items()}, autograd, truth) is None
    yours = {p: t.clone() for p, t in _params(0.5).items()}
    yours["bngain"] = yours["bngain"] + 1e-4
    div = E4.first_divergence(4, yours, autograd, truth)
    assert div is not None and (div.step, div.parameter, div.kind) == (4, "bngain", "trajectory")
    own = float((autograd["bngain"].double() - truth["bngain"]).abs().max())  # ~1e-6 after float32 rounding
    assert div.atol == pytest.approx(10 * own + 16 * torch.finfo(torch.float32).eps * 0.5)
    assert "diverged at step 4 in bngain" in div.message


class Raising(Implementation):
    def run(self, exercise, problem, timeout):
        return RunResult({}, UserError("ZeroDivisionError", "division by zero"))


class Partial(Implementation):
    def __init__(self, inner):
        self.inner = inner

    def run(self, exercise, problem, timeout):
        run = self.inner.run(exercise, problem, timeout)
        run.grads.pop("C")
        return run


def test_exception_and_missing_gradients(words, dataset):
    err = check(Raising(), words, dataset).verdict
    assert err.status == "error" and "raised at SGD step 0" in err.diagnosis.message
    inner = load_implementation(str(EXAMPLES / "ex1_solution.py"), EXAMPLES)
    skip = check(Partial(inner), words, dataset).verdict
    assert skip.status == "skip" and "missing: dC" in skip.diagnosis.message


def test_write_plots_for_a_failure(tmp_path, words, dataset):
    result = check(script(tmp_path, solution_with("(1.0 / (n - 1))", "(1.0 / n)")), words, dataset)
    written = E4.write_plots(result, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert "ex4_loss.png" in names and "ex4_step0_dC.png" in names and "ex4_step0_dW1.png" in names
    assert all(p.read_bytes()[:8] == PNG for p in written)


def test_heatmap_of_a_wrong_shape(tmp_path):
    from pytest_backprop.report.plots import difference_heatmap

    path = difference_heatmap("db1", torch.zeros(1, 4), torch.ones(4), tmp_path / "b1.png")
    assert path.read_bytes()[:8] == PNG


def test_check_device():
    assert check_device("cpu") == "cpu" and check_device(None) == "cpu"
    with pytest.raises(pytest.UsageError, match="not a torch device"):
        check_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(pytest.UsageError, match="CUDA is not available"):
            check_device("cuda:0")


def test_plugin_end_to_end(pytester, tmp_path):
    """Real plugin: a buggy script fails ex4 at step 0 with plots; matplotlib only when plots are asked for."""
    student = write_script(pytester, solution_with("(1.0 / (n - 1))", "(1.0 / n)"))
    pytester.makeconftest("import sys\n"
                          "def pytest_unconfigure(config):\n"
                          "    open('modules.txt', 'w').write(str('matplotlib' in sys.modules))\n")
    plots = tmp_path / "plots"
    result = pytester.runpytest_subprocess("--backprop", f"--backprop-impl={student}", "--backprop-steps=3",
                                           f"--backprop-plots={plots}", "--backprop-examples=0", "-q")
    result.stdout.fnmatch_lines(["*Exercise 4 ?inherited?: inherited from Exercise 1's dbndiff2 ?scale?: *dW1* already "
                                 "fail there; fix that first*", "*ex4      sgd*FAIL*"])
    assert "diverged" not in result.stdout.str()
    assert (plots / "ex4_loss.png").is_file() and (plots / "ex4_step0_dW1.png").is_file()
    assert (plots / "ex1_dbndiff2.png").read_bytes()[:8] == PNG  # Exercise 1's failing gradients too
    assert not (plots / "ex1_dbnvar.png").exists()  # a passing gradient gets no heatmap
    assert (pytester.path / "modules.txt").read_text() == "True"
    result = pytester.runpytest_subprocess("--backprop", f"--backprop-impl={EXAMPLES / 'ex1_solution.py'}",
                                           "--backprop-steps=0", "--backprop-examples=0", "-q")
    assert "ex4" not in result.stdout.str()
    assert (pytester.path / "modules.txt").read_text() == "False"


def test_device_usage_error(pytester):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run_inprocess(pytester, "--backprop", f"--backprop-impl={EXAMPLES / 'ex1_solution.py'}",
                           "--backprop-device=cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--backprop-device=cuda: CUDA is not available here*"])


class _Config:
    def __init__(self, cli, ini):
        self.cli, self.ini = cli, ini

    def getoption(self, name, default=None):
        return self.cli.get(name, default)

    def getini(self, name):
        return self.ini.get(name, "")


class _Kit:
    def __init__(self, steps=50, isolate=False, cli=None, ini=None):
        self.values = {"steps": steps, "isolate": isolate}
        self.config = _Config(cli or {}, ini or {})

    def option(self, name):
        return self.values[name]


def test_session_steps_are_not_cut_under_isolation():
    """One warm child serves every step, so --backprop-isolate runs the full check."""
    assert E4.session_steps(_Kit()) == 50
    assert E4.session_steps(_Kit(isolate=True)) == 50
    assert E4.session_steps(_Kit(steps=8, isolate=True, ini={"backprop_steps": "8"})) == 8


class NanW2(Implementation):
    def __init__(self, inner):
        self.inner = inner

    def run(self, exercise, problem, timeout):
        run = self.inner.run(exercise, problem, timeout)
        run.grads["W2"] = torch.full_like(run.grads["W2"], float("nan"))
        return run


def test_nan_gradient_fails_and_the_verdict_stays_valid_json(words, dataset):
    inner = load_implementation(str(EXAMPLES / "ex1_solution.py"), EXAMPLES)
    v = check(NanW2(inner), words, dataset).verdict
    assert v.status == "fail" and v.details["parameter"] == "W2"
    json.dumps(v.to_json(), allow_nan=False)
