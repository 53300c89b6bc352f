"""assert_grad_matches, cmp and the tolerance rule: cases (a), (b), (c) of the core issue."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import EXAMPLES

from pytest_backprop import assert_grad_matches, cmp
from pytest_backprop.judge.compare import compare, describe_failure, distinct
from pytest_backprop.problems.tolerance import ASSERT_CLOSE_DEFAULTS, Tolerance, fallback, measured_or_fallback
from pytest_backprop.problems.instance import build_problem
from reference_model import backward as ref
from reference_model.data import load_words
from pytest_backprop.problems.lecture import LINES


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
    assert re.search(r"\| ok, atol=\S+ \(measured rule\)$", out[0]), out[0]
    assert "approximate: False" in out[1] and "| FAIL, atol=" in out[1]


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


# --- one rule: the fallback is assert_close's defaults, labelled --------------------------------------

def test_the_fallback_is_assert_close_default_for_the_dtype():
    assert fallback(torch.zeros(3)) == Tolerance(1e-5, 1.3e-6, "assert_close default for float32")
    assert (fallback(torch.zeros(3, dtype=torch.float64)).atol, fallback(torch.zeros(3, dtype=torch.float64)).rtol) == (1e-7, 1e-7)
    private = pytest.importorskip("torch.testing._comparison")._DTYPE_PRECISIONS
    for dtype, (rtol, atol) in ASSERT_CLOSE_DEFAULTS.items():
        assert private[dtype] == (rtol, atol), dtype


def test_a_plain_zero_truth_is_not_judged_at_1e_38(problem):
    assert_grad_matches(problem.grads["b1"], torch.zeros_like(problem["b1"]), name="b1")  # noise ~3e-9 passes
    with pytest.raises(AssertionError, match=r"atol=1e-05, rtol=1.3e-06 \(assert_close default for float32"):
        assert_grad_matches(torch.full((64,), 2e-5), torch.zeros(64), name="b1")


def test_the_measured_rule_falls_back_where_nothing_can_be_measured():
    zero = torch.zeros(4)
    assert "exactly 0" in measured_or_fallback(zero, zero.double(), torch.float32).origin
    big = torch.tensor([1e39], dtype=torch.float64)
    assert "overflows" in measured_or_fallback(big.float(), big, torch.float32).origin
    assert measured_or_fallback(torch.ones(2), torch.ones(2, dtype=torch.float64), torch.float32).origin == "measured rule"


def test_messages_print_as_many_digits_as_it_takes():
    assert distinct(1.5410001, 1.5410002) == ("1.5410001", "1.5410002")
    assert distinct(1.0, 2.0) == ("1", "2")
    expected = torch.tensor([1.5410002], dtype=torch.float64)
    text = describe_failure("x", compare(torch.tensor([1.5410001], dtype=torch.float64), expected))
    assert "got 1.5410001, expected 1.5410002" in text


def test_plain_tensors_get_generic_hints_and_kit_tensors_the_lectures(problem):
    truth = torch.linspace(-1, 1, 64, dtype=torch.float64).view(1, 64)
    with pytest.raises(AssertionError) as plain:
        assert_grad_matches(truth * 31 / 32, truth, name="bndiff2")
    assert "look for a wrong constant factor" in str(plain.value) and "Bessel" not in str(plain.value)
    with pytest.raises(AssertionError, match=r"\[scale\].*\(n-1\)/n.*Bessel"):
        assert_grad_matches(problem.grads["bndiff2"] * 31 / 32, problem.grads["bndiff2"], name="bndiff2")


# --- cmp in the lecture's notebook -------------------------------------------------------------------

RETAIN_AND_BACKWARD = """
for t in [logprobs, probs, counts, counts_sum, counts_sum_inv, norm_logits, logit_maxes, logits, h, hpreact,
          bnraw, bnvar_inv, bnvar, bndiff2, bndiff, hprebn, bnmeani, embcat, emb]:
    t.retain_grad()
