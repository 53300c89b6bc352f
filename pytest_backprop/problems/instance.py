"""One instance of a problem: its inputs, forward values, true gradients and tolerances.

The same object backs the ``makemore_forward`` fixture and the built-in checks of ``--backprop``.
``problem.spec`` is the :class:`~pytest_backprop.problems.spec.ProblemSpec` it is an instance of
(the lecture's unless built from another with :func:`problem_from_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from reference_model.data import Words, build_splits, load_words
from reference_model.model import Config

from .forward import Truth
from .lecture import LECTURE, lecture_inputs
from .spec import DEFAULT_SEED, ProblemSpec
from .tolerance import Reference, Tolerance, attach, derive


@dataclass
class Problem:
    """Forward values and true gradients of a problem on one set of inputs (the lecture's network
    on one batch by default).

    ``config``, ``words``, ``Xb`` and ``Yb`` are the lecture's (None for another problem);
    ``params`` are the leaves, in the run's dtype.

    Example::

        p = build_problem(load_words(), Config())
        p["counts"]              # forward value; p["counts"].grad is the true dcounts
        p.grads["counts"]        # the true dcounts (float32 autograd, the lecture's t.grad)
        p.tolerances["b1"].atol  # the rule's tolerance for db1
        p.spec.consumers("counts")   # the lines that read counts
    """

    config: Config | None
    dtype: torch.dtype
    words: Words | None
    params: dict[str, torch.Tensor]
    Xb: torch.Tensor | None
    Yb: torch.Tensor | None
    truth: Truth  # autograd in ``dtype``: the lecture's ``t.grad``
    truth64: Truth  # autograd in float64: what the tolerance rule compares with
    tolerances: dict[str, Tolerance]
    spec: ProblemSpec | None = None  # None: the lecture's
    sizes: dict[str, int] | None = None  # None: from ``config`` (the lecture's)
    inputs: dict[str, Any] | None = None  # what make_inputs returned (None when built from truths by hand)

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = LECTURE
        if self.sizes is None:
            self.sizes = (self.config.with_(batch_size=self.n).sizes() if self.config is not None
                          else dict(self.spec.sizes))

    @property
    def n(self) -> int:
        """The batch size: the lecture's Xb rows; another problem's size ``n`` when it has one."""
        if self.Xb is not None:
            return int(self.Xb.shape[0])
        return int((self.sizes or {}).get("n", 0))

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
        """The named sizes, as globals a student's code may refer to (the lecture's vocab_size,
        n_embd, n_hidden, block_size and batch_size)."""
        return dict(self.sizes or {})


def truths_and_tolerances(spec: ProblemSpec, inputs: Mapping[str, Any], dtype: torch.dtype,
                          judged: Iterable[str] | None = None) -> tuple[Truth, Truth, dict[str, Tolerance]]:
    """The truth in ``dtype`` and in float64, and every gradient's tolerance; each true gradient
    carries its float64 truth and tolerance, and each forward value its true gradient in ``.grad``.

    In float64 each tolerance is widened to the float64 noise floor (:mod:`pytest_backprop.problems.noise`),
    so that a correct float64 answer never fails where the true gradient is a cancellation.

    ``judged`` (default: every gradient) names the gradients that will be compared: only they get a
    tolerance (Exercise 4 compares the seven parameters at every step). With none judged no float64
    truth is computed: ``truth64`` is then the ``dtype`` truth (for runs that only need the forward
    values, as ``backprop-train --impl``).
    """
    wanted = None if judged is None else set(judged)
    names = spec.order if wanted is None else tuple(n for n in spec.order if n in wanted)
    truth32 = spec.truth(inputs, dtype=torch.float32) if dtype != torch.float32 and names else None
    truth = spec.truth(inputs, dtype=dtype)
    truth64 = spec.truth(inputs, dtype=torch.float64) if dtype != torch.float64 and names else truth
    reference32 = truth32 or truth
    floor = None
    if dtype == torch.float64 and names:
        from .noise import FLOAT64_SLACK

        floor = spec.noise_floor(truth64.values, truth64.grads)
    tolerances: dict[str, Tolerance] = {}
    for name in names:
        tol = derive(reference32.grads[name], truth64.grads[name], dtype)
        if floor is not None:
            tol = Tolerance(atol=max(tol.atol * FLOAT64_SLACK, floor[name]), rtol=tol.rtol,
                            origin=f"rule x{FLOAT64_SLACK} or float64 noise floor")
        tolerances[name] = tol
        attach(truth.grads[name], Reference(truth64.grads[name], tol))
    for name in spec.order:
        truth.values[name].grad = truth.grads[name]
    return truth, truth64, tolerances


def problem_from_inputs(spec: ProblemSpec, inputs: Mapping[str, Any], *, dtype: torch.dtype = torch.float32,
                        sizes: Mapping[str, int] | None = None) -> Problem:
    """A problem instance at given inputs (what ``spec.inputs(...)`` returns, or your own).

    Example::

        p = problem_from_inputs(spec, spec.inputs({"n": 4}), dtype=torch.float64)
        p.grads["W1"]            # autograd's dW1 in float64, carrying its tolerance
    """
    truth, truth64, tolerances = truths_and_tolerances(spec, inputs, dtype)
    params = {k: inputs[k].detach().to(dtype) for k in spec.leaves}
    return Problem(None, dtype, None, params, None, None, truth, truth64, tolerances, spec,
                   dict(sizes) if sizes is not None else dict(spec.sizes), dict(inputs))


def problem_from_spec(spec: ProblemSpec, sizes: Mapping[str, int] | None = None, *, seed: int = DEFAULT_SEED,
                      dtype: torch.dtype = torch.float32, **data: Any) -> Problem:
    """A problem instance at ``sizes`` (the defaults updated), inputs from ``spec.make_inputs``
    with a generator seeded with ``seed``; ``data`` goes to ``make_inputs`` as keyword arguments.

    Example::

        p = problem_from_spec(load_spec("examples/problems/two_layer_relu.py"), {"n": 16})
        p.grads["W1"], p.tolerances["W1"]
    """
    full = spec.check_sizes(sizes)
    return problem_from_inputs(spec, spec.inputs(full, seed=seed, **data), dtype=dtype, sizes=full)


def problem_from_batch(config: Config, params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, *,
                       dtype: torch.dtype = torch.float32, words: Words | None = None,
                       judged: Iterable[str] | None = None) -> Problem:
    """The lecture's problem for given parameters and batch, at any sizes: truths and tolerances.

    In float64 each tolerance is widened to the float64 noise floor (:mod:`pytest_backprop.problems.noise`),
    so that a correct float64 answer never fails where the true gradient is a cancellation.
    ``judged``: see :func:`truths_and_tolerances`.

    Example::

        p = problem_from_batch(config, params, Xb, Yb, judged=("W1", "b1"))
        p.tolerances                 # {'W1': Tolerance(...), 'b1': Tolerance(...)}
    """
    inputs = lecture_inputs(params, Xb, Yb)
    truth, truth64, tolerances = truths_and_tolerances(LECTURE, inputs, dtype, judged)
    p = {k: v.detach().to(dtype) for k, v in params.items()}
    return Problem(config, dtype, words, p, Xb, Yb, truth, truth64, tolerances, LECTURE,
                   config.with_(batch_size=int(Xb.shape[0])).sizes(), inputs)


def build_problem(words: Words, config: Config = Config(), *, dtype: torch.dtype = torch.float32,
                  block_seed: int = 42) -> Problem:
    """The lecture's setting: dataset from ``words``, parameters then batch from the seeded generator
    (the lecture's ``make_inputs`` with the dataset)."""
    dataset = build_splits(words, config.block_size, seed=block_seed)
    config = config.with_(vocab_size=dataset.vocab_size)
    inputs = LECTURE.inputs(config.sizes(), seed=config.seed, dataset=dataset)
    params = {k: inputs[k] for k in LECTURE.leaves}
    return problem_from_batch(config, params, inputs["Xb"], inputs["Yb"], dtype=dtype, words=words)


def resolve_words(names: str | None) -> Words:
    """Words from a names file, or the embedded census names when ``names`` is None."""
    return load_words(names) if names else load_words(None)
