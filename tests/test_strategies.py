"""The public strategies: valid sizes, batches, parameters, patterns and tensors; shrinking to small."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

from pytest_backprop.properties.strategies import (
    LECTURE_PATTERN,
    REGIMES,
    apply_pattern,
    batches,
    describe_pattern,
    elements,
    makemore_cases,
    makemore_configs,
    makemore_params,
    param_patterns,
    shapes,
    tensors,
)
from reference_model.model import Config, params_only
from pytest_backprop.problems.lecture import forward_expanded

FEW = settings(max_examples=15, deadline=None)


@FEW
@given(makemore_configs())
def test_configs_are_valid(config):
    assert 2 <= config.batch_size <= 8
    assert config.vocab_size >= 2 and config.n_embd >= 1 and config.n_hidden >= 1 and config.block_size >= 1


def test_configs_shrink_to_the_smallest_network():
    config = find(makemore_configs(), lambda c: c.n_hidden >= 3, settings=settings(database=None))
    assert (config.batch_size, config.vocab_size, config.n_embd, config.n_hidden, config.block_size) == (2, 2, 1, 3, 1)


@FEW
@given(st.data())
def test_batches_have_valid_tokens_and_shapes(data):
    config = data.draw(makemore_configs())
    Xb, Yb = data.draw(batches(config))
    assert Xb.shape == (config.batch_size, config.block_size) and Yb.shape == (config.batch_size,)
    assert Xb.dtype == Yb.dtype == torch.int64
    assert 0 <= int(Xb.min()) and int(Xb.max()) < config.vocab_size
    assert 0 <= int(Yb.min()) and int(Yb.max()) < config.vocab_size


@FEW
@given(makemore_cases(patterns=param_patterns(), regimes=st.sampled_from(["lecture", "small", "saturated"])))
def test_cases_have_no_ties_and_a_finite_forward(case):
    values = forward_expanded(case.params, case.Xb, case.Yb)
    logits = values["logits"]
    top = logits.topk(2, dim=1).values
    assert bool((top[:, 0] > top[:, 1]).all()), "a row's max logit is tied"
    assert math.isfinite(float(values["loss"]))
    assert case.params["W1"].shape == (case.config.n_embd * case.config.block_size, case.config.n_hidden)
    assert case.params["W1"].dtype == torch.float64


def test_params_are_never_degenerate():
    params = find(makemore_params(Config(n_hidden=2, vocab_size=3)), lambda p: True, settings=settings(database=None))
    for name in ("b1", "b2", "bnbias"):
        assert bool((params[name] != 0).all()), f"{name} has zeros: they would hide a wrong gradient"


@FEW
@given(param_patterns())
def test_every_pattern_is_the_same_forward_pass(pattern):
    config = Config(vocab_size=5, n_embd=2, n_hidden=3, block_size=2, batch_size=4)
    params = {k: v.double() for k, v in params_only(config).items()}
    Xb = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1]])
    Yb = torch.tensor([1, 2, 3, 4])
    lecture = forward_expanded(params, Xb, Yb)["loss"]
    patterned = apply_pattern(params, pattern)
    assert patterned["b1"].shape == ((3,) if pattern["b1"] == "flat" else (1, 3))
    assert patterned["bngain"].shape == ((3,) if pattern["bngain"] == "flat" else (1, 3))
    assert torch.equal(forward_expanded(patterned, Xb, Yb)["loss"], lecture)


def test_patterns_shrink_to_the_lecture_pattern_and_describe_changes():
    assert find(param_patterns(), lambda p: True, settings=settings(database=None)) == LECTURE_PATTERN
    assert describe_pattern(LECTURE_PATTERN) == "the lecture's shapes"
    assert describe_pattern({**LECTURE_PATTERN, "b1": "row", "bnbias": "flat"}) == "b1 (1, H), bnbias (H,)"


@FEW
@given(tensors(shapes(min_dims=2, max_dims=3), elements=elements("saturated")))
def test_tensors_from_a_shape_strategy_and_a_regime(x):
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float64 and 2 <= x.dim() <= 3
    low, high = REGIMES["saturated"]
    assert bool((x.abs() >= low).all()) and bool((x.abs() <= high).all())


@FEW
@given(tensors((4, 27), dtype=torch.float32, elements=elements("large_logits", width=32)))
def test_tensors_with_a_fixed_shape_and_large_logits(x):
    assert x.shape == (4, 27) and x.dtype == torch.float32
    assert float(x.abs().max()) <= 80


def test_tensors_shrink_towards_small_shapes():
    x = find(tensors(hnp.array_shapes(min_dims=1, max_dims=4)), lambda t: t.dim() >= 3, settings=settings(database=None))
    assert tuple(x.shape) == (1, 1, 1)


def test_unknown_regime_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown regime"):
        elements("huge")
