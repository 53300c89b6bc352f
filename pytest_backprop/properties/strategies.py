"""Public hypothesis strategies for the lecture's network: sizes, parameters, batches, tensors.

Every strategy shrinks towards small, readable cases (batch size 2, vocabulary 2, one hidden
unit, ...). Shapes of free-form tensors come from :mod:`hypothesis.extra.numpy`
(``array_shapes``, ``broadcastable_shapes``); nothing here generates shapes by hand.

Example::

    from hypothesis import given
    from pytest_backprop.strategies import makemore_cases
    from pytest_backprop.problems import problem_from_batch

    @given(makemore_cases())
    def test_my_backward(case):
        p = problem_from_batch(case.config, case.params, case.Xb, case.Yb, dtype=torch.float64)
        grads = my_backward(p.cache())
        assert_grad_matches(grads["logits"], p.grads["logits"], name="logits")
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import torch
from hypothesis import assume

from reference_model.model import Config, params_only

__all__ = [
    "Case", "KINKS", "LARGE_BY_WIDTH", "LECTURE_PATTERN", "MIXED", "REGIMES", "TINY_BY_WIDTH", "apply_pattern", "batches", "describe_pattern", "elements",
    "makemore_cases", "makemore_configs", "makemore_params", "param_patterns", "params_from_seed", "shapes",
    "tensors",
]

#: Value regimes for :func:`elements` / :func:`tensors`, as ``(low, high)`` bounds of ``|x|`` (both signs).
#: For any function: ``small`` |x| <= 1; ``moderate`` |x| <= 10; ``large`` 10 <= |x| <= 1000, where ``exp``
#: overflows (float64 beyond ~709; float32 and float16 use :data:`LARGE_BY_WIDTH`); ``tiny``
#: 1e-30 <= |x| <= 1e-6 (underflow, division by a tiny value); ``kink`` at most 1e-6 from a corner in
#: :data:`KINKS` (ReLU/abs at 0, clamp at +-1), exact corners included (ties too). The lecture's logits,
#: used by its property checks: ``lecture`` |x| <= 5; ``large_logits`` |x| <= 80; ``saturated``
#: 5 <= |x| <= 30 (tanh is +-1); ``extreme`` 200 <= |x| <= 1000.
REGIMES: dict[str, tuple[float, float]] = {
    "small": (0.0, 1.0),
    "moderate": (0.0, 10.0),
    "large": (10.0, 1000.0),
    "tiny": (1e-30, 1e-6),
    "kink": (0.0, 1e-6),
    "lecture": (0.0, 5.0),
    "large_logits": (0.0, 80.0),
    "saturated": (5.0, 30.0),
    "extreme": (200.0, 1000.0),
}
#: ``large`` and ``tiny`` for narrower floats: beyond exp's overflow (88.7 for float32, 11.1 for float16).
LARGE_BY_WIDTH: dict[int, tuple[float, float]] = {64: (10.0, 1000.0), 32: (10.0, 100.0), 16: (4.0, 12.0)}
TINY_BY_WIDTH: dict[int, tuple[float, float]] = {64: (1e-30, 1e-6), 32: (1e-30, 1e-6), 16: (1e-4, 1e-2)}
#: The corners of the ``kink`` regime.
KINKS: tuple[float, ...] = (0.0, 1.0, -1.0)
#: The regimes of ``mixed``, the default: each element from one of them (``tiny`` is left out: finite
#: differences cannot resolve it; ask for it by name).
MIXED: tuple[str, ...] = ("small", "moderate", "large", "kink")

#: The lecture's broadcasting pattern: b1 (H,), b2 (V,), bngain and bnbias (1, H).
LECTURE_PATTERN: dict[str, str] = {"b1": "flat", "b2": "flat", "bngain": "row", "bnbias": "row"}
_PATTERN_CHOICES = {"b1": ("flat", "row"), "b2": ("flat", "row"), "bngain": ("row", "flat"), "bnbias": ("row", "flat")}
_SIZE_OF = {"b1": "H", "b2": "V", "bngain": "H", "bnbias": "H"}


@functools.lru_cache(maxsize=512)  # strategies are immutable: reuse them (hypothesis caches per object)
def makemore_configs(*, max_batch: int = 8, max_vocab: int = 8, max_embd: int = 4, max_hidden: int = 8,
                     max_block: int = 4) -> st.SearchStrategy[Config]:
    """Sizes of the network: batch n >= 2 (Bessel's n-1), vocab >= 2, n_embd, n_hidden, block_size >= 1.

    Shrinks towards the smallest network (n=2, vocab 2, one unit everywhere). The upper bounds keep
    each example cheap; raise them to search wider.

    Example::

        @given(makemore_configs(max_batch=4))
        def test_sizes(config):
            assert 2 <= config.batch_size <= 4
    """
    return st.builds(
        Config,
        batch_size=st.integers(2, max(2, max_batch)),
        vocab_size=st.integers(2, max(2, max_vocab)),
        n_embd=st.integers(1, max(1, max_embd)),
        n_hidden=st.integers(1, max(1, max_hidden)),
        block_size=st.integers(1, max(1, max_block)),
        seed=st.just(Config().seed),
    )


def _representable(value: float, width: int) -> float:
    """``value`` rounded to the nearest float of ``width`` bits (hypothesis wants exact bounds)."""
    return float(np.array(value, dtype=f"float{width}"))


@functools.lru_cache(maxsize=512)  # strategies are immutable: reuse them (building one costs more than a draw)
def elements(regime: str = "mixed", *, width: int = 64) -> st.SearchStrategy[float]:
    """Finite floats in one of the :data:`REGIMES` (both signs), or ``mixed`` (the default): each
    element from ``small``, ``moderate``, ``large`` or ``kink``, so one tensor holds values that
    overflow a naive ``exp`` next to values at a ReLU's corner. Shrinks towards ``small`` values.

    Example::

        tensors((4, 27), elements=elements("large"))      # |x| from 10 to 1000: exp overflows
        tensors((4, 27), elements=elements("kink"))       # 0, +-1 and within 1e-6 of them
    """
    if regime == "mixed":
        return st.one_of(*(elements(r, width=width) for r in MIXED))
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of mixed, {', '.join(REGIMES)}")
    kwargs: dict[str, Any] = dict(allow_nan=False, allow_infinity=False, width=width)
    if regime == "kink":
        bound = _representable(1e-6, width)
        offset = st.one_of(st.just(0.0), st.floats(-bound, bound, **kwargs))
        return st.builds(lambda c, d: _representable(c + d, width), st.sampled_from(KINKS), offset)
    low, high = {"large": LARGE_BY_WIDTH, "tiny": TINY_BY_WIDTH}.get(regime, {}).get(width, REGIMES[regime])
    low, high = _representable(low, width), _representable(high, width)
    positive = st.floats(low, high, **kwargs)
    if low == 0.0:
        return st.floats(-high, high, **kwargs)
    return st.one_of(positive, positive.map(lambda x: -x))


_regime = elements  # ``tensors`` has a parameter named ``elements``

_NUMPY_DTYPE = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
                torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


def shapes(*, min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 5) -> st.SearchStrategy[tuple[int, ...]]:
    """Array shapes (``hypothesis.extra.numpy.array_shapes`` with small defaults).

    Example::

        @given(tensors(shapes(min_dims=2, max_dims=4)))
        def test_any_rank(x): ...
    """
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


@functools.lru_cache(maxsize=1024)  # strategies are immutable: reuse them (building one costs more than a draw)
def tensors(shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]], *, dtype: torch.dtype = torch.float64,
            elements: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[torch.Tensor]:
    """Torch tensors of ``shape`` (a tuple or a shape strategy), built on ``hypothesis.extra.numpy.arrays``.

    Every element is drawn on its own (no constant fill), so values are not degenerate. The default
    elements are the ``mixed`` regime of :func:`elements` at the dtype's width (large values and
    kinks included); pass ``elements=elements("small")`` etc.

    Example::

        @given(tensors(hnp.array_shapes(min_dims=2), elements=elements("small")))
        def test_softmax_rows_sum_to_one(x): ...
    """
    np_dtype = _NUMPY_DTYPE.get(dtype)
    if np_dtype is None:
        raise ValueError(f"tensors(): unsupported dtype {dtype}")
    if elements is None:
        width = 32 if dtype == torch.float32 else 16 if dtype == torch.float16 else 64
        elements = _regime("mixed", width=width) if dtype.is_floating_point else st.integers(-5, 5)
    return hnp.arrays(np_dtype, shape, elements=elements, fill=st.nothing()).map(lambda a: torch.from_numpy(a.copy()))


@functools.lru_cache(maxsize=512)  # strategies are immutable: reuse them (hypothesis caches per object)
def batches(config: Config) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor]]:
    """A batch ``(Xb, Yb)`` for ``config``: (n, block_size) contexts and (n,) targets, valid token indices.

    Example::

        @given(st.data())
        def test_batch(data):
            Xb, Yb = data.draw(batches(Config(vocab_size=5, batch_size=3)))
            assert int(Xb.max()) < 5
    """
    n, block, vocab = config.batch_size, config.block_size, config.vocab_size
    tokens = st.integers(0, vocab - 1)
    Xb = hnp.arrays(np.int64, (n, block), elements=tokens, fill=st.nothing())
    Yb = hnp.arrays(np.int64, (n,), elements=tokens, fill=st.nothing())
    return st.tuples(Xb, Yb).map(lambda xy: (torch.from_numpy(xy[0].copy()), torch.from_numpy(xy[1].copy())))


@functools.lru_cache(maxsize=512)  # strategies are immutable: reuse them (hypothesis caches per object)
def param_patterns() -> st.SearchStrategy[dict[str, str]]:
    """Broadcasting patterns of the parameters: ``{"b1": "flat" | "row", "b2": ..., "bngain": ..., "bnbias": ...}``.

    ``flat`` is (H,) or (V,), ``row`` is (1, H) or (1, V); every pattern is still a correct forward
    pass (the same numbers, broadcast). Shrinks towards the lecture's pattern (:data:`LECTURE_PATTERN`),
    so a minimal failure changes only the parameter whose shape matters.

    Example::

        @given(param_patterns())
        def test_shapes(pattern):
            params = apply_pattern(params_only(Config()), pattern)
    """
    return st.fixed_dictionaries({name: st.sampled_from(choices) for name, choices in _PATTERN_CHOICES.items()})


def apply_pattern(params: Mapping[str, torch.Tensor], pattern: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Reshape b1, b2, bngain, bnbias to a pattern from :func:`param_patterns` (values unchanged)."""
    out = dict(params)
    for name, kind in pattern.items():
        out[name] = params[name].reshape(-1) if kind == "flat" else params[name].reshape(1, -1)
    return out


