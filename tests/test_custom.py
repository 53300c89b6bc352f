"""check_backward on custom autograd Functions: each check of the checker with a wrong Function that
must fail it and a right one that must pass; the documented example (docs/custom-autograd.md).
The suite of buggy Functions with their twins is tests/test_custom_suite.py."""

from __future__ import annotations

import math
import re

import pytest
import torch
from custom_functions import (
    Abs,
    BatchedLinearView,
    LogSumExp,
    LogSumExpNaive,
    MeanAllNoDivide,
    Relu,
    ReluAtZeroIsOne,
    SignedLog1p,
    SignedLog1pNoAbs,
    Softmax,
)
from hypothesis import given, settings
from hypothesis.errors import HypothesisException

from pytest_backprop import check_backward
from pytest_backprop.judge.custom import CHECKS, OPTIONAL, CheckFailure
from pytest_backprop.properties.strategies import elements, shapes, tensors
from conftest import run_inprocess

X3 = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def reference(x):
    return torch.softmax(x, dim=-1)


class Softmax2D(Softmax):
    """The sum runs over dim 1: right for 2-D inputs only."""

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return y * (grad - (grad * y).sum(1, keepdim=True))


class Centered(torch.autograd.Function):
    """y = (x + b) - mean over dim 0: the true gradient of b is exactly 0 (noise in float32)."""

    @staticmethod
    def forward(ctx, x, b):
        z = x + b
        return z - z.mean(0, keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        gx = grad - grad.mean(0, keepdim=True)
        return gx, gx.sum(0)


class CenteredUncentredBias(Centered):
    @staticmethod
    def backward(ctx, grad):
        return grad - grad.mean(0, keepdim=True), grad.sum(0)  # bug: db is not 0


def centered(x, b):
    z = x + b
    return z - z.mean(0, keepdim=True)


class IndexErrorInBackward(Softmax):
    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return y * grad[100]


def failure(fn, *inputs, **kwargs) -> CheckFailure:
    with pytest.raises(CheckFailure) as info:
        check_backward(fn, *inputs, **kwargs)
    return info.value


def test_a_right_function_passes_both_ways_and_returns_its_gradients():
    (dx,) = check_backward(Softmax.apply, X3, reference=reference)
    assert dx.shape == X3.shape and bool(torch.isfinite(dx).all())
    check_backward(Softmax.apply, X3)  # finite differences (gradcheck) in float64


def test_a_2d_only_backward_passes_in_2d_and_fails_in_3d_naming_the_rule():
    check_backward(Softmax2D.apply, X3[0], reference=reference)
    caught = failure(Softmax2D.apply, X3, reference=reference)
    assert isinstance(caught, AssertionError) and caught.check == "gradients"
    assert re.search(r"Softmax2D.apply \[gradients\]: the gradients differ from the reference's:\n"
                     r"dx: 24 of 24 elements .* \(measured rule: the reference re-run in float64", str(caught))
    caught = failure(Softmax2D.apply, X3)
    assert "differ from finite differences (float64)" in str(caught)
    assert "(gradcheck default: finite differences in float64, eps 1e-06)" in str(caught)  # not "(given)"


def test_a_mathematically_zero_gradient_never_fails_on_float32_noise():
    g = torch.Generator().manual_seed(1)
    x, b = torch.randn(64, 8, generator=g) * 30, torch.randn(8, generator=g)
    _, db = check_backward(Centered.apply, x, b, reference=centered)
    assert 0 < float(db.abs().max()) < 1e-3  # float noise around the true 0, accepted
    wrong = failure(CenteredUncentredBias.apply, x, b, reference=centered)  # a real difference fails
    assert wrong.check == "gradients" and "db:" in str(wrong)


def test_an_index_error_in_backward_is_wrapped_like_any_error_with_the_users_line():
    caught = failure(IndexErrorInBackward.apply, X3, reference=reference)
    assert caught.check == "backward" and caught.__cause__ is None and caught.__suppress_context__
    assert "backward raised IndexError: index 100 is out of bounds" in str(caught)
    assert "test_custom.py" in str(caught) and "return y * grad[100]" in str(caught)


def test_failures_are_short_in_pytest(pytester):
    pytester.makepyfile(test_short="""
        import torch
        from pytest_backprop import check_backward

        class Bad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x * 2

            @staticmethod
            def backward(ctx, grad):
                return grad[100]

        def test_bad():
            check_backward(Bad.apply, torch.randn(3, dtype=torch.float64), reference=lambda x: 2 * x)
    """)
    result = run_inprocess(pytester, "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "IndexError: index 100 is out of bounds" in out and "return grad[100]" in out
    assert "torch/autograd" not in out and "judge/custom" not in out
    between = out[out.index("_ test_bad _"):out.index("short test summary")]
    assert len(between.splitlines()) < 25, between


def test_hints_outside_the_lecture_are_generic():
    x = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    text = str(failure(MeanAllNoDivide.apply, x, reference=torch.mean))
    assert "hint [scale]: dx is 25 × the true gradient: look for a wrong constant factor" in text
    assert not re.search(r"batch|Bessel|n = |lecture", text), text


def test_messages_print_enough_digits_to_show_the_difference():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    text = str(failure(Relu.apply, x, reference=lambda x: torch.relu(x) * (1 + 1e-9)))
    got, expected = re.search(r"got (\S+), expected (\S+)", text).groups()
    assert got != expected.rstrip(";"), text


# --- kinks ---------------------------------------------------------------------------------------

ZEROS = torch.zeros(2, 3, dtype=torch.float64)


def test_finite_differences_at_a_relu_corner_are_no_false_alarm():
    from torch.autograd.gradcheck import GradcheckError

    with pytest.raises(GradcheckError):  # gradcheck itself fails a correct ReLU at 0 ...
        torch.autograd.gradcheck(Relu.apply, (ZEROS.clone().requires_grad_(),))
    check_backward(Relu.apply, ZEROS)  # ... the kink-aware check does not
    check_backward(Abs.apply, ZEROS)
    check_backward(ReluAtZeroIsOne.apply, ZEROS, reference=torch.relu)  # 1 at 0 where autograd says 0: both right


def test_a_references_corner_value_is_not_the_truth():
    x = torch.zeros(3, dtype=torch.float64)
    sign_log = lambda x: torch.sign(x) * torch.log1p(x.abs())  # noqa: E731 -- autograd says 0 at x=0, the truth is 1
    check_backward(SignedLog1p.apply, x, reference=sign_log)
    check_backward(SignedLog1pNoAbs.apply, x, reference=sign_log)  # right at 0 too: the bug is for x < 0
    assert failure(SignedLog1pNoAbs.apply, -x - 0.5, reference=sign_log).check == "gradients"

    failing: list[torch.Tensor] = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True, report_multiple_bugs=False)
    @given(tensors(shapes(max_dims=2, max_side=3)))
    def search(x):
        try:
            check_backward(SignedLog1pNoAbs.apply, x, reference=sign_log)
        except CheckFailure:
            failing.append(x)
            raise

    with pytest.raises(CheckFailure):
        search()
    assert bool((failing[-1] < 0).any()), f"shrank to {failing[-1]}: the real bug (x < 0) was hidden"


# --- values: overflow is found with the default mix ---------------------------------------------------

def test_a_naive_logsumexp_passes_moderate_values_and_overflows_at_large_ones():
    check_backward(LogSumExpNaive.apply, X3, reference=lambda x: torch.logsumexp(x, -1))
    large = torch.tensor([[710.0, 0.0]], dtype=torch.float64)
    caught = failure(LogSumExpNaive.apply, large, reference=lambda x: torch.logsumexp(x, -1))
    assert caught.check == "outputs" and "maxdiff inf" in str(caught) and "hint [nonfinite]" in str(caught)
    check_backward(LogSumExp.apply, large, reference=lambda x: torch.logsumexp(x, -1))
    no_reference = failure(LogSumExpNaive.apply, large)
    assert no_reference.check == "outputs" and "inf/NaN element(s) for finite inputs" in str(no_reference)


def test_the_default_mix_holds_values_large_enough_to_overflow_exp():
    from hypothesis import find

    x = find(tensors((4,)), lambda t: bool((t.abs() > 709).any()), settings=settings(database=None, max_examples=500))
    assert float(x.abs().max()) > 709


# --- the options -----------------------------------------------------------------------------------

def test_skip_turns_off_a_check_and_rejects_unknown_names():
    x, w = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert failure(BatchedLinearView.apply, x, w, reference=lambda x, w: x @ w).check == "layouts"
    check_backward(BatchedLinearView.apply, x, w, reference=lambda x, w: x @ w, skip=("layouts",))
    with pytest.raises(ValueError, match="unknown check"):
        check_backward(Softmax.apply, X3, skip=("gradients",))
    assert set(OPTIONAL) < set(CHECKS)


def test_given_upstream_and_tolerances_are_used():
    ones = torch.ones_like(X3)
    (dx,) = check_backward(Softmax.apply, X3, reference=reference, grad_outputs=ones, atol=1e-12, rtol=0)
    assert float(dx.abs().max()) < 1e-12  # softmax's rows sum to 1: an upstream of ones has zero gradient
    text = str(failure(Softmax2D.apply, X3, reference=reference, atol=1e-3, rtol=0))
    assert "atol=0.001 (given)" in text


def test_no_floating_input_is_a_clear_failure():
    assert "at least one floating-point tensor" in str(failure(lambda i: i * 2, torch.arange(3)))


# --- the documented example ----------------------------------------------------------------------

def find_smallest_failing_shape(function) -> tuple[int, ...] | None:
    """Run the docs' property on ``function``; the last failing shape is the one hypothesis shrank to."""
    failing: list[tuple[int, ...]] = []

    @settings(max_examples=30, deadline=None, database=None, derandomize=True, print_blob=True)
    @given(tensors(shapes(min_dims=2, max_dims=4, max_side=4), elements=elements("small")))
    def test_softmax_backward(x):
        try:
            check_backward(function, x, reference=reference)
        except AssertionError:
            failing.append(tuple(x.shape))
            raise

    try:
        test_softmax_backward()
    except AssertionError:
        return failing[-1]
    except HypothesisException as exc:  # pragma: no cover - would be a bug of the example
        raise AssertionError(f"unexpected hypothesis error: {exc}") from exc
    return None


def test_hypothesis_shrinks_the_2d_only_backward_to_the_smallest_3d_shape():
    shape = find_smallest_failing_shape(Softmax2D.apply)
    assert shape is not None, "the 2-D-only backward was not caught"
    assert len(shape) == 3, f"expected a 3-D counterexample, got {shape}"
    # minimal: 2 elements is the least a failing input can have (with one element softmax is constant)
    assert math.prod(shape) == 2 and shape in ((1, 1, 2), (1, 2, 1)), shape


def test_the_right_backward_survives_the_same_search():
    assert find_smallest_failing_shape(Softmax.apply) is None
