"""Per-line backward functions: each line checked against autograd's VJP, and chained into Exercise 1."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from pytest_backprop.judge.grade import verdicts_for_run
from pytest_backprop.judge.lines import check_line, judge_answers
from pytest_backprop.problems.instance import build_problem, resolve_words
from pytest_backprop.usercode import perline
from pytest_backprop.usercode.loaders import load_implementation
from pytest_backprop.usercode.perline import (
    LineAnswerError,
    LinesImplementation,
    call_line,
    chain,
    line_functions,
    random_upstream,
)
from reference_model import backward_lines
from conftest import run_inprocess

from pytest_backprop.problems.lecture import GRADIENT_ORDER, LINE_OF, LINES


@pytest.fixture(scope="module")
def problem():
    return build_problem(resolve_words(None))


@pytest.fixture(scope="module")
def values(problem):
    return problem.truth.values


def test_reference_module_has_every_line():
    assert sorted(line_functions(backward_lines)) == sorted(line.output for line in LINES)


@pytest.mark.parametrize("output", [line.output for line in LINES])
def test_reference_line_passes_its_check(output, values):
    check = check_line(getattr(backward_lines, "backward_" + output), LINE_OF[output], values)
    assert check.passed, check.message()
    assert check.verdict().status == "pass"


def test_upstream_is_random_never_ones_nor_the_truth(values, problem):
    for line in LINES:
        up = random_upstream(line, values)
        assert up.shape == values[line.output].shape and up.dtype == values[line.output].dtype
        assert not torch.equal(up, torch.ones_like(up))
        if line.output in problem.grads:
            assert not torch.allclose(up, problem.grads[line.output])
    assert torch.equal(random_upstream(LINE_OF["h"], values), random_upstream(LINE_OF["h"], values))  # seeded


def uniform_routing(dlogit_maxes, logits):
    """A wrong logit_maxes backward: spreads the gradient over the row instead of the argmax."""
    return torch.ones_like(logits) * dlogit_maxes / logits.shape[1]


def test_wrong_routing_caught_by_random_upstream_not_by_the_true_one(values, problem):
    line = LINE_OF["logit_maxes"]
    check = check_line(uniform_routing, line, values)
    assert not check.passed
    assert check.verdict().status == "fail" and "logits" in check.message()
    # With the true upstream (~0) the same mistake is invisible to the lecture's allclose (atol 1e-8):
    # why the kit never uses it.
    hidden = check_line(uniform_routing, line, values, upstream=problem.grads["logit_maxes"])
    assert torch.allclose(hidden.answers["logits"], hidden.expected["logits"])
    assert check.verdict().maxdiff > 0.1


def test_missing_broadcast_sum_fails_with_shape(values):
    def backward_probs(dprobs, counts, counts_sum_inv):
        return {"counts": counts_sum_inv * dprobs, "counts_sum_inv": counts * dprobs}  # forgot .sum(1, keepdim=True)

    check = check_line(backward_probs, LINE_OF["probs"], values)
    assert not check.passed
    assert check.diagnoses["counts"].code == "ok"
    assert check.comparisons["counts_sum_inv"].problem == "shape"
    verdict = check.verdict()
    assert verdict.status == "fail" and verdict.actual_shape == (32, 27) and verdict.expected_shape == (32, 1)


def test_call_line_accepts_d_prefixed_keys_and_bare_tensors(values):
    up = random_upstream(LINE_OF["probs"], values)
    parts = call_line(lambda dprobs, counts, counts_sum_inv: {"dcounts": counts_sum_inv * dprobs,
                                                              "dcounts_sum_inv": (counts * dprobs).sum(1, keepdim=True)},
                      LINE_OF["probs"], values, up)
    assert set(parts) == {"counts", "counts_sum_inv"}
    assert set(call_line(backward_lines.backward_h, LINE_OF["h"], values, values["h"])) == {"hpreact"}


@pytest.mark.parametrize("answer, words", [
    (lambda dprobs: dprobs, "bare tensor"),
    (lambda dprobs: None, "returned None"),
    (lambda dprobs: (dprobs, dprobs), "return a dict keyed by input name"),
    (lambda dprobs: {"logits": dprobs}, "does not read"),
])
def test_call_line_rejects_wrong_forms(answer, words, values):
    up = random_upstream(LINE_OF["probs"], values)
    with pytest.raises(LineAnswerError, match=words):
        call_line(answer, LINE_OF["probs"], values, up)
    check = check_line(answer, LINE_OF["probs"], values)
    assert check.verdict().status == "error" and words in check.message()


def test_unknown_parameter_is_named(values):
    check = check_line(lambda dh, hpreact_values: dh, LINE_OF["h"], values)
    assert check.error is not None and "hpreact_values" in check.error.message


def test_user_cannot_corrupt_values_or_upstream(values):
    before = values["counts"].clone()

    def backward_counts(dcounts, counts):
        counts.zero_()
        return counts * dcounts

    check_line(backward_counts, LINE_OF["counts"], values)
    assert torch.equal(values["counts"], before)


def test_chain_of_reference_passes_every_gradient(problem):
    run = chain(line_functions(backward_lines), problem.cache())
    assert run.error is None and sorted(run.grads) == sorted(GRADIENT_ORDER)
    verdicts = verdicts_for_run("ex1", run, problem)
    assert [v.tensor for v in verdicts if v.status != "pass"] == []


def test_chain_accumulates_both_branches(problem):
    fns = line_functions(backward_lines)
    fns["counts_sum"] = lambda dcounts_sum, counts: torch.zeros_like(counts)  # drop one branch of dcounts
    run = chain(fns, problem.cache())
    bad = {v.tensor for v in verdicts_for_run("ex1", run, problem) if v.status == "fail"}
    assert "counts" in bad and "probs" not in bad and "counts_sum" not in bad


def test_chain_with_a_wrong_line_fails_from_that_line_down(problem):
    fns = line_functions(backward_lines)
    fns["h"] = lambda dh, h: (1.0 - h) * dh  # wrong tanh derivative
    run = chain(fns, problem.cache())
    status = {v.tensor: v.status for v in verdicts_for_run("ex1", run, problem)}
    assert status["h"] == "pass" and status["W2"] == "pass"
    assert status["hpreact"] == "fail" and status["C"] == "fail"


def test_chain_with_a_missing_line_leaves_downstream_unanswered(problem):
    fns = line_functions(backward_lines)
    del fns["bnmeani"]
    run = chain(fns, problem.cache())
    assert "bnmeani" in run.grads and "hprebn" not in run.grads and "C" not in run.grads
    assert "bndiff" in run.grads  # other branches still run


def test_chain_reports_an_exception_with_location(problem, tmp_path):
    module = tmp_path / "lines_boom.py"
    module.write_text("from reference_model.backward_lines import *\n"
                      "def backward_bnvar(dbnvar, bndiff2, n):\n"
                      "    raise ValueError('boom')\n")
    impl = load_implementation(str(module), tmp_path)
    run = impl.run("ex1", problem, None)
    assert run.error is not None and run.error.lineno == 3 and "boom" in run.error.message
    status = {v.tensor: v.status for v in verdicts_for_run("ex1", run, problem)}
    assert status["bnvar"] == "pass" and status["bndiff2"] == "error"


def write_lines_module(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text("import torch\nfrom reference_model.backward_lines import *\n" + textwrap.dedent(body))
    return path


def test_load_implementation_returns_per_line_implementation(tmp_path, problem):
    path = write_lines_module(tmp_path, "lines_wrong", """
        def backward_bnvar(dbnvar, bndiff2, n):
            return 1.0 / n * torch.ones_like(bndiff2) * dbnvar   # 1/n instead of 1/(n-1)
    """)
    impl = load_implementation(str(path), tmp_path)
    assert isinstance(impl, LinesImplementation)
    assert impl.exercises() == ("ex1", "lines")
    verdicts = judge_answers(impl.line_answers(problem, None), problem)
    failing = [v.tensor for v in verdicts if v.status != "pass"]
    assert failing == ["bnvar"]
    assert "bndiff2" in verdicts[[v.tensor for v in verdicts].index("bnvar")].diagnosis.message


def test_module_with_backward_stays_a_module(tmp_path):
    path = write_lines_module(tmp_path, "both", "def backward(cache):\n    return {}\n")
    assert not isinstance(load_implementation(str(path), tmp_path), LinesImplementation)


def test_partial_per_line_module_skips_missing_lines(tmp_path, problem):
    path = tmp_path / "two_lines.py"
    path.write_text(textwrap.dedent("""
        import torch
        def backward_loss(dloss, logprobs, n, Yb):
            d = torch.zeros_like(logprobs)
            d[range(n), Yb] = -dloss / n
            return d
        def backward_logprobs(dlogprobs, probs):
            return dlogprobs / probs
    """))
    impl = load_implementation(str(path), tmp_path)
    statuses = {v.tensor: v.status for v in judge_answers(impl.line_answers(problem, None), problem)}
    assert statuses["loss"] == "pass" and statuses["logprobs"] == "pass" and statuses["probs"] == "skip"
    grads = impl.run("ex1", problem, None).grads
    assert set(grads) == {"logprobs", "probs"}


def test_perline_end_to_end(pytester):
    pytester.makepyfile(lines_student="from reference_model.backward_lines import *\n"
                                      "def backward_h(dh, h):\n    return (1.0 - h) * dh\n")
    result = run_inprocess(pytester, "--backprop", "--backprop-impl=lines_student.py", "-q", "-k", "not properties and not ex4")
    result.stdout.re_match_lines([r"lines\s+h\s.*FAIL"])
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= 2  # lines::h, then ex1::hpreact and below
    assert perline.EXERCISE == "lines"
    result.stdout.re_match_lines([r".*lines\s+probs\s.*ok"])
