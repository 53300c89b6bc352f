"""Recognising the lecture's own forward in a notebook, so that ``cmp`` can use the measured rule.

After the lecture's forward and ``loss.backward()``, a notebook holds the parameters and the
batch (``C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb`` and ``n``). From exactly those values the kit
rebuilds its float64 truth (:func:`~pytest_backprop.problems.instance.problem_from_batch`, cached
per set of values) and checks it is the same forward: the kit's forward value of the tensor equals
the notebook's, and the notebook's ``t.grad`` passes the kit's rule against the kit's truth. Only
then is the kit's truth (with its measured tolerance) used; otherwise nothing is claimed and
``cmp`` falls back to ``torch.testing.assert_close``'s defaults.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Mapping

import torch

from reference_model.model import Config

from ..problems.instance import Problem, problem_from_batch
from ..problems.lecture import GRADIENT_ORDER, PARAMETERS
from .compare import compare

#: How many rebuilt problems are kept (a notebook re-runs its forward with new values now and then).
CACHE_SIZE = 4
_CACHE: OrderedDict[bytes, Problem | None] = OrderedDict()


def _tensor(value: Any, *, floating: bool) -> torch.Tensor | None:
    if not isinstance(value, torch.Tensor) or value.is_floating_point() != floating:
        return None
    return value.detach()


def _batch(namespace: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """The parameters, Xb and Yb of the lecture's network in ``namespace``, when they are all there and fit."""
    params = {k: _tensor(namespace.get(k), floating=True) for k in PARAMETERS}
    Xb, Yb, n = _tensor(namespace.get("Xb"), floating=False), _tensor(namespace.get("Yb"), floating=False), namespace.get("n")
    if any(p is None for p in params.values()) or Xb is None or Yb is None or not isinstance(n, int):
        return None
    C, W1, W2 = params["C"], params["W1"], params["W2"]
    if Xb.dim() != 2 or Yb.shape != (n,) or Xb.shape[0] != n or n < 2 or C.dim() != 2 or W1.dim() != 2:
        return None
    if W1.shape[0] != C.shape[1] * Xb.shape[1] or W2.dim() != 2 or W2.shape != (W1.shape[1], C.shape[0]):
        return None
    if len({p.dtype for p in params.values()}) != 1:
        return None
    return params, Xb, Yb  # type: ignore[return-value]


def _key(params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for name, t in (*sorted(params.items()), ("Xb", Xb), ("Yb", Yb)):
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.contiguous().cpu().numpy().tobytes())
    return digest.digest()


def lecture_problem(namespace: Mapping[str, Any]) -> Problem | None:
    """The kit's problem for the lecture's parameters and batch found in ``namespace``, or None.

    Example::

        p = lecture_problem(globals())   # in the notebook, after the forward pass
        p.tolerances["b1"].atol          # ~6e-8
    """
    found = _batch(namespace)
    if found is None:
        return None
    params, Xb, Yb = found
    key = _key(params, Xb, Yb)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    C, W1 = params["C"], params["W1"]
    config = Config(vocab_size=C.shape[0], n_embd=C.shape[1], n_hidden=W1.shape[1], block_size=Xb.shape[1],
                    batch_size=Xb.shape[0])
    try:
        problem: Problem | None = problem_from_batch(config, params, Xb, Yb, dtype=C.dtype)
    except Exception:  # noqa: BLE001 -- values that only look like the lecture's: claim nothing
        problem = None
    _CACHE[key] = problem
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return problem


def lecture_truth(name: str, t: Any, namespace: Mapping[str, Any]) -> torch.Tensor | None:
    """The kit's true gradient of ``name`` (carrying its float64 truth and measured tolerance), when
    ``t`` is that tensor of the lecture's forward run on the values in ``namespace``; else None.

    ``t`` is the forward tensor holding ``.grad`` (the lecture's ``cmp('b1', db1, b1)``) or the true
    gradient itself. Same forward means: the kit's forward value equals ``t`` (within float32
    noise) and ``t.grad`` passes the kit's rule against the kit's truth.

    Example::

        truth = lecture_truth("b1", b1, globals())
        compare(db1, truth).tolerance.origin   # 'measured rule'
    """
    if name not in GRADIENT_ORDER or not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    problem = lecture_problem(namespace)
    if problem is None:
        return None
    kit_value, kit_grad = problem[name], problem.grads[name]
    grad = t.grad if (t.is_leaf or t.retains_grad) else None
    if grad is not None:
        value = t.detach()
        if value.shape != kit_value.shape or value.dtype != kit_value.dtype:
            return None
        scale = float(kit_value.abs().max()) if kit_value.numel() else 0.0
        if float((value.double() - kit_value.double()).abs().max()) > 1e-5 * (1.0 + scale):
            return None
    elif t.requires_grad:
        return None
    else:
        grad = t
    if grad.shape != kit_grad.shape or not compare(grad, kit_grad).approximate:
        return None
    return kit_grad
