"""P3: one Exercise 4 training step (n_hidden 200, batch 32, forward + backward + SGD update).

Variants, timed interleaved in one process (medians over rounds; ratios within this run):

- ``expanded+autograd``: the lecture's 20 forward lines (straight-line, one code object) + ``loss.backward()``
- ``fused+autograd``:    :func:`reference_model.model.forward_fused` + ``loss.backward()``
- ``manual, straightforward``: forward_fused under no_grad + the backward written plainly
  (lecture Ex2 with ``range``, Ex3's one-liner, ``p += -lr * grad``): where we started
- ``  + lean forward``: the same backward after :func:`reference_model.train.lean_forward` (no ``Tensor.var``)
- ``manual (reference)``: :func:`reference_model.train.manual_step` (lean forward + fused_backward)

each at 1 thread and at torch's default thread count. Target: manual <= 0.6x expanded+autograd.

    python benchmarks/train_step.py [--rounds 15] [--number 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _timing import interleaved, median, median_of_ratios  # noqa: E402

from reference_model.backward import batchnorm_backward  # noqa: E402
from reference_model.model import Config, forward_fused, params_only  # noqa: E402
from pytest_backprop.problems.lecture import LINES  # noqa: E402
from reference_model.train import PARAMETER_ORDER, lean_forward, manual_step  # noqa: E402

EXPANDED = compile("\n".join(line.source for line in LINES), "<expanded forward>", "exec")


def batches(count: int, seed: int = 0):
    """Fixed random batches (the cost of a step does not depend on the data)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 27, (count, 32, 3), generator=g)
    Y = torch.randint(0, 27, (count, 32), generator=g)
    return list(zip(X, Y))


def make_variants(lr: float = 0.01):
    data = batches(64)
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(data)
        return data[state["i"]]

    base = params_only(Config(n_hidden=200))
    auto_e = {k: v.clone().requires_grad_() for k, v in base.items()}
    auto_f = {k: v.clone().requires_grad_() for k, v in base.items()}
    plain = {k: v.clone() for k, v in base.items()}
    ref = {k: v.clone() for k, v in base.items()}

    def sgd(params):
        with torch.no_grad():
            for k in PARAMETER_ORDER:
                params[k] += -lr * params[k].grad
                params[k].grad = None

    def expanded_autograd():
        Xb, Yb = nxt()
        ns = dict(auto_e, n=32, Xb=Xb, Yb=Yb)
        exec(EXPANDED, {"torch": torch, "F": F}, ns)
        ns["loss"].backward()
        sgd(auto_e)

    def fused_autograd():
        Xb, Yb = nxt()
        forward_fused(auto_f, Xb, Yb)["loss"].backward()
        sgd(auto_f)

    def manual_plain(forward=forward_fused):
        Xb, Yb = nxt()
        with torch.no_grad():
            c = forward(plain, Xb, Yb)
            n = 32
            dlogits = F.softmax(c["logits"], 1)
            dlogits[range(n), Yb] -= 1
            dlogits /= n
            dh = dlogits @ plain["W2"].T
            dhpreact = (1.0 - c["h"] ** 2) * dh
            dhprebn = batchnorm_backward(dhpreact, plain["bngain"], c["bnvar_inv"], c["bnraw"])
            dembcat = dhprebn @ plain["W1"].T
            dC = torch.zeros_like(plain["C"])
            dC.index_add_(0, Xb.view(-1), dembcat.view(-1, 10))
            grads = {"C": dC, "W1": c["embcat"].T @ dhprebn, "b1": dhprebn.sum(0), "W2": c["h"].T @ dlogits,
                     "b2": dlogits.sum(0), "bngain": (c["bnraw"] * dhpreact).sum(0, keepdim=True),
                     "bnbias": dhpreact.sum(0, keepdim=True)}
            for k in PARAMETER_ORDER:
                plain[k] += -lr * grads[k]

    def manual_reference():
        Xb, Yb = nxt()
        with torch.no_grad():
            manual_step(ref, Xb, Yb, lr)

    return {"expanded+autograd": expanded_autograd, "fused+autograd": fused_autograd,
            "manual, straightforward": manual_plain,
            "  + lean forward": lambda: manual_plain(lean_forward),
            "manual (reference)": manual_reference}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--number", type=int, default=200)
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {default_threads} threads by default, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.rounds} rounds x {args.number} steps, medians")
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        times = interleaved(make_variants(), rounds=args.rounds, number=args.number)
        print(f"\n-- {threads} thread(s) --")
        for name, values in times.items():
            print(f"{name:26s} {median(values) * 1e6:8.1f} us/step   "
                  f"x{median_of_ratios(times, name, 'expanded+autograd'):.2f} of expanded+autograd   "
                  f"x{median_of_ratios(times, name, 'fused+autograd'):.2f} of fused+autograd")
    torch.set_num_threads(default_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
