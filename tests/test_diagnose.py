"""Hint codes of ``diagnose`` (one comparison) and the pieces of ``blame``, checked on hand-made
answers: each hint fires on the mistake it names and stays quiet on right answers and on noise."""

from __future__ import annotations

import pytest
import torch

from pytest_backprop.judge import blame
from pytest_backprop.judge.asserts import assert_grad_matches
from pytest_backprop.judge.compare import compare
from pytest_backprop.judge.diagnose import close, diagnose, factor_line, name_constant, value_hint
from pytest_backprop.problems.instance import build_problem
from reference_model.data import load_words


@pytest.fixture(scope="module")
def problem():
    """The lecture's problem on the embedded names (module-scoped: built once)."""
    return build_problem(load_words(None))


def hint(problem, name, answer):
    """Diagnose one answer for d<name> the way the built-in checks do."""
    return diagnose(name, compare(answer, problem.grads[name]), n=problem.n, values=problem.truth.values)


def test_right_answer_is_ok(problem):
    assert hint(problem, "counts", problem.grads["counts"].clone()).code == "ok"


@pytest.mark.parametrize("factor, label, words", [
    (31 / 32, "(n-1)/n", "Bessel"),
    (32 / 31, "n/(n-1)", "mean needs 1/n"),
    (32.0, "n", "1/n is missing"),
    (1 / 32, "1/n", "extra factor 1/n"),
    (0.5, "1/2", "factor 2 is missing"),
    (2.0, "2", "extra factor 2"),
    (31.0, "n-1", "1/(n-1)"),
], ids=["bessel", "mean-bessel", "n", "one-over-n", "half", "two", "n-minus-1"])
def test_scale_names_the_constant(problem, factor, label, words):
    got = hint(problem, "bndiff2", problem.grads["bndiff2"] * factor)
    assert got.code == "scale"
    assert f"is {label} ×" in got.message and words in got.message


def test_unnamed_scale_gives_the_factor(problem):
    got = hint(problem, "probs", problem.grads["probs"] * 3.7)
    assert got.code == "scale" and "3.7 ×" in got.message


def test_sign(problem):
    got = hint(problem, "bnmeani", -problem.grads["bnmeani"])
    assert got.code == "sign"
    assert "bndiff = hprebn - bnmeani" in got.message


def test_negative_named_scale_says_sign_flipped(problem):
    got = hint(problem, "bndiff2", problem.grads["bndiff2"] * (-31 / 32))
    assert got.code == "scale" and "sign is flipped" in got.message


@pytest.mark.parametrize("name", ["b1", "logit_maxes"])
def test_no_scale_or_sign_on_noise(problem, name):
    """db1 (truth 0) and dlogit_maxes (truth ~1e-9): any factor of the noise passes, no hint fires."""
    truth = problem.grads[name]
    for factor in (-1.0, 2.0, 31 / 32):
        assert hint(problem, name, truth * factor).code == "ok"
    atol = problem.tolerances[name].atol
    wrong = truth + 10 * atol
    got = hint(problem, name, wrong)
    assert got.code == "mismatch"
    assert value_hint(name, -problem.truth64.grads[name], problem.truth64.grads[name], atol, n=32) is None


def test_keepdim_missing_and_extra(problem):
    got = hint(problem, "bnbias", problem.grads["bnbias"].reshape(-1))
    assert got.code == "keepdim" and "keepdim=True" in got.message and "(64,)" in got.message
    got = hint(problem, "b1", problem.grads["b1"].reshape(1, -1))
    assert got.code == "keepdim" and "drop the size-1" in got.message


def test_keepdim_with_wrong_values_is_shape(problem):
    got = hint(problem, "bnbias", 2 * problem.grads["bnbias"].reshape(-1))
    assert got.code == "shape" and "(64,)" in got.message and "(1, 64)" in got.message


def test_unreduced_names_the_broadcast_line(problem):
    v = problem.truth.values
    dprobs = problem.grads["probs"]
    got = hint(problem, "counts_sum_inv", v["counts"] * dprobs)
    assert got.code == "unreduced"
    assert "sum over dim 1 with keepdim=True" in got.message
    assert "`probs = counts * counts_sum_inv`" in got.message


def test_unreduced_dropped_leading_dim(problem):
    """db1 answered as dhprebn (32, 64): sum over dim 0, no keepdim (b1 is (64,))."""
    got = hint(problem, "b1", problem.grads["hprebn"])
    assert got.code == "unreduced"
    assert "sum over dim 0" in got.message and "keepdim" not in got.message
    assert "hprebn = embcat @ W1 + b1" in got.message


def test_transposed(problem):
    got = hint(problem, "W2", problem.grads["W2"].T.contiguous())
    assert got.code == "transposed" and "h @ W2" in got.message


def test_other_shape_names_the_dims(problem):
    got = hint(problem, "bngain", torch.zeros(32, 1))
    assert got.code == "shape"
    assert "dim 0: 32 vs 1" in got.message and "dim 1: 1 vs 64" in got.message
    assert "wrong dimension" in got.message and "sum over dim 0" in got.message


