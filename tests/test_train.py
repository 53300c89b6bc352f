"""Exercise 4's training (reference_model.train), the fused reference backward, and the fast dataset build."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pytest_backprop.problems.tolerance import derive
from reference_model import train as T
from reference_model.backward import cross_entropy_backward, fused_backward
from reference_model.data import (
    build_dataset,
    build_dataset_loop,
    build_splits,
    load_words,
    vocabulary,
)
from reference_model.model import Config, forward_fused, params_only
from pytest_backprop.problems.lecture import PARAMETERS


@pytest.fixture(scope="module")
def dataset():
    return build_splits(load_words(None))


def _batch(seed: int = 0, n: int = 32, vocab: int = 27):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, 3), generator=g), torch.randint(0, vocab, (n,), generator=g)


def _autograd_grads(params, Xb, Yb, dtype):
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in params.items()}
    forward_fused(leaves, Xb, Yb)["loss"].backward()
    return {k: leaves[k].grad for k in PARAMETERS}


@pytest.mark.parametrize("n_hidden, n", [(200, 32), (64, 32), (7, 5)])
def test_fused_backward_matches_autograd_within_the_rule(n_hidden, n):
    params = params_only(Config(n_hidden=n_hidden))
    Xb, Yb = _batch(n_hidden, n)
    with torch.no_grad():
        grads = fused_backward(T.lean_forward(params, Xb, Yb))
    g32 = _autograd_grads(params, Xb, Yb, torch.float32)
    g64 = _autograd_grads(params, Xb, Yb, torch.float64)
    for name in PARAMETERS:
        assert grads[name].shape == params[name].shape, name
        atol = derive(g32[name], g64[name]).atol
        assert float((grads[name].double() - g64[name]).abs().max()) <= atol, name


def test_a_wrong_fused_gradient_is_outside_the_rule():
    """The check above can fail: 1/n instead of 1/(n-1) in the BatchNorm term is caught."""
    params = params_only(Config(n_hidden=200))
    Xb, Yb = _batch(1)
    with torch.no_grad():
        c = T.lean_forward(params, Xb, Yb)
        c["bnraw"] = c["bnraw"] * (32 / 31)  # what a 1/n for 1/(n-1) slip does to the last term, roughly
        grads = fused_backward(c)
    g32 = _autograd_grads(params, Xb, Yb, torch.float32)
    g64 = _autograd_grads(params, Xb, Yb, torch.float64)
    assert float((grads["W1"].double() - g64["W1"]).abs().max()) > derive(g32["W1"], g64["W1"]).atol


def test_cross_entropy_backward_is_the_lecture_form_bit_for_bit():
    logits = torch.randn(32, 27, generator=torch.Generator().manual_seed(3))
    Yb = _batch(3)[1]
    lecture = F.softmax(logits, 1)
    lecture[range(32), Yb] -= 1
    lecture /= 32
    assert torch.equal(cross_entropy_backward(logits, Yb), lecture)


def test_lean_forward_is_the_fused_forward():
    params = params_only(Config(n_hidden=200))
    Xb, Yb = _batch(2)
    with torch.no_grad():
        lean, fused = T.lean_forward(params, Xb, Yb), forward_fused(params, Xb, Yb)
    for key in ("embcat", "bnvar_inv", "bnraw", "h", "logits", "loss"):
        torch.testing.assert_close(lean[key], fused[key], rtol=1e-5, atol=1e-6, msg=key)


def test_manual_and_autograd_steps_agree_over_steps():
    start = params_only(Config(n_hidden=200))
    manual = {k: v.clone() for k, v in start.items()}
    auto = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    for i in range(20):
        Xb, Yb = _batch(100 + i)
        with torch.no_grad():
            lm = T.manual_step(manual, Xb, Yb, 0.1)
        la = T.autograd_step(auto, Xb, Yb, 0.1)
        assert abs(float(lm) - float(la)) < 1e-5
    for k in PARAMETERS:
        assert float((manual[k] - auto[k].detach()).abs().max()) < 1e-5, k


def test_chunked_batches_are_the_lectures_per_step_draws():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    per_step = torch.stack([torch.randint(0, 1000, (32,), generator=g1) for _ in range(50)])
    assert torch.equal(torch.randint(0, 1000, (50, 32), generator=g2), per_step)


def test_train_short_run(dataset):
    manual = T.train(dataset, steps=300, backward="manual", n_hidden=64, samples=3)
    auto = T.train(dataset, steps=300, backward="autograd", n_hidden=64, samples=0)
    assert len(manual.losses) == 300 and manual.losses[-1] < manual.losses[0]
    assert abs(manual.split_losses["train"] - auto.split_losses["train"]) < 1e-4
    assert set(manual.split_losses) == {"train", "val"}
    assert len(manual.samples) == 3 and all(s.endswith(".") for s in manual.samples)
    assert torch.get_num_threads() >= 1  # restored (the run used one thread)


def test_train_rejects_unknown_backward(dataset):
    with pytest.raises(ValueError, match="manual, autograd"):
        T.train(dataset, steps=1, backward="magic")


def test_lecture_lr():
    assert (T.lecture_lr(0), T.lecture_lr(99_999), T.lecture_lr(100_000)) == (0.1, 0.1, 0.01)


def test_torch_threads_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs with OMP_NUM_THREADS=1: start from another count
    try:
        with T.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cli_both_with_plot(tmp_path, capsys):
    png = tmp_path / "curves" / "losses.png"
    assert T.main(["--steps", "200", "--backward", "both", "--plot", str(png), "--no-progress", "--n-hidden", "32"]) == 0
    out = capsys.readouterr().out
    assert "manual   backward: train" in out and "autograd backward: train" in out
    assert "largest parameter difference manual vs autograd" in out
    samples = out.split("samples (manual):")[1].split("loss curves")[0].split()
    assert len(samples) == 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_names_and_bad_names(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "ella"] * 20))
    assert T.main(["--steps", "50", "--names", str(names), "--no-progress", "--n-hidden", "16"]) == 0
    assert f"data: {names} (160 words)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such file"):
        T.main(["--names", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match="at least 1"):
        T.main(["--steps", "0"])


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_fast_build_dataset_equals_the_lecture_loop(block_size):
    words = list(load_words(None).words)
    random.Random(block_size).shuffle(words)
    words = words[:2000] + ["", "a"]
    stoi, _ = vocabulary(words)
    X, Y = build_dataset(words, stoi, block_size)
    X2, Y2 = build_dataset_loop(words, stoi, block_size)
    assert torch.equal(X, X2) and torch.equal(Y, Y2)


def test_build_dataset_non_ascii_falls_back_to_the_loop():
    words = ["zoé", "renée"]
    stoi, _ = vocabulary(words)
    X, Y = build_dataset(words, stoi)
    X2, Y2 = build_dataset_loop(words, stoi)
    assert torch.equal(X, X2) and torch.equal(Y, Y2)


def test_names_txt_shapes(shared_names):
    ds = build_splits(load_words(shared_names))
    assert (tuple(ds.Xtr.shape), tuple(ds.Xdev.shape), tuple(ds.Xte.shape)) == ((182625, 3), (22655, 3), (22866, 3))


def test_progress_bar_shows_the_running_loss(dataset, capsys):
    pytest.importorskip("tqdm")
    T.train(dataset, steps=1500, n_hidden=16, progress=True, samples=0)
    err = capsys.readouterr().err
    assert "manual backward" in err and "loss=" in err and "1.50k" in err


# --- backprop-train --impl: your backward beside autograd's ------------------------------------------

def test_first_separation_and_loss_summary():
    assert T.first_separation([3.3, 3.1, 2.9], [3.3, 3.1, 2.8]) == 2
    assert T.first_separation([3.3, 3.1], [3.3, 3.1 + 1e-6]) is None
    assert T.first_separation([3.3, float("nan")], [3.3, 3.1]) == 1
    lines = T.loss_summary({"yours": [3.0, 2.0, 1.0], "autograd": [3.0, 2.0, 1.5]}, points=3)
    assert lines[0].split() == ["step", "yours", "autograd"]
    assert lines[-1].split() == ["2", "1.0000", "1.5000"]


def test_cli_impl_the_reference_backward_never_separates(ex1_solution, capsys):
    assert T.main(["--impl", str(ex1_solution), "--steps", "20", "--n-hidden", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "your backward: script" in out
    assert "the curves never separate" in out
    assert "final train loss: yours" in out and "lecture 2.0705" in out and "lecture 2.1099" in out
    assert "the lecture's losses are for names.txt and 200000 steps" in out
    finals = [line.split() for line in out.splitlines() if line.startswith("final")]
    assert all(abs(float(f[4]) - float(f[6])) < 1e-4 for f in finals)  # yours == autograd's


def test_cli_impl_a_buggy_backward_separates_early(capsys):
    from conftest import EXAMPLES

    assert T.main(["--impl", str(EXAMPLES / "ex1_buggy.py"), "--steps", "20", "--n-hidden", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    step = int(out.split("the curves separate at step ")[1].split(":")[0])
    assert 1 <= step <= 3  # step 0 is the same start; the first wrong update shows at once


def test_cli_impl_a_notebook_through_the_notebook_loader(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("backprop_nbdata_train", Path(__file__).parent / "data" / "notebooks.py")
    nbdata = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nbdata)
    path = nbdata.write(nbdata.lecture_notebook(), tmp_path / "ninja.ipynb")
    assert T.main(["--impl", str(path), "--steps", "5", "--n-hidden", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "your backward: notebook" in out and "never separate" in out


def test_cli_impl_incomplete_or_missing(tmp_path, capsys):
    partial = tmp_path / "partial.py"
    partial.write_text("dlogprobs = torch.zeros_like(logprobs)\n")
    assert T.main(["--impl", str(partial), "--steps", "3", "--n-hidden", "16", "--no-progress"]) == 1
    assert "your backward cannot train: at step 0: training needs every parameter gradient; missing: dC" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--impl"):
        T.main(["--impl", str(tmp_path / "nope.py"), "--steps", "3"])


def test_reference_model_imports_the_kit_only_inside_functions():
    import ast

    for path in (Path(T.__file__).parent).glob("*.py"):
        top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [n.module or "" for n in top if isinstance(n, ast.ImportFrom)] + [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in names if m.startswith("pytest_backprop")], path.name
