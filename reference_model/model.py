"""The lecture's MLP: configuration, parameters, batch, and the forward pass as a table of lines.

The expanded forward pass is defined once, in :data:`LINES`: every other view of it (the reference
forward, the autograd truth, the consumer graph used for blame, per-line checks, the order of the
report table) is derived from that table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from types import CodeType
from typing import Iterable, Mapping

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


@dataclass(frozen=True)
class Line:
    """One line of the expanded forward pass: ``output = <source right-hand side>``."""

    output: str
    source: str
    inputs: tuple[str, ...]  # differentiable tensors the line reads, in order of appearance
    constants: tuple[str, ...] = ()  # non-differentiable names it reads (n, Xb, Yb)


LINES: tuple[Line, ...] = (
    Line("emb", "emb = C[Xb]", ("C",), ("Xb",)),
    Line("embcat", "embcat = emb.view(emb.shape[0], -1)", ("emb",)),
    Line("hprebn", "hprebn = embcat @ W1 + b1", ("embcat", "W1", "b1")),
    Line("bnmeani", "bnmeani = 1/n*hprebn.sum(0, keepdim=True)", ("hprebn",), ("n",)),
    Line("bndiff", "bndiff = hprebn - bnmeani", ("hprebn", "bnmeani")),
    Line("bndiff2", "bndiff2 = bndiff**2", ("bndiff",)),
    Line("bnvar", "bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)", ("bndiff2",), ("n",)),
    Line("bnvar_inv", "bnvar_inv = (bnvar + 1e-5)**-0.5", ("bnvar",)),
    Line("bnraw", "bnraw = bndiff * bnvar_inv", ("bndiff", "bnvar_inv")),
    Line("hpreact", "hpreact = bngain * bnraw + bnbias", ("bngain", "bnraw", "bnbias")),
    Line("h", "h = torch.tanh(hpreact)", ("hpreact",)),
    Line("logits", "logits = h @ W2 + b2", ("h", "W2", "b2")),
    Line("logit_maxes", "logit_maxes = logits.max(1, keepdim=True).values", ("logits",)),
    Line("norm_logits", "norm_logits = logits - logit_maxes", ("logits", "logit_maxes")),
    Line("counts", "counts = norm_logits.exp()", ("norm_logits",)),
    Line("counts_sum", "counts_sum = counts.sum(1, keepdims=True)", ("counts",)),
    Line("counts_sum_inv", "counts_sum_inv = counts_sum**-1", ("counts_sum",)),
    Line("probs", "probs = counts * counts_sum_inv", ("counts", "counts_sum_inv")),
    Line("logprobs", "logprobs = probs.log()", ("probs",)),
    Line("loss", "loss = -logprobs[range(n), Yb].mean()", ("logprobs",), ("n", "Yb")),
)

PARAMETERS: tuple[str, ...] = ("C", "W1", "b1", "bngain", "bnbias", "W2", "b2")
CONSTANTS: tuple[str, ...] = ("n", "Xb", "Yb")

#: The 26 tensors that get a gradient, in the lecture's checking order (backward order).
GRADIENT_ORDER: tuple[str, ...] = (
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
    "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
    "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
)

LINE_OF: dict[str, Line] = {line.output: line for line in LINES}


def consumers(tensor: str) -> tuple[Line, ...]:
    """The lines that read ``tensor``; its gradient is the sum of their contributions.

    Example::

        [l.output for l in consumers("counts")]   # ['counts_sum', 'probs']
    """
    return tuple(line for line in LINES if tensor in line.inputs)


def producer(tensor: str) -> Line | None:
    """The line that computes ``tensor``, or None for a parameter."""
    return LINE_OF.get(tensor)


@lru_cache(maxsize=None)
def _compiled(source: str) -> CodeType:
    return compile(source, f"<forward: {source}>", "exec")


def run_line(line: Line, namespace: dict) -> torch.Tensor:
    """Execute one line's exact source text in ``namespace`` and return its output."""
    exec(_compiled(line.source), {"torch": torch, "F": F}, namespace)
    return namespace[line.output]


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
    V, E, H, B = config.vocab_size, config.n_embd, config.n_hidden, config.block_size
    params = {
        "C": torch.randn((V, E), generator=g),
        "W1": torch.randn((E * B, H), generator=g) * (5 / 3) / ((E * B) ** 0.5),
        "b1": torch.randn(H, generator=g) * 0.1,
        "W2": torch.randn((H, V), generator=g) * 0.1,
        "b2": torch.randn(V, generator=g) * 0.1,
        "bngain": torch.randn((1, H), generator=g) * 0.1 + 1.0,
        "bnbias": torch.randn((1, H), generator=g) * 0.1,
    }
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
    ix = torch.randint(0, Xtr.shape[0], (config.batch_size,), generator=g)
    return params, Xtr[ix], Ytr[ix]


