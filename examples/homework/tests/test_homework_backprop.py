"""The instructor's tests for the homework, on top of the built-in checks of ``pytest --backprop``.

They reach the student's submission through the kit's ``backprop_student`` fixture (the file named
by ``backprop_impl``, loaded once, run with the kit's time limit and isolation), compare with
``assert_grad_matches`` (strict shapes, the tolerance rule, hints) and generate networks of every
small size with the kit's hypothesis strategies. Points and visibility for Gradescope come from
the markers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from pytest_backprop import assert_grad_matches, case_problem, problem_from_batch
from pytest_backprop.strategies import makemore_cases, makemore_configs

CROSS_ENTROPY = ("logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes", "logits")
BATCHNORM = ("hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff", "bnmeani", "hprebn")
FIRST_LAYER = ("embcat", "W1", "b1", "emb", "C")


@pytest.mark.backprop_points(2)
def test_cross_entropy_block(backprop_student, makemore_forward):
    """The eight gradients of the loss and softmax lines, on the lecture's batch."""
    f = makemore_forward
    grads = backprop_student.gradients(f, *CROSS_ENTROPY)
    for name in CROSS_ENTROPY:
        assert_grad_matches(grads[name], f[name], name=name)


@pytest.mark.backprop_points(2)
def test_batchnorm_block(backprop_student, makemore_forward):
    """The batchnorm layer, Bessel's correction included."""
    f = makemore_forward
    grads = backprop_student.gradients(f, *BATCHNORM)
    for name in BATCHNORM:
        assert_grad_matches(grads[name], f[name], name=name)


@pytest.mark.backprop_points(1)
def test_dlogits_is_softmax_minus_onehot(backprop_student, makemore_forward):
    """Exercise 2's closed form, as a property of the student's dlogits: (softmax - onehot) / n."""
    f = makemore_forward
    dlogits = backprop_student.gradients(f, "logits")["logits"]
    expected = (torch.softmax(f["logits"], 1) - torch.nn.functional.one_hot(f.Yb, f["logits"].shape[1])) / f.n
    assert_grad_matches(dlogits, expected, name="logits")
    assert torch.allclose(dlogits.sum(1), torch.zeros(f.n), atol=1e-6), "each row of dlogits sums to 0"


@pytest.mark.backprop_points(3)
@pytest.mark.backprop_hidden
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=makemore_cases(makemore_configs(max_batch=6, max_vocab=6, max_hidden=5)))
def test_every_size(backprop_student, case):
    """Hidden: every attempted gradient is right for networks and batches of every small size.

    Catches what the lecture's sizes hide: a hard-coded 32, 27 or 64, a sum over the wrong
    dimension that works for square shapes. Hypothesis shrinks a failure to the smallest network.
    """
    p = case_problem(case)  # float64 truth; tolerances fit for generated sizes (n=2 included)
    for name, grad in backprop_student.gradients(p).items():
        assert_grad_matches(grad, p[name], name=name)


@pytest.mark.backprop_points(1)
@pytest.mark.backprop_hidden(visibility="after_due_date")
def test_first_layer_float64(backprop_student, makemore_forward):
    """The embedding and first layer in float64: no hidden float32 assumptions."""
    f = makemore_forward
    p = problem_from_batch(f.config, f.params, f.Xb, f.Yb, dtype=torch.float64)
    grads = backprop_student.gradients(p, *FIRST_LAYER)
    for name in FIRST_LAYER:
        assert_grad_matches(grads[name], p[name], name=name)
