"""Per-line backward functions for two_layer_relu.py: one ``backward_<output>`` per line of its
forward, each returning the gradient of every tensor the line reads (by name).

Arguments are injected by name like pytest fixtures: the line's inputs and output, the constants,
and ``d<output>`` (the upstream gradient). The kit checks each function against autograd's VJP of
its line (``backprop::lines::<output>``) and chains them into the full backward (``backprop::ex1``).
"""

import torch
import torch.nn.functional as F


def backward_loss(dloss, logp, y, n):
    dlogp = torch.zeros_like(logp)
    dlogp[range(n), y] = -dloss / n
    return {"logp": dlogp}


def backward_logp(dlogp, shifted, esum):
    return {"shifted": dlogp.clone(), "esum": -dlogp.sum(1, keepdim=True) / esum}


def backward_esum(desum, e):
    return {"e": torch.ones_like(e) * desum}


def backward_e(de, e):
    return {"shifted": e * de}


def backward_shifted(dshifted):
    return {"z2": dshifted.clone(), "zmax": -dshifted.sum(1, keepdim=True)}


def backward_zmax(dzmax, z2):
    return {"z2": F.one_hot(z2.argmax(1), num_classes=z2.shape[1]).to(z2.dtype) * dzmax}


def backward_z2(dz2, a1, W2):
    return {"a1": dz2 @ W2.T, "W2": a1.T @ dz2, "b2": dz2.sum(0)}


def backward_a1(da1, z1):
    return {"z1": (z1 > 0).to(z1.dtype) * da1}


def backward_z1(dz1, x, W1):
    return {"x": dz1 @ W1.T, "W1": x.T @ dz1, "b1": dz1.sum(0)}
