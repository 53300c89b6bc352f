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

    ``cache`` holds the forward tensors by their lecture names (plus ``n``, ``Xb``, ``Yb``). It works
    for any sizes and for every broadcasting pattern of the parameters (b1, b2 as (H,) or (1, H);
    bngain, bnbias as (1, H) or (H,)): a gradient that was broadcast is summed back to its
    parameter's shape with ``sum_to_size``.

    Example::

        grads = backward(problem.cache())
        grads["b1"].shape == problem["b1"].shape   # True, whatever b1's pattern
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
    g["b2"] = dlogits.sum_to_size(c["b2"].shape)
    g["hpreact"] = (1.0 - c["h"] ** 2) * g["h"]
    g["bngain"] = (c["bnraw"] * g["hpreact"]).sum_to_size(c["bngain"].shape)
    g["bnraw"] = c["bngain"] * g["hpreact"]
    g["bnbias"] = g["hpreact"].sum_to_size(c["bnbias"].shape)
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
    g["b1"] = dhprebn.sum_to_size(c["b1"].shape)
    g["emb"] = g["embcat"].view(c["emb"].shape)
    g["C"] = embedding_backward(g["emb"], c["Xb"], c["C"].shape[0])
    return g


def cross_entropy_backward(logits: torch.Tensor, Yb: torch.Tensor) -> torch.Tensor:
    """Exercise 2: dlogits of ``F.cross_entropy(logits, Yb)`` in one go (softmax minus one-hot, over n).

    ``dlogits -= one_hot(Yb)`` is the lecture's ``dlogits[range(n), Yb] -= 1`` with the same bits,
    at a quarter of the cost (indexing with a Python ``range`` converts it to a tensor every call).

    Example::

        dlogits = cross_entropy_backward(logits, Yb)   # matches autograd's dlogits, maxdiff ~5e-9
    """
    n = logits.shape[0]
    dlogits = F.softmax(logits, 1)
    dlogits -= F.one_hot(Yb, logits.shape[1])
    dlogits /= n
    return dlogits


def batchnorm_backward(dhpreact: torch.Tensor, bngain: torch.Tensor, bnvar_inv: torch.Tensor, bnraw: torch.Tensor) -> torch.Tensor:
    """Exercise 3: dhprebn from dhpreact in one expression (with the n/(n-1) Bessel factor).

    Example::

        dhprebn = batchnorm_backward(dhpreact, bngain, bnvar_inv, bnraw)   # maxdiff ~9e-10 vs autograd
    """
    n = dhpreact.shape[0]
    return bngain * bnvar_inv / n * (
        n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0)
    )


def fused_backward(cache: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exercise 4's backward: Exercise 2 and 3 in one go, vectorized dC; parameters' gradients only.

    ``cache`` holds what :func:`reference_model.model.forward_fused` returns plus the parameters
    (only logits, h, bnraw, bnvar_inv, embcat, Xb, Yb and the parameters are read). It is the
    Exercise 2 and 3 formulas, written to do as few tensor operations as possible, because in a
    network this small every operation costs more in dispatch than in arithmetic:

    - dbngain and dbnbias are the two column sums that Exercise 3's formula needs, so they are
      computed once and reused (``dhprebn = bngain*bnvar_inv * (dhpreact - dbnbias/n
      - bnraw*dbngain/(n-1))``, the lecture's line with n divided in);
    - ``(1 - h**2) * dh`` as one ``addcmul`` (``dh - dh*h**2``); in-place updates only on
      tensors this function created;
    - dC by ``index_add_`` (no Python loop).

    Example::

        with torch.no_grad():
            cache = forward_fused(params, Xb, Yb) | params
            grads = fused_backward(cache)          # {"C": dC, "W1": dW1, ..., "bnbias": dbnbias}
    """
    c = cache
    C, W1, W2, bngain = c["C"], c["W1"], c["W2"], c["bngain"]
    h, bnraw, Xb = c["h"], c["bnraw"], c["Xb"]
    n = Xb.shape[0]
    dlogits = cross_entropy_backward(c["logits"], c["Yb"])
    dh = dlogits @ W2.T
    dhpreact = torch.addcmul(dh, dh, h * h, value=-1.0)
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    dbnbias = dhpreact.sum(0, keepdim=True)
    dhprebn = torch.sub(dhpreact, dbnbias, alpha=1.0 / n).addcmul_(bnraw, dbngain, value=-1.0 / (n - 1))
    dhprebn.mul_(bngain * c["bnvar_inv"])
    dembcat = dhprebn @ W1.T
    dC = torch.zeros_like(C).index_add_(0, Xb.reshape(-1), dembcat.view(-1, C.shape[1]))
    return {
        "C": dC,
        "W1": c["embcat"].T @ dhprebn,
        "b1": dhprebn.sum(0),
        "W2": h.T @ dlogits,
        "b2": dlogits.sum(0),
        "bngain": dbngain,
        "bnbias": dbnbias,
    }
