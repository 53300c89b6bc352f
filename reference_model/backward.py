"""Reference solutions: the backward pass written by hand, in the lecture's four forms.

Each function takes plain tensors (no autograd) and returns gradients keyed by tensor name, so each
one is also a valid implementation for ``pytest --backprop --backprop-impl=reference_model.backward``.

Example::

    grads = backward(cache)          # all 26, atomic (Exercise 1)
    dlogits = cross_entropy_backward(logits, Yb)               # Exercise 2
    dhprebn = batchnorm_backward(dhpreact, bngain, bnvar_inv, bnraw)  # Exercise 3
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F


def embedding_backward(demb: torch.Tensor, Xb: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """dC without a Python loop: scatter-add every row of ``demb`` into the row of its token.

    Example::

        dC = embedding_backward(demb, Xb, C.shape[0])
    """
    dC = torch.zeros((vocab_size, demb.shape[-1]), dtype=demb.dtype, device=demb.device)
    dC.index_add_(0, Xb.reshape(-1), demb.reshape(-1, demb.shape[-1]))
    return dC


def backward(cache: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exercise 1: backprop through every line of the expanded forward pass, atomically.

    ``cache`` holds the forward tensors by their lecture names (plus ``n``, ``Xb``, ``Yb``).
    """
    c = cache
    n, Yb = c["n"], c["Yb"]
    g: dict[str, torch.Tensor] = {}
    dlogprobs = torch.zeros_like(c["logprobs"])
    dlogprobs[range(n), Yb] = -1.0 / n
    g["logprobs"] = dlogprobs
    g["probs"] = (1.0 / c["probs"]) * dlogprobs
    g["counts_sum_inv"] = (c["counts"] * g["probs"]).sum(1, keepdim=True)
    dcounts = c["counts_sum_inv"] * g["probs"]
    g["counts_sum"] = -c["counts_sum"] ** -2 * g["counts_sum_inv"]
    g["counts"] = dcounts + torch.ones_like(c["counts"]) * g["counts_sum"]
    g["norm_logits"] = c["counts"] * g["counts"]
    dlogits = g["norm_logits"].clone()
    g["logit_maxes"] = (-g["norm_logits"]).sum(1, keepdim=True)
    dlogits += F.one_hot(c["logits"].max(1).indices, num_classes=c["logits"].shape[1]) * g["logit_maxes"]
    g["logits"] = dlogits
    g["h"] = dlogits @ c["W2"].T
    g["W2"] = c["h"].T @ dlogits
    g["b2"] = dlogits.sum(0)
    g["hpreact"] = (1.0 - c["h"] ** 2) * g["h"]
    g["bngain"] = (c["bnraw"] * g["hpreact"]).sum(0, keepdim=True)
    g["bnraw"] = c["bngain"] * g["hpreact"]
    g["bnbias"] = g["hpreact"].sum(0, keepdim=True)
    dbndiff = c["bnvar_inv"] * g["bnraw"]
    g["bnvar_inv"] = (c["bndiff"] * g["bnraw"]).sum(0, keepdim=True)
    g["bnvar"] = (-0.5 * (c["bnvar"] + 1e-5) ** -1.5) * g["bnvar_inv"]
    g["bndiff2"] = (1.0 / (n - 1)) * torch.ones_like(c["bndiff2"]) * g["bnvar"]
    dbndiff += (2 * c["bndiff"]) * g["bndiff2"]
    g["bndiff"] = dbndiff
    dhprebn = dbndiff.clone()
    g["bnmeani"] = (-dbndiff).sum(0, keepdim=True)
    dhprebn += 1.0 / n * torch.ones_like(c["hprebn"]) * g["bnmeani"]
    g["hprebn"] = dhprebn
    g["embcat"] = dhprebn @ c["W1"].T
    g["W1"] = c["embcat"].T @ dhprebn
    g["b1"] = dhprebn.sum(0)
    g["emb"] = g["embcat"].view(c["emb"].shape)
    g["C"] = embedding_backward(g["emb"], c["Xb"], c["C"].shape[0])
    return g


def cross_entropy_backward(logits: torch.Tensor, Yb: torch.Tensor) -> torch.Tensor:
    """Exercise 2: dlogits of ``F.cross_entropy(logits, Yb)`` in one go (softmax minus one-hot, over n)."""
    n = logits.shape[0]
    dlogits = F.softmax(logits, 1)
    dlogits[range(n), Yb] -= 1
    dlogits /= n
    return dlogits


def batchnorm_backward(dhpreact: torch.Tensor, bngain: torch.Tensor, bnvar_inv: torch.Tensor, bnraw: torch.Tensor) -> torch.Tensor:
    """Exercise 3: dhprebn from dhpreact in one expression (with the n/(n-1) Bessel factor)."""
    n = dhpreact.shape[0]
    return bngain * bnvar_inv / n * (
        n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0)
    )


def fused_backward(cache: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exercise 4's backward: Exercise 2 and 3 in one go, vectorized dC; parameters' gradients only.

    ``cache`` holds what :func:`reference_model.model.forward_fused` returns plus the parameters.
    """
    c = cache
    dlogits = cross_entropy_backward(c["logits"], c["Yb"])
    dh = dlogits @ c["W2"].T
    dhpreact = (1.0 - c["h"] ** 2) * dh
    dhprebn = batchnorm_backward(dhpreact, c["bngain"], c["bnvar_inv"], c["bnraw"])
    dembcat = dhprebn @ c["W1"].T
    return {
        "W2": c["h"].T @ dlogits,
        "b2": dlogits.sum(0),
        "bngain": (c["bnraw"] * dhpreact).sum(0, keepdim=True),
        "bnbias": dhpreact.sum(0, keepdim=True),
        "W1": c["embcat"].T @ dhprebn,
        "b1": dhprebn.sum(0),
        "C": embedding_backward(dembcat.view(c["emb"].shape), c["Xb"], c["C"].shape[0]),
    }
