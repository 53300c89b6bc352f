"""check_backward on custom autograd Functions, and the documented example (docs/custom-autograd.md):
hypothesis finds a softmax backward that only works for 2-D inputs and shrinks to the smallest 3-D one."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis.errors import HypothesisException

from pytest_backprop import check_backward
from pytest_backprop.properties.strategies import elements, shapes, tensors


class Softmax(torch.autograd.Function):
    """softmax over the last dim, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return y * (grad - (grad * y).sum(-1, keepdim=True))


class Softmax2D(Softmax):
    """The same, but the sum runs over dim 1: right for 2-D inputs only."""

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return y * (grad - (grad * y).sum(1, keepdim=True))


class ForgetsUpstream(Softmax):
    """Drops the upstream gradient: right only when grad is all ones... and not even then."""

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return y * (1 - y)


class Stateful(Softmax):
    """Keeps a running total on the class: a different answer on every call."""

    calls = 0

    @staticmethod
    def backward(ctx, grad):
        Stateful.calls += 1
        (y,) = ctx.saved_tensors
        return Stateful.calls * y * (grad - (grad * y).sum(-1, keepdim=True))


class WrongShape(Softmax):
    @staticmethod
    def backward(ctx, grad):
        return grad.sum(0)


def reference(x):
    return torch.softmax(x, dim=-1)


X3 = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_a_right_function_passes_against_a_reference_and_finite_differences():
    (dx,) = check_backward(Softmax.apply, X3, reference=reference)
    assert dx.shape == X3.shape
    check_backward(Softmax.apply, X3)  # torch.autograd.gradcheck in float64


def test_a_2d_only_backward_passes_in_2d_and_fails_in_3d():
    check_backward(Softmax2D.apply, X3[0], reference=reference)
    with pytest.raises(AssertionError, match=r"Softmax2D.apply vs reference:\ndx: 24 of 24 elements"):
        check_backward(Softmax2D.apply, X3, reference=reference)
    with pytest.raises(AssertionError, match="vs finite differences"):
        check_backward(Softmax2D.apply, X3)


def test_forgetting_the_upstream_gradient_fails():
    with pytest.raises(AssertionError, match="ForgetsUpstream.apply vs reference"):
        check_backward(ForgetsUpstream.apply, X3[0], reference=reference)


def test_state_kept_between_calls_fails():
    with pytest.raises(AssertionError, match="differs on a second call"):
        check_backward(Stateful.apply, X3, reference=reference)


def test_a_wrong_shape_is_reported_not_crashed():
    with pytest.raises(AssertionError, match="exactly the shape of its input"):
        check_backward(WrongShape.apply, X3, reference=reference)


def test_given_upstream_and_tolerances_are_used():
    ones = torch.ones_like(X3)
    (dx,) = check_backward(Softmax.apply, X3, reference=reference, grad_outputs=ones, atol=1e-12, rtol=0)
    assert float(dx.abs().max()) < 1e-12  # softmax's rows sum to 1: an upstream of ones has zero gradient


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
