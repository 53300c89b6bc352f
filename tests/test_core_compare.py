"""assert_grad_matches, cmp and the tolerance rule: cases (a), (b), (c) of the core issue."""

from __future__ import annotations

import pytest
import torch

from pytest_backprop import assert_grad_matches, cmp
from pytest_backprop.judge.compare import compare
from pytest_backprop.problems.instance import build_problem
from reference_model import backward as ref
from reference_model.data import load_words


@pytest.fixture(scope="module")
def problem():
    return build_problem(load_words())


@pytest.fixture(scope="module")
def answers(problem):
    return ref.backward(problem.cache())


def test_a_correct_float32_answers_pass_even_when_not_bitwise_exact(problem, answers):
    for name, truth in problem.grads.items():
        assert_grad_matches(answers[name], truth, name=name)
    # legitimate float32 differences (fma, summation order) of the observed size pass too
    for name in ("hpreact", "bnraw", "hprebn", "embcat", "W1"):
        noisy = problem.grads[name] + 7e-9 * torch.sign(torch.randn_like(problem.grads[name]))
        assert compare(noisy, problem.grads[name]).approximate, name


def test_b_correct_db1_never_fails_on_noise(problem):
    truth = problem.grads["b1"]
    assert float(truth.abs().max()) > 0  # autograd's db1 is float noise around the true 0
    student = truth + 1.1e-8  # a real student's correct db1 failed allclose at this maxdiff
    assert not torch.allclose(student, truth)  # ... the lecture's cmp says approximate: False
    assert_grad_matches(student, truth, name="b1")  # ... the kit says it is right
    assert_grad_matches(torch.zeros_like(truth), truth, name="b1")  # the exact answer, 0, passes


def test_c_fused_batchnorm_without_bessel_factor_fails(problem):
    v = problem.truth.values
    dhpreact = problem.grads["hpreact"]
    n = problem.n
    wrong = v["bngain"] * v["bnvar_inv"] / n * (n * dhpreact - dhpreact.sum(0) - v["bnraw"] * (dhpreact * v["bnraw"]).sum(0))
    result = compare(wrong, problem.grads["hprebn"])
    assert 1e-5 < result.maxdiff < 1e-3 and not result.approximate
    with pytest.raises(AssertionError, match="dhprebn"):
        assert_grad_matches(wrong, problem.grads["hprebn"], name="hprebn")


def test_c_one_over_n_in_dbndiff2_fails(problem):
    n = problem.n
    wrong = (1.0 / n) * torch.ones_like(problem["bndiff2"]) * problem.grads["bnvar"]
    result = compare(wrong, problem.grads["bndiff2"])
    assert result.maxdiff < 1e-5 and not result.approximate  # tiny, yet caught
    right = (1.0 / (n - 1)) * torch.ones_like(problem["bndiff2"]) * problem.grads["bnvar"]
    assert compare(right, problem.grads["bndiff2"]).approximate


def test_strict_shapes_name_both_shapes(problem, answers):
    flat = problem.grads["bnbias"].view(-1)  # (64,) for a (1, 64) tensor: the lecture's == lets it through
    assert bool(torch.all(flat == problem.grads["bnbias"]))
    with pytest.raises(AssertionError, match=r"\(64,\).*\(1, 64\)"):
        assert_grad_matches(flat, problem.grads["bnbias"], name="bnbias")


def test_expected_may_be_the_tensor_holding_grad(problem, answers):
    assert_grad_matches(answers["probs"], problem["probs"], name="probs")
    with pytest.raises(AssertionError):
        assert_grad_matches(answers["probs"] * 1.01, problem["probs"], name="probs")


def test_failure_message_reports_count_percent_index(problem, answers):
    wrong = answers["W2"].clone()
    wrong[3, 4] += 1.0
    with pytest.raises(AssertionError) as info:
        assert_grad_matches(wrong, problem.grads["W2"], name="W2")
    message = str(info.value)
    assert "1 of 1728 elements (0.1%)" in message and "[3, 4]" in message and "maxdiff" in message