def params_only(config: Config = Config(), *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """:func:`init_params` without the generator entry."""
    params = init_params(config, dtype=dtype)
    params.pop("_generator")
    return params


def forward_expanded(params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the 20 lines of :data:`LINES` and return every tensor by name (``loss`` included).

    Tensors keep whatever autograd history ``params`` gives them.
    """
    namespace: dict = dict(params)
    namespace.update(n=Xb.shape[0], Xb=Xb, Yb=Yb)
    for line in LINES:
        run_line(line, namespace)
    return namespace


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


@dataclass(frozen=True)
class Truth:
    """The forward tensors (detached) and autograd's gradients of all 26 of them, in one dtype."""

    dtype: torch.dtype
    values: dict[str, torch.Tensor]  # every line output and parameter, detached; plus n, Xb, Yb
    grads: dict[str, torch.Tensor]   # the 26 gradients, keyed by tensor name
    loss: float = field(default=float("nan"))


def autograd_truth(
    params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> Truth:
    """Autograd's gradients of the 26 tensors: ``retain_grad`` on every line, then ``loss.backward()``.

    Example::

        t = autograd_truth(params, Xb, Yb)
        t.grads["counts_sum_inv"].shape   # torch.Size([32, 1])
    """
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        tensors = forward_expanded(leaves, Xb, Yb)
        for name in GRADIENT_ORDER:
            if name not in leaves:
                tensors[name].retain_grad()
        tensors["loss"].backward()
    grads = {name: tensors[name].grad.detach() for name in GRADIENT_ORDER}
    values = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
    return Truth(dtype, values, grads, float(tensors["loss"].detach()))


def parameter_count(params: Mapping[str, torch.Tensor]) -> int:
    """Number of scalars in the parameters (4137 for the lecture's network)."""
    return sum(p.numel() for k, p in params.items() if k in PARAMETERS)


def gradient_names() -> Iterable[str]:
    """The 26 gradient names in backward order (same as :data:`GRADIENT_ORDER`)."""
    return iter(GRADIENT_ORDER)


def line_vjp(line: Line, values: Mapping[str, torch.Tensor], upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autograd's vector-Jacobian product of one line: the contribution of ``upstream`` (the gradient
    of ``line.output``) to the gradient of each of the line's inputs.

    ``values`` holds the line's inputs and constants (n, Xb, Yb). Used for per-line checks, for
    ``missing_branch`` hints and for chaining per-line answers.

    Example::

        vjp = line_vjp(LINE_OF["probs"], values, dprobs)
        vjp["counts"], vjp["counts_sum_inv"]   # counts_sum_inv * dprobs, (counts * dprobs).sum(1, keepdim=True)
    """
    namespace: dict = {k: values[k] for k in line.constants}
    leaves = {k: values[k].detach().clone().requires_grad_(True) for k in line.inputs}
    namespace.update(leaves)
    with torch.enable_grad():
        out = run_line(line, namespace)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=upstream.to(out.dtype), allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(leaves[k])).detach() for k, g in zip(leaves, grads)}