def describe_pattern(pattern: Mapping[str, str], *, only_changes: bool = True) -> str:
    """``b1 (1, H), bnbias (H,)``: the pattern's shapes (by default only where it differs from the lecture's)."""
    parts = []
    for name, kind in pattern.items():
        if only_changes and LECTURE_PATTERN.get(name) == kind:
            continue
        size = _SIZE_OF[name]
        parts.append(f"{name} ({size},)" if kind == "flat" else f"{name} (1, {size})")
    return ", ".join(parts) if parts else "the lecture's shapes"


def _scale_to_regime(params: dict[str, torch.Tensor], regime: str) -> dict[str, torch.Tensor]:
    p = dict(params)
    if regime == "small":
        for k in ("W1", "b1", "W2", "b2"):
            p[k] = p[k] * 0.1
    elif regime == "saturated":  # hpreact mostly beyond +-5: tanh' ~ 0
        p["bngain"] = p["bngain"] * 10.0
        p["bnbias"] = p["bnbias"] * 10.0
    elif regime == "large_logits":  # largest |logit| about 20: still finite softmax in float32
        p["W2"] = p["W2"] * 50.0
        p["b2"] = p["b2"] * 50.0
    elif regime != "lecture":
        raise ValueError(f"unknown parameter regime {regime!r}; choose lecture, small, saturated or large_logits")
    return p


