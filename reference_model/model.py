"""The lecture's MLP: configuration, parameters, batch, and the forward pass written once.

This module is itself the lecture's *problem* (what ``--backprop-problem`` names by default): it
defines ``SIZES``, ``make_inputs``, ``forward`` (the 20 lines of the expanded forward pass, one
assignment per line), ``SIZE_RANGES``, ``NAME`` and ``ORDER`` (the lecture's checking order). The
kit (:mod:`pytest_backprop.problems`) derives everything else from ``forward``'s source: the line
table, the autograd truth, the consumer graph used for blame, the per-line checks, the report's
order. It imports nothing from the kit; the derived names it used to spell out by hand
(``LINES``, ``LINE_OF``, ``GRADIENT_ORDER``, ``PARAMETERS``, ``CONSTANTS``, ``consumers``,
``producer``, ``run_line``, ``line_vjp``, ``forward_expanded``, ``autograd_truth``, ``Truth``,
``Line``) live in :mod:`pytest_backprop.problems.lecture`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F

LECTURE_SEED = 2147483647


@dataclass(frozen=True)
class Config:
    """Sizes and seed of the MLP. The defaults are the lecture's Exercise 1-3 network.

    Example::

        Config()                 # vocab 27, n_embd 10, n_hidden 64, block 3, batch 32
        Config(n_hidden=200)     # Exercise 4
    """

    vocab_size: int = 27
    n_embd: int = 10
    n_hidden: int = 64
    block_size: int = 3
    batch_size: int = 32
    seed: int = LECTURE_SEED

    def with_(self, **changes) -> "Config":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def sizes(self) -> dict[str, int]:
        """The problem's named sizes (:data:`SIZES`' keys) of this configuration."""
        return {name: getattr(self, name) for name in SIZES}


# --- the lecture as a problem ------------------------------------------------------------------

NAME = "makemore MLP (the lecture)"

#: Named sizes and their defaults: the fields of :class:`Config` (the seed is the run's).
SIZES: dict[str, int] = {"batch_size": 32, "vocab_size": 27, "n_embd": 10, "n_hidden": 64, "block_size": 3}

#: What the property checks may draw: batch >= 2 (Bessel's n-1), vocabulary >= 2.
SIZE_RANGES: dict[str, tuple[int, int]] = {"batch_size": (2, 64), "vocab_size": (2, 54), "n_embd": (1, 20),
                                           "n_hidden": (1, 128), "block_size": (1, 6)}

#: The 26 tensors that get a gradient, in the lecture's checking order. The kit's default order
#: (:func:`pytest_backprop.problems.table.backward_order`) differs only in listing bnraw before bnbias.
ORDER: tuple[str, ...] = (
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
    "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
    "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
)


def forward(C, W1, b1, bngain, bnbias, W2, b2, n, Xb, Yb):
    """The lecture's expanded forward pass: 20 lines, 26 tensors get a gradient."""
    emb = C[Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    bnmeani = 1/n*hprebn.sum(0, keepdim=True)
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)  # Bessel's correction
    bnvar_inv = (bnvar + 1e-5)**-0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdims=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    loss = -logprobs[range(n), Yb].mean()
    return loss


def make_inputs(sizes: Mapping[str, int], generator: torch.Generator, *, dataset: Any = None) -> dict[str, Any]:
    """The parameters, then the batch, from ``generator``, as the lecture draws them.

    With ``dataset`` (a :class:`reference_model.data.Dataset`: ``Xtr``, ``Ytr``) the batch is the
    lecture's ``ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)``; without one the
    contexts and targets are drawn uniformly from the vocabulary (any sizes, as the property checks
    need).

    Example::

        inputs = make_inputs(SIZES, torch.Generator().manual_seed(LECTURE_SEED), dataset=ds)
        loss = forward(**inputs)
    """
    config = Config(**{name: sizes[name] for name in SIZES})
    params = _draw_params(config, generator)
    n = config.batch_size
    if dataset is None:
        Xb = torch.randint(0, config.vocab_size, (n, config.block_size), generator=generator)
        Yb = torch.randint(0, config.vocab_size, (n,), generator=generator)
    else:
        if dataset.Xtr.shape[1] != config.block_size or getattr(dataset, "vocab_size", config.vocab_size) != config.vocab_size:
            raise ValueError(f"the dataset has block_size {dataset.Xtr.shape[1]} and vocab_size "
                             f"{getattr(dataset, 'vocab_size', '?')}, the sizes ask for {config.block_size} and "
                             f"{config.vocab_size}")
        Xb, Yb = _draw_batch(dataset.Xtr, dataset.Ytr, n, generator)
    return {**params, "n": n, "Xb": Xb, "Yb": Yb}


