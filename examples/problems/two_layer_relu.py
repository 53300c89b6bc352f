"""A problem for ``--backprop-problem``: a two-layer ReLU MLP with an expanded softmax cross-entropy.

An instructor's own exercise, defined the way the kit reads every problem: named sizes, seeded
inputs, and the forward pass written once, one assignment per line. The kit derives the line table,
the autograd truth of every tensor, the tolerances, the consumer graph and the report's order
from it. ``two_layer_relu_backward.py`` is a correct backward pass, ``two_layer_relu_buggy.py`` one
with two of the classic mistakes.
"""

import torch

NAME = "two-layer ReLU MLP"

SIZES = {"n": 8, "d": 5, "h": 6, "c": 4}  # batch, input features, hidden units, classes

SIZE_RANGES = {"n": (1, 16), "c": (2, 8)}  # one example is fine here; a softmax needs two classes


def make_inputs(sizes, generator):
    """A batch ``x`` with targets ``y``, and the weights (small random biases: zeros hide mistakes)."""
    n, d, h, c = sizes["n"], sizes["d"], sizes["h"], sizes["c"]
    return {
        "x": torch.randn((n, d), generator=generator),
        "W1": torch.randn((d, h), generator=generator) / d**0.5,
        "b1": torch.randn(h, generator=generator) * 0.1,
        "W2": torch.randn((h, c), generator=generator) / h**0.5,
        "b2": torch.randn(c, generator=generator) * 0.1,
        "y": torch.randint(0, c, (n,), generator=generator),
        "n": n,
    }


def forward(x, W1, b1, W2, b2, y, n):
    z1 = x @ W1 + b1
    a1 = torch.relu(z1)
    z2 = a1 @ W2 + b2
    zmax = z2.max(1, keepdim=True).values
    shifted = z2 - zmax
    e = shifted.exp()
    esum = e.sum(1, keepdim=True)
    logp = shifted - esum.log()
    loss = -logp[range(n), y].mean()
    return loss
