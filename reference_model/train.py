"""Exercise 4: train the lecture's MLP with the hand-written backward instead of ``loss.backward()``.

The lecture's setting: n_hidden 200 (12,297 parameters), 200,000 SGD steps of batch 32, learning
rate 0.1 then 0.01 from step 100,000, BatchNorm statistics calibrated over the training set at the
end, then the train/dev loss and 20 sampled names. With names.txt the manual run lands at
train 2.07, val 2.11 (the lecture: 2.0705 / 2.1099).

Run it::

    python -m reference_model.train --names names.txt            # or: backprop-train --names names.txt
    backprop-train --names names.txt --backward both --plot losses.png --steps 20000
    backprop-train --impl my_backward.py --steps 2000      # YOUR backward beside autograd's

Why it is fast (about 0.2 ms a step on one core; see docs/performance.md): the manual step is
:func:`manual_step` -- a forward that does each BatchNorm statistic with plain sums (``Tensor.var``
alone costs more than the rest of the forward), :func:`~reference_model.backward.fused_backward`,
and in-place parameter updates, all under ``torch.no_grad()``; the batches are drawn 1,000 steps at
a time (the same numbers the lecture's per-step ``torch.randint`` draws); and torch runs on one
thread, because for 32x200 matrices the thread pool costs more than it saves.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .backward import fused_backward
from .data import Dataset, build_splits, load_words
from .model import LECTURE_SEED, Config, forward_fused, init_params

#: The lecture's ``parameters = [C, W1, b1, W2, b2, bngain, bnbias]``.
PARAMETER_ORDER: tuple[str, ...] = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")
BACKWARDS = ("manual", "autograd")
LECTURE_STEPS = 200_000
DECAY_STEP = 100_000
CHUNK = 1_000


def lecture_lr(step: int) -> float:
    """The lecture's schedule: 0.1, then 0.01 from step 100,000.

    Example::

        lecture_lr(0), lecture_lr(100_000)   # (0.1, 0.01)
    """
    return 0.1 if step < DECAY_STEP else 0.01


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block (None: leave it alone), then restore.

    Example::

        with torch_threads(1):
            train(dataset, steps=1000)
    """
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lean_forward(params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fused forward with as few tensor operations as possible; for use under ``torch.no_grad()``.

    Same mathematics as :func:`reference_model.model.forward_fused` (biased mean, Bessel-corrected
    variance); returns what :func:`~reference_model.backward.fused_backward` reads plus the loss.
    The variance is ``(bndiff**2).sum(0) / (n-1)``: ``Tensor.var`` over dim 0 takes ~50 us here,
    longer than the rest of the forward together.

    Example::

        with torch.no_grad():
            cache = lean_forward(params, Xb, Yb)
            cache["loss"]    # same value as F.cross_entropy on forward_fused's logits
    """
    C, W1, b1, W2, b2 = params["C"], params["W1"], params["b1"], params["W2"], params["b2"]
    n = Xb.shape[0]
    embcat = C[Xb].view(n, -1)
    hprebn = torch.addmm(b1, embcat, W1)
    bndiff = hprebn - hprebn.mean(0, keepdim=True)
    bnvar_inv = (bndiff * bndiff).sum(0, keepdim=True).mul_(1.0 / (n - 1)).add_(1e-5).rsqrt_()
    bnraw = bndiff.mul_(bnvar_inv)
    h = torch.addcmul(params["bnbias"], params["bngain"], bnraw).tanh_()
    logits = torch.addmm(b2, h, W2)
    return {**params, "Xb": Xb, "Yb": Yb, "embcat": embcat, "bnvar_inv": bnvar_inv, "bnraw": bnraw,
            "h": h, "logits": logits, "loss": F.cross_entropy(logits, Yb)}


def manual_step(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, lr: float) -> torch.Tensor:
    """One SGD step with the hand-written backward (parameters updated in place); returns the loss.

    Example::

        with torch.no_grad():
            loss = manual_step(params, Xb, Yb, lr=0.1)
    """
    cache = lean_forward(params, Xb, Yb)
    grads = fused_backward(cache)
    for name in PARAMETER_ORDER:
        params[name].add_(grads[name], alpha=-lr)
    return cache["loss"]


def autograd_step(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, lr: float) -> torch.Tensor:
    """One SGD step with ``loss.backward()`` on the fused forward (the lecture's reference).

    ``params`` must require grad. Example::

        loss = autograd_step(params, Xb, Yb, lr=0.1)
    """
    with torch.enable_grad():
        for name in PARAMETER_ORDER:
            params[name].grad = None
        loss = forward_fused(params, Xb, Yb)["loss"]
        loss.backward()
    with torch.no_grad():
        for name in PARAMETER_ORDER:
            params[name].add_(params[name].grad, alpha=-lr)
    return loss.detach()


STEPS: dict[str, Callable[..., torch.Tensor]] = {"manual": manual_step, "autograd": autograd_step}


class BackwardFailed(RuntimeError):
    """Your backward could not drive a step: it raised, or left a parameter gradient out."""


def user_step(implementation, words=None, timeout: float | None = None) -> Callable[..., torch.Tensor]:
    """One SGD step with *your* backward: an implementation loaded by the kit's loaders (a script, a module,
    per-line functions or a notebook; :func:`pytest_backprop.load_implementation`) runs on the lecture's
    forward at the current parameters and batch, and its 7 parameter gradients update them in place.

    Raises :class:`BackwardFailed` when the code raises or a parameter gradient is missing or of the wrong size.

    Example::

        from pytest_backprop import load_implementation
        step = user_step(load_implementation("backward.py", Path(".")))
        train(dataset, steps=1000, step=step, backward="yours")
    """
    from pytest_backprop.problems.instance import problem_from_batch

    done = [0]  # steps taken, for the messages

    def step(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, lr: float) -> torch.Tensor:
        config = Config(vocab_size=params["C"].shape[0], n_embd=params["C"].shape[1], n_hidden=params["W1"].shape[1],
                        batch_size=int(Xb.shape[0]), block_size=int(Xb.shape[1]))
        with torch.enable_grad():
            problem = problem_from_batch(config, params, Xb, Yb, words=words, judged=())  # values only
            run = implementation.run("ex1", problem, timeout)
        missing = [name for name in PARAMETER_ORDER if name not in run.grads]
        at = f"at step {done[0]}"
        if run.error is not None and missing:
            raise BackwardFailed(f"{at}, your backward raised: {run.error.describe()}")
        if missing:
            raise BackwardFailed(f"{at}: training needs every parameter gradient; missing: "
                                 + ", ".join("d" + m for m in missing))
        grads = {}
        for name in PARAMETER_ORDER:
            grads[name] = torch.as_tensor(run.grads[name]).detach().to(params[name].dtype)
            if grads[name].numel() != params[name].numel():
                raise BackwardFailed(f"{at}: d{name} has shape {tuple(grads[name].shape)}, {name} has "
                                     f"{tuple(params[name].shape)}")
        for name in PARAMETER_ORDER:
            params[name].add_(grads[name].reshape(params[name].shape), alpha=-lr)
        done[0] += 1
        return torch.tensor(problem.loss)

    return step


@dataclass
class TrainResult:
    """What one training run produced: parameters, BatchNorm statistics, losses, samples."""

    backward: str
    params: dict[str, torch.Tensor]
    losses: list[float]  # the minibatch loss of every step
    bnmean: torch.Tensor
    bnvar: torch.Tensor
    split_losses: dict[str, float] = field(default_factory=dict)  # train, val
    samples: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the training loop alone

    @property
    def steps_per_second(self) -> float:
        return len(self.losses) / self.seconds if self.seconds else float("nan")


def calibrate_batchnorm(params: Mapping[str, torch.Tensor], X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm mean and variance over a whole split (the lecture calibrates over the training set).

    Example::

        bnmean, bnvar = calibrate_batchnorm(result.params, dataset.Xtr)
    """
    with torch.no_grad():
        hpreact = params["C"][X].view(X.shape[0], -1) @ params["W1"] + params["b1"]
        return hpreact.mean(0, keepdim=True), hpreact.var(0, keepdim=True, unbiased=True)


def _inference_logits(params: Mapping[str, torch.Tensor], bnmean: torch.Tensor, bnvar: torch.Tensor,
                      X: torch.Tensor) -> torch.Tensor:
    hpreact = params["C"][X].view(X.shape[0], -1) @ params["W1"] + params["b1"]
    hpreact = params["bngain"] * (hpreact - bnmean) * (bnvar + 1e-5) ** -0.5 + params["bnbias"]
    return torch.tanh(hpreact) @ params["W2"] + params["b2"]


def split_loss(params: Mapping[str, torch.Tensor], bnmean: torch.Tensor, bnvar: torch.Tensor,
               X: torch.Tensor, Y: torch.Tensor) -> float:
    """The loss over a whole split with the calibrated BatchNorm statistics.

    Example::

        split_loss(result.params, result.bnmean, result.bnvar, dataset.Xdev, dataset.Ydev)   # ~2.11
    """
    with torch.no_grad():
        return float(F.cross_entropy(_inference_logits(params, bnmean, bnvar, X), Y))


def sample(params: Mapping[str, torch.Tensor], bnmean: torch.Tensor, bnvar: torch.Tensor, itos: Mapping[int, str],
           count: int = 20, seed: int = LECTURE_SEED + 10, block_size: int = 3) -> list[str]:
    """Sample ``count`` names as the lecture does (generator seeded with 2147483647 + 10).

    Example::

        sample(result.params, result.bnmean, result.bnvar, dataset.itos)[:2]   # e.g. ['mora.', 'mayah.']
    """
    g = torch.Generator().manual_seed(seed)
    out_names = []
    with torch.no_grad():
        for _ in range(count):
            out, context = [], [0] * block_size
            while True:
                logits = _inference_logits(params, bnmean, bnvar, torch.tensor([context]))
                ix = int(torch.multinomial(F.softmax(logits, dim=1), num_samples=1, generator=g))
                context = context[1:] + [ix]
                out.append(ix)
                if ix == 0 or len(out) > 50:
                    break
            out_names.append("".join(itos[i] for i in out))
    return out_names


def train(dataset: Dataset, *, steps: int = LECTURE_STEPS, backward: str = "manual", seed: int = LECTURE_SEED,
          n_hidden: int = 200, batch_size: int = 32, lr: Callable[[int], float] = lecture_lr,
          threads: int | None = 1, progress: bool = False, samples: int = 20,
          step: Callable[..., torch.Tensor] | None = None) -> TrainResult:
    """Exercise 4: train from the lecture's initialisation with the chosen backward.

    Parameters, then one batch per step, come from ``torch.Generator().manual_seed(seed)`` as in
    the lecture (batches are drawn 1,000 steps at a time: the same numbers). ``backward`` is
    ``"manual"`` (:func:`manual_step`) or ``"autograd"`` (:func:`autograd_step`); or give your own
    ``step`` (e.g. :func:`user_step`), then ``backward`` is only its label.

    Example::

        result = train(build_splits(load_words("names.txt")), steps=200_000)
        result.split_losses   # {'train': 2.07..., 'val': 2.11...}
    """
    if step is None and backward not in STEPS:
        raise ValueError(f"backward must be one of {', '.join(STEPS)}, not {backward!r}")
    config = Config(vocab_size=dataset.vocab_size, n_hidden=n_hidden, batch_size=batch_size, seed=seed)
    params = init_params(config)
    g = params.pop("_generator")
    if backward == "autograd":
        for p in params.values():
            p.requires_grad_(True)
    step_fn = step or STEPS[backward]
    Xtr, Ytr = dataset.Xtr, dataset.Ytr
    losses: list[float] = []
    bar = _progress_bar(steps, backward) if progress else None
    start = time.perf_counter()
    with torch_threads(threads), torch.no_grad():
        for first in range(0, steps, CHUNK):
            count = min(CHUNK, steps - first)
            ix = torch.randint(0, Xtr.shape[0], (count, batch_size), generator=g)
            Xc, Yc = Xtr[ix], Ytr[ix]
            chunk_losses = torch.empty(count)
            for j in range(count):
                chunk_losses[j] = step_fn(params, Xc[j], Yc[j], lr(first + j))
            losses += chunk_losses.tolist()
            if bar is not None:
                bar.update(count)
                bar.set_postfix(loss=f"{sum(losses[-count:]) / count:.4f}", lr=lr(first + count - 1))
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
    bnmean, bnvar = calibrate_batchnorm(params, Xtr)
    result = TrainResult(backward, params, losses, bnmean, bnvar, seconds=seconds)
    result.split_losses = {"train": split_loss(params, bnmean, bnvar, Xtr, Ytr),
                           "val": split_loss(params, bnmean, bnvar, dataset.Xdev, dataset.Ydev)}
    if samples:
        result.samples = sample(params, bnmean, bnvar, dataset.itos, samples, seed + 10, config.block_size)
    return result


def _progress_bar(total: int, label: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is the "train" extra; without it, no bar
        return None
    return tqdm(total=total, desc=f"{label} backward", unit="step", unit_scale=True, mininterval=0.5)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backprop-train",
        description="Exercise 4 of 'becoming a backprop ninja': train the MLP with the hand-written backward.")
    p.add_argument("--steps", type=int, default=LECTURE_STEPS, help="SGD steps (default 200000, the lecture's)")
    p.add_argument("--names", metavar="PATH",
                   help="names file, one name a line (default: ./names.txt if present, else the embedded census names)")
    p.add_argument("--backward", choices=("manual", "autograd", "both"), default="manual",
                   help="the hand-written backward, loss.backward(), or both from the same start (default manual)")
    p.add_argument("--seed", type=int, default=LECTURE_SEED, help="generator seed (default the lecture's 2147483647)")
    p.add_argument("--plot", metavar="PATH", help="write the loss curves to this PNG (needs matplotlib)")
    p.add_argument("--n-hidden", type=int, default=200, help="hidden units (default 200, the lecture's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: faster than more for matrices this small; 0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--impl", metavar="PATH_OR_MODULE",
                   help="train with YOUR backward (a script, module, per-line module or notebook, loaded as "
                        "pytest --backprop-impl loads it) beside autograd's, from the same start")
    p.add_argument("--separation", type=float, default=SEPARATION, metavar="REL",
                   help=f"with --impl: the curves separate at the first step where the minibatch losses differ by "
                        f"more than REL times autograd's loss (default {SEPARATION:g})")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="with --impl: seconds one run of your backward may take (default 60)")
    return p


