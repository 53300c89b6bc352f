"""Reference per-line backward functions: one ``backward_<output>`` for each line of :data:`LINES`.

Each function is the hand-written vector-Jacobian product of one line of the expanded forward
pass. Its parameters are named like the values it needs, so the kit can inject them by name (the
way pytest injects fixtures): the upstream gradient ``d<output>``, the line's inputs, its output,
and the constants ``n``, ``Xb``, ``Yb``. It returns ``{input name: contribution}``, or a bare
tensor when the line has a single differentiable input. This module is itself a valid per-line
implementation::

    pytest --backprop --backprop-impl=reference_model.backward_lines

Example::

    from reference_model.backward_lines import backward_probs
    parts = backward_probs(dprobs, counts, counts_sum_inv)
    parts["counts"], parts["counts_sum_inv"]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def backward_loss(dloss: Tensor, logprobs: Tensor, n: int, Yb: Tensor) -> Tensor:
    """``loss = -logprobs[range(n), Yb].mean()``: -dloss/n at each row's target, 0 elsewhere.

    Example::

        dlogprobs = backward_loss(torch.tensor(1.0), logprobs, 32, Yb)
    """
    dlogprobs = torch.zeros_like(logprobs)
    dlogprobs[range(n), Yb] = -dloss / n
    return dlogprobs


def backward_logprobs(dlogprobs: Tensor, probs: Tensor) -> Tensor:
    """``logprobs = probs.log()``: d/dx log x = 1/x. Example: ``dprobs = backward_logprobs(dlogprobs, probs)``."""
    return dlogprobs / probs


def backward_probs(dprobs: Tensor, counts: Tensor, counts_sum_inv: Tensor) -> dict[str, Tensor]:
    """``probs = counts * counts_sum_inv``; counts_sum_inv (n, 1) is broadcast, so its gradient sums over dim 1.

    Example: ``backward_probs(dprobs, counts, counts_sum_inv)["counts_sum_inv"]``.
    """
    return {"counts": counts_sum_inv * dprobs, "counts_sum_inv": (counts * dprobs).sum(1, keepdim=True)}


def backward_counts_sum_inv(dcounts_sum_inv: Tensor, counts_sum: Tensor) -> Tensor:
    """``counts_sum_inv = counts_sum**-1``: -x**-2. Example: ``backward_counts_sum_inv(d, counts_sum)``."""
    return -counts_sum ** -2 * dcounts_sum_inv


def backward_counts_sum(dcounts_sum: Tensor, counts: Tensor) -> Tensor:
    """``counts_sum = counts.sum(1, keepdims=True)``: broadcast the (n, 1) gradient back over each row.

    Example: ``dcounts_part = backward_counts_sum(dcounts_sum, counts)``.
    """
    return torch.ones_like(counts) * dcounts_sum


def backward_counts(dcounts: Tensor, counts: Tensor) -> Tensor:
    """``counts = norm_logits.exp()``: the derivative of exp is its output. Example: ``backward_counts(dcounts, counts)``."""
    return counts * dcounts


def backward_norm_logits(dnorm_logits: Tensor) -> dict[str, Tensor]:
    """``norm_logits = logits - logit_maxes``; logit_maxes (n, 1) is broadcast: sum over dim 1, negated.

    Example: ``backward_norm_logits(dnorm_logits)["logit_maxes"]``.
    """
    return {"logits": dnorm_logits.clone(), "logit_maxes": -dnorm_logits.sum(1, keepdim=True)}


def backward_logit_maxes(dlogit_maxes: Tensor, logits: Tensor) -> Tensor:
    """``logit_maxes = logits.max(1, keepdim=True).values``: route each row's gradient to its argmax.

    Example: ``dlogits_part = backward_logit_maxes(dlogit_maxes, logits)``.
    """
    return F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]).to(logits.dtype) * dlogit_maxes


def backward_logits(dlogits: Tensor, h: Tensor, W2: Tensor) -> dict[str, Tensor]:
    """``logits = h @ W2 + b2``: matmul gradients, and b2 (broadcast over rows) sums over dim 0.

    Example: ``backward_logits(dlogits, h, W2)["W2"]``.
    """
    return {"h": dlogits @ W2.T, "W2": h.T @ dlogits, "b2": dlogits.sum(0)}


def backward_h(dh: Tensor, h: Tensor) -> Tensor:
    """``h = torch.tanh(hpreact)``: 1 - tanh**2, written with the output. Example: ``backward_h(dh, h)``."""
    return (1.0 - h ** 2) * dh


def backward_hpreact(dhpreact: Tensor, bngain: Tensor, bnraw: Tensor) -> dict[str, Tensor]:
    """``hpreact = bngain * bnraw + bnbias``; bngain and bnbias are (1, n_hidden): sum over dim 0.

    Example: ``backward_hpreact(dhpreact, bngain, bnraw)["bngain"]``.
    """
    return {"bngain": (bnraw * dhpreact).sum(0, keepdim=True), "bnraw": bngain * dhpreact,
            "bnbias": dhpreact.sum(0, keepdim=True)}


def backward_bnraw(dbnraw: Tensor, bndiff: Tensor, bnvar_inv: Tensor) -> dict[str, Tensor]:
    """``bnraw = bndiff * bnvar_inv``; bnvar_inv (1, n_hidden) is broadcast: sum over dim 0.

    Example: ``backward_bnraw(dbnraw, bndiff, bnvar_inv)["bnvar_inv"]``.
    """
    return {"bndiff": bnvar_inv * dbnraw, "bnvar_inv": (bndiff * dbnraw).sum(0, keepdim=True)}


def backward_bnvar_inv(dbnvar_inv: Tensor, bnvar: Tensor) -> Tensor:
    """``bnvar_inv = (bnvar + 1e-5)**-0.5``: -0.5 (x + eps)**-1.5. Example: ``backward_bnvar_inv(d, bnvar)``."""
    return -0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv


def backward_bnvar(dbnvar: Tensor, bndiff2: Tensor, n: int) -> Tensor:
    """``bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)``: Bessel's 1/(n-1), broadcast over rows.

    Example: ``dbndiff2 = backward_bnvar(dbnvar, bndiff2, 32)``.
    """
    return 1.0 / (n - 1) * torch.ones_like(bndiff2) * dbnvar


def backward_bndiff2(dbndiff2: Tensor, bndiff: Tensor) -> Tensor:
    """``bndiff2 = bndiff**2``: 2x. Example: ``dbndiff_part = backward_bndiff2(dbndiff2, bndiff)``."""
    return 2 * bndiff * dbndiff2


def backward_bndiff(dbndiff: Tensor) -> dict[str, Tensor]:
    """``bndiff = hprebn - bnmeani``; bnmeani (1, n_hidden) is broadcast: sum over dim 0, negated.

    Example: ``backward_bndiff(dbndiff)["bnmeani"]``.
    """
    return {"hprebn": dbndiff.clone(), "bnmeani": -dbndiff.sum(0, keepdim=True)}


def backward_bnmeani(dbnmeani: Tensor, hprebn: Tensor, n: int) -> Tensor:
    """``bnmeani = 1/n*hprebn.sum(0, keepdim=True)``: 1/n, broadcast over rows.

    Example: ``dhprebn_part = backward_bnmeani(dbnmeani, hprebn, 32)``.
    """
    return 1.0 / n * torch.ones_like(hprebn) * dbnmeani


def backward_hprebn(dhprebn: Tensor, embcat: Tensor, W1: Tensor) -> dict[str, Tensor]:
    """``hprebn = embcat @ W1 + b1``: matmul gradients, b1 (n_hidden,) sums over dim 0.

    Example: ``backward_hprebn(dhprebn, embcat, W1)["W1"]``.
    """
    return {"embcat": dhprebn @ W1.T, "W1": embcat.T @ dhprebn, "b1": dhprebn.sum(0)}


def backward_embcat(dembcat: Tensor, emb: Tensor) -> Tensor:
    """``embcat = emb.view(emb.shape[0], -1)``: view the gradient back. Example: ``backward_embcat(dembcat, emb)``."""
    return dembcat.view(emb.shape)


def backward_emb(demb: Tensor, C: Tensor, Xb: Tensor) -> Tensor:
    """``emb = C[Xb]``: scatter-add each row of demb into the row of C it was read from.

    Example: ``dC = backward_emb(demb, C, Xb)``.
    """
    dC = torch.zeros_like(C)
    dC.index_add_(0, Xb.reshape(-1), demb.reshape(-1, C.shape[1]))
    return dC