def _draw_params(config: Config, g: torch.Generator) -> dict[str, torch.Tensor]:
    V, E, H, B = config.vocab_size, config.n_embd, config.n_hidden, config.block_size
    return {
        "C": torch.randn((V, E), generator=g),
        "W1": torch.randn((E * B, H), generator=g) * (5 / 3) / ((E * B) ** 0.5),
        "b1": torch.randn(H, generator=g) * 0.1,
        "W2": torch.randn((H, V), generator=g) * 0.1,
        "b2": torch.randn(V, generator=g) * 0.1,
        "bngain": torch.randn((1, H), generator=g) * 0.1 + 1.0,
        "bnbias": torch.randn((1, H), generator=g) * 0.1,
    }


def _draw_batch(Xtr: torch.Tensor, Ytr: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(0, Xtr.shape[0], (n,), generator=g)
    return Xtr[ix], Ytr[ix]


def init_params(config: Config = Config(), *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The lecture's initialisation, every parameter from the seeded generator.

    Deviation from the lecture: ``bngain`` and ``bnbias`` are drawn from the same seeded generator
    ``g`` (the lecture draws them from the unseeded global one, so its loss of 3.3377 cannot be
    reproduced); the kit's numbers are reproducible. Values are drawn in float32 and then cast, so
    float32 and float64 runs see the same network.

    Example::

        p = init_params()
        sum(t.numel() for t in p.values())   # 4137
    """
    g = torch.Generator().manual_seed(config.seed)
    params: dict[str, Any] = _draw_params(config, g)
    params["_generator"] = g  # type: ignore[assignment]  # popped by callers that sample a batch
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


def lecture_params_and_batch(
    Xtr: torch.Tensor, Ytr: torch.Tensor, config: Config = Config(), *, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Parameters, then the batch drawn from the same generator, as in the lecture.

    Example::

        params, Xb, Yb = lecture_params_and_batch(ds.Xtr, ds.Ytr)
    """
    params = init_params(config, dtype=dtype)
    g = params.pop("_generator")
    Xb, Yb = _draw_batch(Xtr, Ytr, config.batch_size, g)
    return params, Xb, Yb


def params_only(config: Config = Config(), *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """:func:`init_params` without the generator entry."""
    params = init_params(config, dtype=dtype)
    params.pop("_generator")
    return params


def forward_fused(params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fused forward of Exercises 2-4: one-expression batchnorm and ``F.cross_entropy``.

    Returns the tensors the fused backward needs: emb, embcat, hprebn, bnvar_inv, bnraw, hpreact,
    h, logits and loss.
    """
    C, W1, b1, W2, b2, bngain, bnbias = (params[k] for k in ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias"))
    emb = C[Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    bnmean = hprebn.mean(0, keepdim=True)
    bnvar = hprebn.var(0, keepdim=True, unbiased=True)
    bnvar_inv = (bnvar + 1e-5) ** -0.5
    bnraw = (hprebn - bnmean) * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    loss = F.cross_entropy(logits, Yb)
    return {"emb": emb, "embcat": embcat, "hprebn": hprebn, "bnmean": bnmean, "bnvar": bnvar,
            "bnvar_inv": bnvar_inv, "bnraw": bnraw, "hpreact": hpreact, "h": h, "logits": logits,
            "loss": loss, "n": Xb.shape[0], "Xb": Xb, "Yb": Yb}


def parameter_count(params: Mapping[str, torch.Tensor]) -> int:
    """Number of scalars in the parameters (4137 for the lecture's network): every float tensor given."""
    return sum(p.numel() for p in params.values() if isinstance(p, torch.Tensor) and p.is_floating_point())