def test_nonfinite(problem):
    answer = problem.grads["probs"].clone()
    answer[0, 0] = float("nan")
    assert hint(problem, "probs", answer).code == "nonfinite"


def test_plain_mismatch(problem):
    answer = problem.grads["h"] + torch.linspace(0, 1, problem.grads["h"].numel()).view_as(problem.grads["h"])
    assert hint(problem, "h", answer).code == "mismatch"


def test_type(problem):
    assert hint(problem, "h", problem.grads["h"].numpy()).code == "type"


def test_without_context_hints_are_generic():
    """assert_grad_matches on a plain tensor (not one of the kit's): no lecture words, whatever its name."""
    truth = torch.linspace(-1, 1, 64).view(1, 64)
    with pytest.raises(AssertionError, match=r"\[scale\].*0\.968\d × the true gradient: look for a wrong constant factor"):
        assert_grad_matches(truth * 31 / 32, truth, name="bndiff2")
    with pytest.raises(AssertionError, match=r"\[keepdim\]"):
        assert_grad_matches(truth.view(64), truth, name="bnbias")
    assert name_constant(99 / 100, None, lecture=False) is None


def test_name_constant():
    assert name_constant(31 / 32, 32)[0] == "(n-1)/n"
    assert name_constant(-1.0, 32)[0] == "-1"
    assert name_constant(3.7, 32) is None
    assert name_constant(99 / 100, None)[0] == "(n-1)/n"  # n inferred: 100


@pytest.mark.parametrize("tensor, kind, line", [
    ("logprobs", "mean", "loss = -logprobs[range(n), Yb].mean()"),
    ("hprebn", "mean", "bnmeani = 1/n*hprebn.sum(0, keepdim=True)"),  # nearer than the loss
    ("hprebn", "bessel", "bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)"),  # via bndiff, bndiff2
    ("bndiff", "square", "bndiff2 = bndiff**2"),
    ("logits", "bessel", None),  # no Bessel correction between logits and the loss
    ("hprebn", "square", None),  # d(x**2)/dx belongs to the line reading x itself
    ("x", "mean", None),  # not a tensor of the lecture
])
def test_factor_line_is_the_nearest_on_the_gradients_path(tensor, kind, line):
    assert factor_line(tensor, kind) == line


def test_name_constant_quotes_the_line_of_its_tensor():
    assert name_constant(32 / 31, 32, tensor="logprobs")[1] == (
        "1/(n-1) where the mean needs 1/n? (n = 32) (`loss = -logprobs[range(n), Yb].mean()`)")
    assert name_constant(32, 32, tensor="hprebn")[1] == (
        "a factor 1/n is missing (n = 32): the 1/n of the mean in `bnmeani = 1/n*hprebn.sum(0, keepdim=True)`")
    assert name_constant(31 / 32, 32, tensor="probs")[1] == "a factor (n-1)/n (n = 32): n-1 and n mixed up?"
    assert name_constant(0.5, 32, tensor="hpreact")[1] == "a factor 2 is missing"  # no x**2 at hpreact
    assert "`bndiff2 = bndiff**2`" in name_constant(0.5, 32, tensor="bndiff")[1]
    assert "sign is flipped" in name_constant(-32 / 31, 32, tensor="logprobs")[1]


def test_close_rejects_nan_and_shape():
    a = torch.tensor([1.0, float("nan")])
    assert not close(a, a, 1.0)
    assert not close(torch.zeros(2), torch.zeros(1, 2), 1.0)
    assert close(torch.ones(3), torch.ones(3) + 1e-9, 1e-8)


def test_contributions_sum_to_the_truth(problem):
    """The per-line VJPs blame uses add up to autograd's gradient (counts feeds two lines)."""
    parts = blame.contributions("counts", {}, problem, user=False)
    assert sorted(ln.output for ln, _ in parts) == ["counts_sum", "probs"]
    total = sum(c for _, c in parts)
    assert torch.allclose(total.double(), problem.truth64.grads["counts"], atol=problem.tolerances["counts"].atol)


def test_lost_branch_needs_exactly_the_noise_contribution(problem):
    """dlogits holding only the max branch (~0) is lost_branch; zeros or a random small answer are not."""
    parts = blame.contributions("logits", {}, problem, user=False)
    noise = next(c for ln, c in parts if ln.output == "logit_maxes")
    atol = problem.tolerances["logits"].atol
    got = blame._lost_branch_hint("logits", noise.clone(), parts, atol)
    assert got.code == "lost_branch" and "`norm_logits = logits - logit_maxes`" in got.message
    assert blame._lost_branch_hint("logits", torch.zeros_like(noise), parts, atol) is None
    assert blame._lost_branch_hint("logits", torch.full_like(noise, 1e-9), parts, atol) is None
    assert blame._lost_branch_hint("logits", problem.grads["logits"].clone(), parts, atol) is None


def test_reserved_codes_are_documented():
    for code in ("reads_autograd", "aliased", "missing_branch", "lost_branch", "loop_range", "inherited", "unreduced"):
        assert code in blame.CODES
        assert code in blame.__doc__