loss.backward()
"""
GRADIENTS = ["logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes", "logits",
             "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff",
             "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C"]


@pytest.fixture
def notebook(problem):
    """The lecture's notebook after its forward (retain_grad on every line), loss.backward() and a
    correct Exercise 1 written in its cells: one namespace, as the notebook's globals."""
    ns = {"torch": torch, "F": F, "cmp": cmp, "Xb": problem.Xb, "Yb": problem.Yb, "n": problem.n}
    ns.update({k: v.clone().requires_grad_(True) for k, v in problem.params.items()})
    exec("\n".join(line.source for line in LINES) + RETAIN_AND_BACKWARD, ns)  # noqa: S102 -- the lecture's own code
    exec((EXAMPLES / "ex1_solution.py").read_text(), ns)  # noqa: S102
    return ns


def run_cmp(ns, line):
    exec(f"result = {line}", ns)  # noqa: S102 -- called from the notebook's globals, as a student does
    return ns["result"]


def test_cmp_in_the_notebook_passes_float_noise_under_the_measured_rule(notebook, capsys):
    assert all(run_cmp(notebook, f"cmp('{name}', d{name}, {name})") for name in GRADIENTS)
    lines = capsys.readouterr().out.splitlines()
    assert all(line.endswith("(measured rule)") for line in lines), lines
    db1, b1 = notebook["db1"], notebook["b1"]
    assert float((db1 - b1.grad).detach().abs().max()) > 0  # float noise around the true 0 ...
    noisy = b1.grad + 1.1e-8  # ... of the size that failed a real student's allclose
    assert not torch.allclose(noisy, b1.grad)
    notebook["noisy"] = noisy
    assert run_cmp(notebook, "cmp('b1', noisy, b1)")


def test_cmp_in_the_notebook_catches_the_lectures_small_mistakes(notebook, capsys):
    ns = notebook
    exec("""
wrong_hprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - bnraw * (dhpreact * bnraw).sum(0))
wrong_bndiff2 = (1.0 / n) * torch.ones_like(bndiff2) * dbnvar
""", ns)  # noqa: S102 -- fused batchnorm without n/(n-1); 1/n for 1/(n-1)
    assert not run_cmp(ns, "cmp('hprebn', wrong_hprebn, hprebn)")
    assert not run_cmp(ns, "cmp('bndiff2', wrong_bndiff2, bndiff2)")  # maxdiff < 1e-5: only the measured rule sees it
    out = capsys.readouterr().out.splitlines()
    assert all("FAIL" in line and "(measured rule)" in line for line in out), out
    # without the notebook's values the kit knows no truth: assert_close's defaults, said so
    assert cmp("bndiff2", ns["wrong_bndiff2"], ns["bndiff2"], namespace={})
    assert "assert_close default for float32" in capsys.readouterr().out


def test_cmp_claims_nothing_when_the_notebook_ran_another_forward(notebook, capsys):
    notebook["bngain"] = (notebook["bngain"] * 2).detach()  # the values no longer made these tensors
    assert run_cmp(notebook, "cmp('hpreact', dhpreact, hpreact)")
    assert "assert_close default for float32" in capsys.readouterr().out


def test_judged_gives_tolerances_only_to_the_gradients_compared(problem):
    """``problem_from_batch(..., judged=...)`` (what Exercise 4 uses at every step): the same forward
    values and true gradients; only the judged ones carry a tolerance; none judged, no float64 truth."""
    from pytest_backprop.problems.instance import problem_from_batch
    from pytest_backprop.problems.tolerance import reference_of

    some = problem_from_batch(problem.config, problem.params, problem.Xb, problem.Yb, judged=("W1", "b1"))
    assert set(some.tolerances) == {"W1", "b1"}
    once = problem_from_batch(problem.config, problem.params, problem.Xb, problem.Yb, judged=iter(("W1", "b1")))
    assert set(once.tolerances) == {"W1", "b1"}  # any iterable, read once
    assert some.tolerances["W1"] == problem.tolerances["W1"] and some.tolerances["b1"] == problem.tolerances["b1"]
    assert reference_of(some.grads["W1"]) is not None and reference_of(some.grads["probs"]) is None
    for name in problem.grads:
        assert torch.equal(some.grads[name], problem.grads[name]) and torch.equal(some[name], problem[name])
    assert compare(problem.grads["W1"] + 1e-3, some.grads["W1"]).approximate is False
    assert compare(problem.grads["W1"], some.grads["W1"]).approximate
    none = problem_from_batch(problem.config, problem.params, problem.Xb, problem.Yb, judged=())
    assert none.tolerances == {} and none.truth64 is none.truth and torch.equal(none["logits"], problem["logits"])