@functools.lru_cache(maxsize=512)  # strategies are immutable: reuse them (hypothesis caches per object)
def makemore_params(config: Config, *, regime: str = "lecture",
                    dtype: torch.dtype = torch.float64) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Parameters for ``config``: the lecture's initialisation from a drawn seed, scaled to a regime.

    Values come from a seeded torch generator (the seed is what hypothesis draws), so they are never
    degenerate: no zero biases that hide a wrong gradient, no ties among logits.

    Example::

        @given(st.data())
        def test_params(data):
            p = data.draw(makemore_params(Config(n_hidden=3)))
            assert p["W1"].shape == (30, 3)
    """
    return st.integers(0, 2**31 - 1).map(lambda seed: params_from_seed(config, seed, regime=regime, dtype=dtype))


def params_from_seed(config: Config, seed: int, *, regime: str = "lecture",
                     dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The parameters :func:`makemore_params` draws for ``seed``: rebuild a reported case with it.

    Example::

        params = params_from_seed(Config(batch_size=2, vocab_size=2, n_embd=1, n_hidden=1, block_size=1), 7)
    """
    params = params_only(config.with_(seed=seed), dtype=torch.float32)
    return {k: v.to(dtype) for k, v in _scale_to_regime(params, regime).items()}


@dataclass(frozen=True)
class Case:
    """One generated instance of the exercise: sizes, parameters (in a broadcasting pattern), a batch."""

    config: Config
    params: dict[str, torch.Tensor] = field(repr=False)
    Xb: torch.Tensor = field(repr=False)
    Yb: torch.Tensor = field(repr=False)
    pattern: dict[str, str] = field(default_factory=lambda: dict(LECTURE_PATTERN))
    regime: str = "lecture"
    param_seed: int | None = None  # params_from_seed(config, param_seed, regime=regime), then the pattern

    def describe(self) -> str:
        """``n=2, vocab_size=2, n_embd=1, n_hidden=1, block_size=1`` plus pattern and regime when unusual."""
        c = self.config
        text = (f"n={c.batch_size}, vocab_size={c.vocab_size}, n_embd={c.n_embd}, n_hidden={c.n_hidden}, "
                f"block_size={c.block_size}")
        if self.pattern != LECTURE_PATTERN:
            text += f"; parameters {describe_pattern(self.pattern)}"
        if self.regime != "lecture":
            text += f"; {self.regime} values"
        return text

    def __repr__(self) -> str:
        seed = f"params from seed {self.param_seed}; " if self.param_seed is not None else ""
        return f"Case({self.describe()}; {seed}Xb={self.Xb.tolist()}, Yb={self.Yb.tolist()})"