def test_exact_mode_is_bitwise(problem):
    truth = problem.grads["logprobs"]
    assert_grad_matches(truth.clone(), truth, exact=True)
    with pytest.raises(AssertionError):
        assert_grad_matches(truth + 1e-12, truth.double().float() + torch.finfo(torch.float32).tiny, exact=True)
    nudged = truth.clone()
    nudged[0, 0] = torch.nextafter(nudged[0, 0], torch.tensor(1.0))
    with pytest.raises(AssertionError):
        assert_grad_matches(nudged, truth, exact=True)


def test_given_tolerances_override_the_rule(problem):
    truth = problem.grads["h"]
    assert_grad_matches(truth + 1e-3, truth, atol=1e-2)
    with pytest.raises(AssertionError):
        assert_grad_matches(truth + 1e-3, truth, atol=1e-4)


def test_plain_tensors_use_assert_close_default_rtol():
    expected = torch.tensor([1.0, 2.0, 3.0])
    assert_grad_matches(expected * (1 + 1e-7), expected)
    with pytest.raises(AssertionError):
        assert_grad_matches(expected * (1 + 1e-4), expected)


@pytest.mark.parametrize("bad", [None, [1.0, 2.0], 3.0, torch.zeros(27, dtype=torch.int64)])
def test_wrong_types_get_a_precise_message(problem, bad):
    with pytest.raises(AssertionError, match="db2 is"):
        assert_grad_matches(bad, problem.grads["b2"], name="b2")


def test_nonfinite_answer_is_named(problem):
    wrong = problem.grads["counts"].clone()
    wrong[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="nonfinite"):
        assert_grad_matches(wrong, problem.grads["counts"], name="counts")


def test_cmp_prints_the_lecture_line_plus_a_verdict(problem, answers, capsys):
    assert cmp("logprobs", answers["logprobs"], problem["logprobs"]) is True
    assert cmp("probs", answers["probs"] * 2, problem["probs"]) is False
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("logprobs        | exact: True  | approximate: True  | maxdiff: 0.0")
    assert out[0].endswith("| ok")
    assert "approximate: False" in out[1] and out[1].endswith("FAIL")


def test_assert_grad_matches_hides_its_own_frame():
    import pytest_backprop.judge.asserts as module

    assert "__tracebackhide__" in module.assert_grad_matches.__code__.co_varnames


@pytest.mark.parametrize("seed", range(5))
def test_float64_problems_at_tiny_sizes_never_fail_a_correct_answer(seed):
    from pytest_backprop.problems.instance import problem_from_batch
    from reference_model.model import Config, params_only

    config = Config(vocab_size=5, n_embd=2, n_hidden=3, block_size=2, batch_size=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    Xb = torch.randint(0, 5, (2, 2), generator=g)
    Yb = torch.randint(0, 5, (2,), generator=g)
    problem = problem_from_batch(config, params_only(config), Xb, Yb, dtype=torch.float64)
    answers = ref.backward(problem.cache())
    for name, truth in problem.grads.items():
        assert compare(answers[name], truth).approximate, name
    # a different, equally correct derivation of db1 (the Exercise 3 form): float64 noise, not a mistake
    c = problem.cache()
    db1 = ref.batchnorm_backward(problem.grads["hpreact"], c["bngain"], c["bnvar_inv"], c["bnraw"]).sum(0)
    assert compare(db1, problem.grads["b1"]).approximate
    # ... and still catches a real mistake there
    assert not compare(answers["bndiff2"] * (config.batch_size - 1) / config.batch_size, problem.grads["bndiff2"]).approximate


def test_a_forward_tensor_without_grad_is_an_error_not_a_silent_truth():
    x = torch.randn(3, requires_grad=True)
    y = x * 2  # retain_grad() forgotten
    (y ** 2).sum().backward()
    with pytest.raises(ValueError, match="retain_grad"):
        assert_grad_matches(torch.zeros(3), y)
    with pytest.raises(ValueError, match="retain_grad"):
        cmp("y", torch.zeros(3), y)
    assert_grad_matches(8 * x.detach(), x)  # a leaf holds its gradient: compared with x.grad
