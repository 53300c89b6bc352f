"""reference_model: data, parameters, the line table, the truths and the reference solutions."""

from __future__ import annotations

import inspect

import pytest
import torch

from reference_model import backward as ref
from reference_model.data import (
    build_dataset,
    build_splits,
    embedded_words,
    load_words,
    vocabulary,
)
from reference_model.model import Config, forward_fused, init_params, lecture_params_and_batch, parameter_count, params_only
from pytest_backprop.problems.lecture import GRADIENT_ORDER, LINES, autograd_truth, consumers, forward_expanded


def test_embedded_names_are_the_census_first_names():
    words = embedded_words()
    assert len(words) == 5163
    assert all(w.isalpha() and w.islower() for w in words)
    assert load_words().source.startswith("embedded")


def test_lecture_split_shapes(shared_names):
    ds = build_splits(load_words(shared_names))
    assert ds.Xtr.shape == (182625, 3)
    assert ds.Xdev.shape == (22655, 3)
    assert ds.Xte.shape == (22866, 3)
    assert ds.vocab_size == 27


def test_build_dataset_slides_the_context():
    stoi, _ = vocabulary(["emma"])
    X, Y = build_dataset(["emma"], stoi, block_size=3)
    e, m, a = stoi["e"], stoi["m"], stoi["a"]
    assert X.tolist() == [[0, 0, 0], [0, 0, e], [0, e, m], [e, m, m], [m, m, a]]
    assert Y.tolist() == [e, m, m, a, 0]


def test_split_does_not_disturb_global_random_state():
    import random

    random.seed(7)
    expected = random.random()
    random.seed(7)
    build_splits(["ab", "cd", "ef"])
    assert random.random() == expected


def test_parameters_match_the_lecture():
    params = params_only(Config())
    assert parameter_count(params) == 4137
    assert parameter_count(params_only(Config(n_hidden=200))) == 12297
    # every parameter is drawn from the seeded generator: two inits are identical
    again = params_only(Config())
    assert all(torch.equal(params[k], again[k]) for k in params)
    assert params["bngain"].shape == (1, 64) and params["b1"].shape == (64,)


def test_line_table_has_twenty_lines_and_runs_the_lecture_source():
    assert len(LINES) == 20 and LINES[-1].output == "loss"
    assert len(GRADIENT_ORDER) == 26 and len(set(GRADIENT_ORDER)) == 26
    assert [l.output for l in consumers("counts")] == ["counts_sum", "probs"]
    assert LINES[6].source == "bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)"


@pytest.fixture(scope="module")
def setting():
    ds = build_splits(load_words())
    params, Xb, Yb = lecture_params_and_batch(ds.Xtr, ds.Ytr)
    return params, Xb, Yb


def test_fused_forward_matches_expanded(setting):
    params, Xb, Yb = setting
    expanded = forward_expanded(params, Xb, Yb)["loss"]
    fused = forward_fused(params, Xb, Yb)["loss"]
    assert torch.allclose(expanded, fused, atol=1e-6)


def test_truths_in_both_dtypes(setting):
    params, Xb, Yb = setting
    t32, t64 = autograd_truth(params, Xb, Yb), autograd_truth(params, Xb, Yb, dtype=torch.float64)
    assert set(t32.grads) == set(GRADIENT_ORDER) == set(t64.grads)
    assert t64.grads["C"].dtype == torch.float64 and t32.grads["C"].dtype == torch.float32
    assert abs(t32.loss - t64.loss) < 1e-5
    # db1 is zero in exact arithmetic (batchnorm removes the mean)
    assert float(t64.grads["b1"].abs().max()) < 1e-12 < float(t32.grads["b1"].abs().max())


def test_reference_solutions_match_autograd(setting):
    params, Xb, Yb = setting
    t = autograd_truth(params, Xb, Yb, dtype=torch.float64)
    grads = ref.backward(t.values)
    for name in GRADIENT_ORDER:
        assert grads[name].shape == t.grads[name].shape, name
        assert torch.allclose(grads[name], t.grads[name], atol=1e-12), name
    assert torch.allclose(ref.cross_entropy_backward(t.values["logits"], Yb), t.grads["logits"], atol=1e-12)
    dhprebn = ref.batchnorm_backward(t.grads["hpreact"], t.values["bngain"], t.values["bnvar_inv"], t.values["bnraw"])
    assert torch.allclose(dhprebn, t.grads["hprebn"], atol=1e-12)


def test_fused_backward_matches_autograd_of_fused_forward(setting):
    params, Xb, Yb = setting
    leaves = {k: v.double().requires_grad_(True) for k, v in params.items()}
    cache = forward_fused(leaves, Xb, Yb)
    cache["loss"].backward()
    manual = ref.fused_backward({**{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in cache.items()},
                                 **{k: v.detach() for k, v in leaves.items()}})
    for name, leaf in leaves.items():
        assert torch.allclose(manual[name], leaf.grad, atol=1e-12), name


def test_vectorized_dC_equals_the_lecture_loop(setting):
    _, Xb, _ = setting
    demb = torch.randn(Xb.shape[0], Xb.shape[1], 10, dtype=torch.float64)
    loop = torch.zeros(27, 10, dtype=torch.float64)
    for k in range(Xb.shape[0]):
        for j in range(Xb.shape[1]):
            loop[Xb[k, j]] += demb[k, j]
    assert torch.allclose(ref.embedding_backward(demb, Xb, 27), loop, atol=1e-12)
    assert "for " not in inspect.getsource(ref.embedding_backward).split('"""')[-1]


def test_init_is_reproducible_in_float64():
    p32, p64 = init_params(dtype=torch.float32), init_params(dtype=torch.float64)
    assert torch.equal(p32["W1"].double(), p64["W1"])