#: The lecture's final losses (200,000 steps, names.txt): what a correct backward reaches.
LECTURE_LOSSES = {"train": 2.0705, "val": 2.1099}
#: Default relative difference of the minibatch losses that counts as the curves separating: float32
#: rounding alone keeps a correct backward's loss within about 1e-5 of autograd's for thousands of steps.
SEPARATION = 1e-3


def first_separation(yours: Sequence[float], autograd: Sequence[float], rel: float = SEPARATION) -> int | None:
    """The first step whose minibatch losses differ by more than ``rel`` times autograd's (None: never).

    Example::

        first_separation([3.3, 3.1, 2.9], [3.3, 3.1, 2.8])   # 2
    """
    for step, (a, b) in enumerate(zip(yours, autograd)):
        if not abs(a - b) <= rel * max(abs(b), 1e-12):  # NaN separates too
            return step
    return None


def loss_summary(curves: Mapping[str, Sequence[float]], points: int = 8) -> list[str]:
    """A text loss curve: the minibatch loss (mean over a window) of each run at ``points`` steps.

    Example::

        loss_summary({"yours": losses_a, "autograd": losses_b})   # ['   step  yours  autograd', ...]
    """
    names = list(curves)
    steps = min(len(c) for c in curves.values())
    if steps == 0:
        return []
    marks = sorted({0, steps - 1, *(round(i * (steps - 1) / (points - 1)) for i in range(points))})
    window = max(1, steps // (4 * points))
    lines = [f"{'step':>8s} " + " ".join(f"{n:>10s}" for n in names)]
    for m in marks:
        lo = max(0, m - window + 1)
        lines.append(f"{m:>8d} " + " ".join(f"{sum(curves[n][lo:m + 1]) / (m + 1 - lo):>10.4f}" for n in names))
    return lines


def _train_with_impl(args: argparse.Namespace, words, dataset) -> int:
    """``--impl``: your backward beside autograd's, the curves, where they separate, the final losses."""
    from pytest_backprop.usercode.base import LoadError
    from pytest_backprop.usercode.loaders import load_implementation

    try:
        implementation = load_implementation(args.impl, Path.cwd())
    except LoadError as exc:
        raise SystemExit(f"backprop-train: --impl: {exc}") from None
    print(f"your backward: {implementation.description}")
    results = {}
    try:
        results["yours"] = train(dataset, steps=args.steps, backward="yours", seed=args.seed, n_hidden=args.n_hidden,
                                 threads=args.threads or None, progress=not args.no_progress,
                                 step=user_step(implementation, words, args.timeout))
    except BackwardFailed as exc:
        print(f"your backward cannot train: {exc}")
        return 1
    results["autograd"] = train(dataset, steps=args.steps, backward="autograd", seed=args.seed, n_hidden=args.n_hidden,
                                threads=args.threads or None, progress=not args.no_progress, samples=0)
    yours, auto = results["yours"], results["autograd"]
    print("minibatch loss (mean over a short window):")
    for line in loss_summary({"yours": yours.losses, "autograd": auto.losses}):
        print("  " + line)
    split = first_separation(yours.losses, auto.losses, args.separation)
    gap = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(yours.losses, auto.losses)), default=0.0)
    if split is None:
        print(f"the curves never separate: every step's loss is within {args.separation:g} (relative) of autograd's "
              f"(largest difference {gap:.1e})")
    else:
        print(f"the curves separate at step {split}: loss {yours.losses[split]:.4f} (yours) vs "
              f"{auto.losses[split]:.4f} (autograd), more than {args.separation:g} relative")
    for name in ("train", "val"):
        print(f"final {name:5s} loss: yours {yours.split_losses[name]:.4f}  autograd {auto.split_losses[name]:.4f}  "
              f"lecture {LECTURE_LOSSES[name]:.4f}")
    if args.steps != LECTURE_STEPS or Path(str(words.source)).name != "names.txt":
        print(f"(the lecture's losses are for names.txt and {LECTURE_STEPS} steps; compare yours with autograd's here)")
    print(f"({yours.seconds:.1f} s for your backward: the kit runs it on a fresh problem every step)")
    print("samples (yours):")
    for name in yours.samples:
        print("  " + name)
    if args.plot:
        from pytest_backprop.report.plots import loss_curves

        path = loss_curves({"your backward": yours.losses, "autograd": auto.losses}, args.plot,
                           title=f"Exercise 4: {args.steps} SGD steps")
        print(f"loss curves written to {path}")
    return 0