def _max_logit_gap(params: Mapping[str, torch.Tensor], Xb: torch.Tensor) -> float:
    """Smallest gap between a row's largest and second-largest logit (inf with one column)."""
    from reference_model.model import forward_fused

    with torch.no_grad():
        logits = forward_fused({k: v.double() for k, v in params.items()}, Xb, torch.zeros(Xb.shape[0], dtype=torch.long))["logits"]
    if logits.shape[1] < 2:
        return float("inf")
    top = logits.topk(2, dim=1).values
    return float((top[:, 0] - top[:, 1]).min())


def makemore_cases(configs: st.SearchStrategy[Config] | None = None, *,
                   patterns: st.SearchStrategy[dict[str, str]] | None = None,
                   regimes: st.SearchStrategy[str] | None = None,
                   dtype: torch.dtype = torch.float64) -> st.SearchStrategy[Case]:
    """A whole :class:`Case`: a config, parameters for it, a batch; no ties among each row's max logit.

    ``patterns`` (e.g. :func:`param_patterns`) reshapes b1, b2, bngain, bnbias; ``regimes`` draws a
    parameter regime name (default: always ``lecture``). Ties in ``logits.max(1)`` are rejected: at a
    tie the max's gradient is not unique.

    Example::

        @given(makemore_cases(patterns=param_patterns()))
        def test_backward(case):
            p = problem_from_batch(case.config, case.params, case.Xb, case.Yb, dtype=torch.float64)
    """
    configs = configs if configs is not None else makemore_configs()
    patterns = patterns if patterns is not None else st.just(dict(LECTURE_PATTERN))
    regimes = regimes if regimes is not None else st.just("lecture")

    @st.composite
    def build(draw: Any) -> Case:
        config = draw(configs)
        regime = draw(regimes)
        seed = draw(st.integers(0, 2**31 - 1))
        params = params_from_seed(config, seed, regime=regime, dtype=dtype)
        Xb, Yb = draw(batches(config))
        pattern = draw(patterns)
        params = apply_pattern(params, pattern)
        assume(_max_logit_gap(params, Xb) > 1e-6)
        return Case(config, params, Xb, Yb, dict(pattern), regime, seed)

    return build()
