"""Scripts and modules that misbehave: exceptions, endless loops, mutation, wrong types, copied .grad."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_backprop.judge.grade import verdicts_for_run
from pytest_backprop.problems.instance import build_problem, resolve_words
from pytest_backprop.usercode.autograd_use import autograd_use
from pytest_backprop.usercode.base import inject
from pytest_backprop.usercode.loaders import load_implementation
from pytest_backprop.usercode.modules import ModuleImplementation, ScriptImplementation
from conftest import run_inprocess

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ex1_solution.py"


@pytest.fixture(scope="module")
def problem():
    return build_problem(resolve_words(None))


def run_script(tmp_path: Path, source: str, problem, *, timeout: float | None = 10, name: str = "student.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    impl = load_implementation(str(path), tmp_path)
    assert isinstance(impl, ScriptImplementation)
    run = impl.run("ex1", problem, timeout)
    return run, {v.tensor: v for v in verdicts_for_run("ex1", run, problem)}


def test_example_solution_passes(problem, tmp_path):
    run, verdicts = run_script(tmp_path, EXAMPLE.read_text(), problem)
    assert run.error is None and all(v.status == "pass" for v in verdicts.values())


def test_exception_is_located_and_earlier_gradients_still_checked(problem, tmp_path):
    source = EXAMPLE.read_text().replace("dh = dlogits @ W2.T", "dh = dlogits @ W2  # transposed wrong")
    run, verdicts = run_script(tmp_path, source, problem)
    assert run.error.type == "RuntimeError" and run.error.filename.endswith("student.py")
    assert run.error.source_line.startswith("dh = dlogits @ W2")
    assert verdicts["logits"].status == "pass"
    assert verdicts["h"].status == "error" and "student.py:" in verdicts["h"].diagnosis.message
    # the statements after the raising one did not run: an error at their own line, never a pass
    assert verdicts["W2"].status == "error" and "not reached" in verdicts["W2"].diagnosis.message
    assert verdicts["W2"].location.source == "dW2 = h.T @ dlogits"


def test_endless_loop_becomes_timeout_verdict(problem, tmp_path):
    source = "dlogprobs = torch.zeros_like(logprobs)\nwhile True:\n    pass\ndprobs = (1.0 / probs) * dlogprobs\n"
    run, verdicts = run_script(tmp_path, source, problem, timeout=0.5)
    assert run.error.timeout and run.error.lineno in (2, 3)
    assert verdicts["logprobs"].status == "fail"  # computed before the loop: still checked
    assert verdicts["probs"].status == "error" and verdicts["probs"].diagnosis.code == "timeout"
    assert "--backprop-timeout" in verdicts["probs"].diagnosis.message


def test_sys_exit_is_a_verdict_not_the_end_of_pytest(problem, tmp_path):
    run, verdicts = run_script(tmp_path, "import sys\ndlogprobs = None\nsys.exit(1)\n", problem)
    assert run.error.type == "SystemExit"


def test_mutation_does_not_change_truth_or_next_run(problem, tmp_path):
    truth = problem.grads["probs"].clone()
    before = problem["counts"].clone()
    run, _ = run_script(tmp_path, "counts.mul_(0)\nprobs.grad = None\nn = 3\n", problem)
    assert {w.code for w in run.warnings} >= {"mutated_input", "reassigned_name"}
    assert torch.equal(problem["counts"], before) and torch.equal(problem.grads["probs"], truth)
    run2, verdicts = run_script(tmp_path, EXAMPLE.read_text(), problem, name="again.py")
    assert all(v.status == "pass" for v in verdicts.values())


def test_handed_out_tensors_have_no_grad_or_graph(problem, tmp_path):
    source = """
    seen = [t.grad is None and not t.requires_grad for t in (logprobs, probs, hpreact, C, W1)]
    assert all(seen), seen
    dlogprobs = torch.zeros_like(logprobs)
    dlogprobs[range(n), Yb] = -1.0/n
    """
    run, verdicts = run_script(tmp_path, source, problem)
    assert run.error is None and verdicts["logprobs"].status == "pass"


def test_copying_grad_gives_reads_autograd(problem, tmp_path):
    source = EXAMPLE.read_text().replace("dhpreact = (1.0 - h**2) * dh", "dhpreact = hpreact.grad")
    run, verdicts = run_script(tmp_path, source, problem)
    assert verdicts["hpreact"].status == "fail"
    assert verdicts["hpreact"].diagnosis.code == "reads_autograd"
    assert "your own derivation" in verdicts["hpreact"].diagnosis.message
    assert "student.py:" in verdicts["hpreact"].diagnosis.message
    # The next line multiplies None: that exception is traced to the copy too.
    assert verdicts["bngain"].status == "error" and verdicts["bngain"].diagnosis.code == "reads_autograd"
    assert "dhpreact" in verdicts["bngain"].diagnosis.message


def test_calling_a_method_on_grad_gives_reads_autograd(problem, tmp_path):
    source = EXAMPLE.read_text().replace("dh = dlogits @ W2.T", "dh = h.grad.clone()")
    run, verdicts = run_script(tmp_path, source, problem)
    assert verdicts["h"].diagnosis.code == "reads_autograd" and verdicts["h"].status == "error"
    assert verdicts["logits"].status == "pass"


def test_autograd_use_maps_cmp_calls():
    use = autograd_use("x = hpreact.grad\ncmp('hpreact', x, hpreact)\ncmp('h', h.grad, h)\nloss.backward()\n")
    assert use.assigned == {"x": 1} and use.cmp_vars == {"x": "hpreact"} and use.cmp_direct == {"h": 3}
    assert 4 in use.lines
    assert autograd_use("dh = dlogits @ W2.T\n").lines == []


def test_none_is_a_placeholder_not_an_answer(problem, tmp_path):
    run, verdicts = run_script(tmp_path, "dlogprobs = None  # TODO\n", problem)
    v = verdicts["logprobs"]
    assert v.status == "skip" and v.diagnosis.message == "not attempted: dlogprobs is None"


@pytest.mark.parametrize("answer, words", [
    ("[0.0] * 32", "list"),
    ("np.zeros((32, 27), dtype=np.float32)", "numpy.ndarray of shape (32, 27)"),
    ("torch.zeros((32, 27), dtype=torch.long)", "int64 tensor"),
    ("torch.zeros((32, 27), dtype=torch.float64)", "float64 tensor"),
])
def test_wrong_types_get_a_precise_message(answer, words, problem, tmp_path):
    run, verdicts = run_script(tmp_path, f"import numpy as np\ndlogprobs = {answer}\n", problem)
    v = verdicts["logprobs"]
    assert v.status == "fail" and words in v.diagnosis.message
    assert "(32, 27)" in v.diagnosis.message


def test_module_exercises_2_and_3_get_injected_arguments(problem, tmp_path):
    path = tmp_path / "mymod.py"
    path.write_text(textwrap.dedent("""
        import torch.nn.functional as F
        def cross_entropy_backward(logits, Yb, n):
            d = F.softmax(logits, 1)
            d[range(n), Yb] -= 1
            return d / n
        def batchnorm_backward(dhpreact, bngain, bnvar_inv, bnraw, n):
            return bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))
    """))
    impl = load_implementation(str(path), tmp_path)
    assert isinstance(impl, ModuleImplementation) and impl.exercises() == ("ex2", "ex3")
    for ex in ("ex2", "ex3"):
        verdicts = verdicts_for_run(ex, impl.run(ex, problem, 10), problem)
        assert [v.status for v in verdicts] == ["pass"]


def test_exercise_3_cannot_ask_for_true_intermediate_gradients(problem, tmp_path):
    path = tmp_path / "cheat3.py"
    path.write_text("def batchnorm_backward(dbndiff):\n    return dbndiff\n")
    impl = load_implementation(str(path), tmp_path)
    run = impl.run("ex3", problem, 10)
    assert run.error is not None and "dbndiff" in run.error.message and "cannot supply" in run.error.message


def test_inject_names_what_it_cannot_supply():
    with pytest.raises(TypeError, match="asks for `bogus`"):
        inject(lambda logits, bogus: None, {"logits": 1})
    assert inject(lambda a, b=2: a + b, {"a": 1}) == 3


def test_monkeypatching_torch_in_process_is_undone(problem, tmp_path):
    source = """
    torch.allclose = lambda *a, **k: True
    torch.testing.assert_close = lambda *a, **k: None
    torch.equal = lambda *a, **k: True
    torch.Tensor.sum = lambda *a, **k: torch.tensor(0.0)  # a new attribute shadowing TensorBase.sum
    del torch.Tensor.__repr__  # and one removed in the same run
    torch.nn.functional.softmax = None
    dlogprobs = torch.zeros_like(logprobs)
    """
    run, verdicts = run_script(tmp_path, source, problem)
    assert verdicts["logprobs"].status == "fail"
    assert not torch.allclose(torch.zeros(1), torch.ones(1)) and not torch.equal(torch.zeros(1), torch.ones(1))
    assert float(torch.ones(3).sum()) == 3.0 and "sum" not in vars(torch.Tensor)
    assert "__repr__" in vars(torch.Tensor) and repr(torch.ones(1)) == "tensor([1.])"
    assert torch.nn.functional.softmax(torch.zeros(2), 0).tolist() == [0.5, 0.5]


def test_endless_loop_end_to_end_session_goes_on(pytester):
    pytester.makepyfile(student="dlogprobs = torch.zeros_like(logprobs)\nwhile True:\n    pass\n"
                                "dprobs = (1.0 / probs) * dlogprobs\n",
                        test_mine="def test_mine():\n    assert True\n")
    result = run_inprocess(pytester, "--backprop", "--backprop-impl=student.py", "--backprop-timeout=1",
                           "-k", "not properties and not ex4", "test_mine.py")
    result.stdout.fnmatch_lines(["*dprobs*timeout*still running after 1 s*"])
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 1 and outcomes["failed"] == 2  # test_mine; dlogprobs wrong, dprobs timed out


def test_script_cmp_calls_check_renamed_gradients_and_win(problem, tmp_path):
    source = """
    dL_dlogprobs = torch.zeros_like(logprobs)
    dL_dlogprobs[range(n), Yb] = -1.0/n
    dlogprobs = torch.ones_like(logprobs)       # a stale experiment under the lecture's name
    cmp('logprobs', dL_dlogprobs, logprobs)
    grad_p = (1.0 / probs) * dL_dlogprobs
    cmp('my probs', grad_p, probs)              # the tensor is recognised by identity, not by the label
    """
    run, verdicts = run_script(tmp_path, source, problem)
    assert verdicts["logprobs"].status == "pass" and verdicts["probs"].status == "pass"
    run, verdicts = run_script(tmp_path, source.replace("    cmp('logprobs', dL_dlogprobs, logprobs)\n", ""),
                               problem, name="no_cmp.py")
    assert verdicts["logprobs"].status == "fail"