def _words(names: str | None):
    if names is None and Path("names.txt").is_file():
        names = "names.txt"
    if names is not None and not Path(names).is_file():
        raise SystemExit(f"backprop-train: --names: no such file: {names}")
    return load_words(names)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m reference_model.train`` / ``backprop-train``.

    Example::

        main(["--steps", "1000", "--names", "names.txt", "--backward", "both", "--plot", "losses.png"])
    """
    args = _parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("backprop-train: --steps must be at least 1")
    words = _words(args.names)
    dataset = build_splits(words)
    print(f"data: {words.source} ({len(words)} words), train {tuple(dataset.Xtr.shape)}, "
          f"dev {tuple(dataset.Xdev.shape)}; n_hidden {args.n_hidden}, {args.steps} steps of batch 32, seed {args.seed}")
    if args.impl:
        return _train_with_impl(args, words, dataset)
    kinds = BACKWARDS if args.backward == "both" else (args.backward,)
    results = {}
    for kind in kinds:
        r = train(dataset, steps=args.steps, backward=kind, seed=args.seed, n_hidden=args.n_hidden,
                  threads=args.threads or None, progress=not args.no_progress)
        results[kind] = r
        print(f"{kind:8s} backward: train {r.split_losses['train']:.4f}  val {r.split_losses['val']:.4f}  "
              f"({r.seconds:.1f} s, {r.steps_per_second:,.0f} steps/s)")
    if len(results) == 2:
        m, a = results["manual"].params, results["autograd"].params
        drift = max(float((m[k] - a[k]).abs().max()) for k in PARAMETER_ORDER)
        print(f"largest parameter difference manual vs autograd after {args.steps} steps: {drift:.2e}")
    first = results[kinds[0]]
    print(f"samples ({kinds[0]}):")
    for name in first.samples:
        print("  " + name)
    if args.plot:
        from pytest_backprop.report.plots import loss_curves

        path = loss_curves({f"{k} backward": r.losses for k, r in results.items()}, args.plot,
                           title=f"Exercise 4: {args.steps} SGD steps")
        print(f"loss curves written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
