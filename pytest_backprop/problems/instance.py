"""One instance of the exercise: data, parameters, batch, forward values and the true gradients.

The same object backs the ``makemore_forward`` fixture and the built-in checks of ``--backprop``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from reference_model.data import Words, build_splits, load_words
from reference_model.model import (
    GRADIENT_ORDER,
    Config,
    Truth,
    autograd_truth,
    lecture_params_and_batch,
)

from .tolerance import Reference, Tolerance, attach, derive


@dataclass
class Problem:
    """Forward values and true gradients of the lecture's network on one batch.

    Example::

        p = build_problem(load_words(), Config())
        p["counts"]              # forward value; p["counts"].grad is the true dcounts
        p.grads["counts"]        # the true dcounts (float32 autograd, the lecture's t.grad)
        p.tolerances["b1"].atol  # the rule's tolerance for db1
    """

    config: Config
    dtype: torch.dtype
    words: Words | None
    params: dict[str, torch.Tensor]
    Xb: torch.Tensor
    Yb: torch.Tensor
    truth: Truth  # autograd in ``dtype``: the lecture's ``t.grad``
    truth64: Truth  # autograd in float64: what the tolerance rule compares with
    tolerances: dict[str, Tolerance]

    @property
    def n(self) -> int:
        return int(self.Xb.shape[0])

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        """The true gradients in the run's dtype, each carrying its float64 truth and tolerance."""
        return self.truth.grads

    @property
    def loss(self) -> float:
        return self.truth.loss

    def __getitem__(self, name: str) -> Any:
        """A forward value by name; tensors that get a gradient hold the truth in ``.grad``."""
        return self.truth.values[name]

    def cache(self) -> dict[str, Any]:
        """Fresh copies of every forward value, parameter and constant, for user code to use."""
        out: dict[str, Any] = {}
        for key, value in self.truth.values.items():
            out[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return out

    def globals(self) -> dict[str, Any]:
        """The lecture's other globals a student's code may refer to."""
        c = self.config
        return {"vocab_size": c.vocab_size, "n_embd": c.n_embd, "n_hidden": c.n_hidden,
                "block_size": c.block_size, "batch_size": self.n}


def problem_from_batch(config: Config, params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, *,
                       dtype: torch.dtype = torch.float32, words: Words | None = None) -> Problem:
    """Compute the truths and tolerances for given parameters and batch, at any sizes.

    In float64 each tolerance is widened to the float64 noise floor (:mod:`pytest_backprop.problems.noise`),
    so that a correct float64 answer never fails where the true gradient is a cancellation.
    """
    truth32 = autograd_truth(params, Xb, Yb, dtype=torch.float32) if dtype != torch.float32 else None
    truth = autograd_truth(params, Xb, Yb, dtype=dtype)
    truth64 = autograd_truth(params, Xb, Yb, dtype=torch.float64) if dtype != torch.float64 else truth
    reference32 = truth32 or truth
    floor = None
    if dtype == torch.float64:
        from .noise import FLOAT64_SLACK, noise_floor

        floor = noise_floor(truth64.values, truth64.grads)
    tolerances: dict[str, Tolerance] = {}
    for name in GRADIENT_ORDER:
        tol = derive(reference32.grads[name], truth64.grads[name], dtype)
        if floor is not None:
            tol = Tolerance(atol=max(tol.atol * FLOAT64_SLACK, floor[name]), rtol=tol.rtol,
                            origin=f"rule x{FLOAT64_SLACK} or float64 noise floor")
        tolerances[name] = tol
        attach(truth.grads[name], Reference(truth64.grads[name], tol))
        value = truth.values[name]
        value.grad = truth.grads[name]
    p = {k: v.detach().to(dtype) for k, v in params.items()}
    return Problem(config, dtype, words, p, Xb, Yb, truth, truth64, tolerances)


def build_problem(words: Words, config: Config = Config(), *, dtype: torch.dtype = torch.float32,
                  block_seed: int = 42) -> Problem:
    """The lecture's setting: dataset from ``words``, parameters then batch from the seeded generator."""
    dataset = build_splits(words, config.block_size, seed=block_seed)
    config = config.with_(vocab_size=dataset.vocab_size)
    params, Xb, Yb = lecture_params_and_batch(dataset.Xtr, dataset.Ytr, config)
    return problem_from_batch(config, params, Xb, Yb, dtype=dtype, words=words)


def resolve_words(names: str | None) -> Words:
    """Words from a names file, or the embedded census names when ``names`` is None."""
    return load_words(names) if names else load_words(None)
