"""Exercise 4 check: your backward drives K SGD steps side by side with autograd.

From the lecture's start (parameters, then batches, from the seeded generator; the first batch is
the one Exercises 1-3 use) three trajectories take the same K steps at the same learning rate:

- **yours**: at each step your implementation runs on a fresh :class:`~pytest_backprop.problem.Problem`
  built at *your* current parameters, and its 7 parameter gradients (dC, dW1, db1, dW2, db2,
  dbngain, dbnbias) update them;
- **autograd** (float32) and **truth** (float64): ``loss.backward()`` on the fused forward.

Two things must hold at every step, each with the kit's tolerance rule ("no worse than K times
PyTorch's own float32 error against a float64 truth"):

1. your gradients at your parameters match autograd's at those same parameters (the rule as in
   Exercise 1: truth in float64, allowance from float32 autograd's error there);
2. your parameters track the truth trajectory: ``max|yours - truth| <= 10 max|autograd - truth|
   + 16 eps max|truth|``. How much rounding may accumulate over k steps is exactly what float32
   autograd accumulates over the same k steps through the same dynamics (every float32
   implementation rounds the update ``p -= lr * grad`` and its gradients; SGD amplifies or damps
   those errors alike for all of them), so the allowance grows with the steps as PyTorch's own
   error does -- no fixed per-step constant to guess. At step 0 the parameters are identical.

A failure names the first step and the parameter: "diverged at step 12 in W1". One mistake, one
verdict: step 0 is Exercise 1's own problem (its batch, its parameters), so a parameter gradient
wrong there is Exercise 1's failure, and this check is ``inherited`` from it (naming the Exercise 1
verdict, e.g. ``db2`` of shape (1, 27)), not "diverged": the trajectories have not separated, both
losses are still equal. "diverged" is kept for gradients that go wrong later (at parameters and
batches Exercise 1 never sees) and for parameters that leave the truth's trajectory.

Example (what ``pytest --backprop`` does)::

    result = sgd_check(implementation, words, Config(), steps=50, timeout=60)
    result.verdict.status      # "pass"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch

from reference_model.data import Words, build_splits
from reference_model.model import Config, forward_fused, init_params

from ..problems.lecture import GRADIENT_ORDER, PARAMETERS
from ..problems.tolerance import derive
from ..verdict import ERROR, FAIL, PASS, SKIP, Diagnosis, Verdict

EXERCISE = "ex4"
TENSOR = "sgd"
LECTURE_LR = 0.1
_RESULT_KEY = pytest.StashKey["SgdResult"]()
#: The parameters in backward order (W2 first, C last): the first one reported is nearest the loss.
BACKWARD_PARAMETERS: tuple[str, ...] = tuple(t for t in GRADIENT_ORDER if t in PARAMETERS)


@dataclass
class Divergence:
    """Where your run left autograd's: the step, the parameter, and by how much."""

    step: int
    parameter: str
    kind: str  # "gradient": your dP at your parameters; "trajectory": your P vs the truth's
    maxdiff: float
    atol: float
    message: str


@dataclass
class SgdResult:
    """The outcome of the Exercise 4 check, with what the plots need."""

    verdict: Verdict
    losses: dict[str, list[float]] = field(default_factory=dict)  # "yours", "autograd"
    failing: dict[str, tuple[Any, torch.Tensor]] = field(default_factory=dict)  # name -> (actual, expected)
    divergence: Divergence | None = None


def _json_safe(value: Any) -> Any:
    """Details as JSON allows them: a non-finite float becomes None (the report is written with allow_nan=False)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _verdict(status: str, code: str, message: str, details: dict[str, Any], divergence: Divergence | None = None) -> Verdict:
    details = _json_safe(details)
    return Verdict(exercise=EXERCISE, tensor=TENSOR, status=status, exact=None,
                   approximate=None if divergence is None else False,
                   maxdiff=None if divergence is None else divergence.maxdiff,
                   expected_shape=(), actual_shape=None, diagnosis=Diagnosis(code, message),
                   atol=None if divergence is None else divergence.atol,
                   line=None, details=details)


def _autograd_sgd_step(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, lr: float) -> float:
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        loss = forward_fused(leaves, Xb, Yb)["loss"]
        grads = torch.autograd.grad(loss, [leaves[k] for k in PARAMETERS])
    with torch.no_grad():
        for k, g in zip(PARAMETERS, grads):
            params[k] = params[k] - lr * g
    return float(loss.detach())


def first_divergence(step: int, yours: dict[str, torch.Tensor], autograd: dict[str, torch.Tensor],
                     truth: dict[str, torch.Tensor]) -> Divergence | None:
    """The first parameter (in backward order) whose trajectory left the truth's beyond the rule.

    Allowed: ``10 * max|autograd - truth| + 16 eps * max|truth|`` (:func:`~pytest_backprop.tolerance.derive`),
    i.e. as far as float32 autograd itself has drifted after the same updates.

    Example::

        first_divergence(3, yours, auto32, truth64)   # None, or Divergence(step=3, parameter="W1", ...)
    """
    for p in BACKWARD_PARAMETERS:
        tol = derive(autograd[p], truth[p])
        maxdiff = float((yours[p].double() - truth[p]).abs().max())
        if not maxdiff <= tol.atol:
            ref = float((autograd[p].double() - truth[p]).abs().max())
            return Divergence(step, p, "trajectory", maxdiff, tol.atol,
                              f"diverged at step {step} in {p}: after {step + 1} updates your {p} is {maxdiff:.3g} from "
                              f"the float64 trajectory (autograd float32: {ref:.3g}; allowed {tol.atol:.3g})")
    return None


def lecture_batches(config: Config, Xtr: torch.Tensor, Ytr: torch.Tensor, steps: int):
    """Initial parameters and ``steps`` batches, drawn as the lecture does from one seeded generator.

    The first batch is the one Exercises 1-3 check. Example::

        params, batches = lecture_batches(Config(), ds.Xtr, ds.Ytr, 50)
    """
    params = init_params(config)
    g = params.pop("_generator")
    ix = torch.randint(0, Xtr.shape[0], (steps, config.batch_size), generator=g)
    return params, list(zip(Xtr[ix], Ytr[ix]))


def sgd_check(implementation: Any, words: Words | None, config: Config, *, steps: int = 50, lr: float = LECTURE_LR,
              timeout: float | None = None, dataset: Any = None, device: str = "cpu",
              exercise1: Mapping[str, Verdict] | None = None) -> SgdResult:
    """Run the Exercise 4 check (see the module docstring) and return its verdict and curves.

    ``implementation`` is a loaded :class:`~pytest_backprop.loaders.Implementation`; its ``ex1``
    answer is used. ``dataset`` (a :class:`~reference_model.data.Dataset`) saves rebuilding the split.
    ``exercise1`` (Exercise 1's verdicts by tensor, as the kit has them) lets a failure at step 0
    name the Exercise 1 verdict it is inherited from.

    Example::

        r = sgd_check(load_implementation("examples/ex1_solution.py", Path(".")), load_words(), Config(), steps=20)
        r.verdict.status, r.losses["yours"][:2]
    """
    from ..judge.grade import verdict_for
    from ..problems.instance import problem_from_batch

    if dataset is None:
        dataset = build_splits(words, config.block_size)
    config = config.with_(vocab_size=dataset.vocab_size)
    start, batches = lecture_batches(config, dataset.Xtr, dataset.Ytr, steps)
    dev = torch.device(device)
    yours = {k: v.to(dev) for k, v in start.items()}
    auto32 = {k: v.to(dev) for k, v in start.items()}
    truth = {k: v.to(dev, torch.float64) for k, v in start.items()}
    losses: dict[str, list[float]] = {"yours": [], "autograd": []}
    details: dict[str, Any] = {"steps": steps, "lr": lr, "n_hidden": config.n_hidden, "batch_size": config.batch_size,
                               "losses": losses}

    for step, (Xb, Yb) in enumerate(batches):
        Xb, Yb = Xb.to(dev), Yb.to(dev)
        problem = problem_from_batch(config, yours, Xb, Yb, words=words, judged=PARAMETERS)
        run = implementation.run("ex1", problem, timeout)
        missing = [p for p in PARAMETERS if p not in run.grads]
        if run.error is not None and missing:
            details["step"] = step
            return SgdResult(_verdict(ERROR, "timeout" if run.error.timeout else "exception",
                                      f"your backward raised at SGD step {step}: {run.error.describe()}", details), losses)
        if missing:
            return SgdResult(_verdict(SKIP, "missing", "Exercise 4 trains with your parameter gradients; missing: "
                                      + ", ".join("d" + p for p in missing), details), losses)
        losses["yours"].append(problem.loss)
        losses["autograd"].append(_autograd_sgd_step(auto32, Xb, Yb, lr))
        _autograd_sgd_step(truth, Xb, Yb, lr)

        failing = {}
        first: Verdict | None = None
        for p in BACKWARD_PARAMETERS:
            v = verdict_for(EXERCISE, p, run.grads[p], problem)
            if v.status != PASS:
                failing[p] = (run.grads[p], problem.grads[p])
                first = first or v
        if first is not None and step == 0:
            return _wrong_at_start(first, failing, exercise1, details, losses)
        if first is not None:
            div = Divergence(step, first.tensor, "gradient", first.maxdiff if first.maxdiff is not None else float("nan"),
                             first.atol or 0.0,
                             f"diverged at step {step} in {first.tensor}: your d{first.tensor} at step {step}'s parameters "
                             f"is not autograd's ({first.diagnosis.message}); right at every earlier step; wrong at this "
                             "step: " + ", ".join("d" + k for k in failing))
            return _failed(div, details, losses, failing)

        with torch.no_grad():
            for p in PARAMETERS:
                yours[p] = yours[p] - lr * torch.as_tensor(run.grads[p]).to(dev, yours[p].dtype)
        div = first_divergence(step, yours, auto32, truth)
        if div is not None:
            return _failed(div, details, losses, {})
    final = {p: float((yours[p].double() - truth[p]).abs().max()) for p in PARAMETERS}
    details["final_maxdiff"] = final
    message = (f"{steps} SGD steps (lr {lr}) with your gradients track autograd; loss {losses['yours'][0]:.4f} -> "
               f"{losses['yours'][-1]:.4f}" if steps else "0 steps: nothing to check")
    return SgdResult(_verdict(PASS, "ok", message, details), losses)


def _wrong_at_start(first: Verdict, failing: dict[str, Any], exercise1: Mapping[str, Verdict] | None,
                    details: dict[str, Any], losses: dict[str, list[float]]) -> SgdResult:
    """A parameter gradient wrong at step 0, which is Exercise 1's problem: inherited from Exercise 1
    (naming its verdict) when Exercise 1 fails it too or was not given; otherwise (Exercise 1 ran in
    another dtype and passed) the check's own failure, said as what it is."""
    names = ", ".join("d" + k for k in failing)
    details.update(step=0, parameter=first.tensor, kind="gradient", wrong=list(failing))
    known = {k: v for k, v in (exercise1 or {}).items() if k in failing and v.status in (FAIL, ERROR)}
    if exercise1 is not None and not known:
        message = (f"at SGD step 0 (Exercise 1's batch and parameters, float32) your d{first.tensor} is not "
                   f"autograd's, though Exercise 1 passes it: [{first.diagnosis.code}] {first.diagnosis.message}")
        return SgdResult(_verdict(FAIL, first.diagnosis.code, message, details), losses, failing)
    if known:
        v = known.get(first.tensor) or next(iter(known.values()))
        root = v.details.get("inherited_from", v.tensor) if v.details else v.tensor
        root_code = exercise1[root].diagnosis.code if root in exercise1 else v.diagnosis.code
        details.update(inherited_from=root, exercise="ex1")
        message = (f"inherited from Exercise 1's d{root} [{root_code}]: {names} already "
                   f"fail{'s' if len(failing) == 1 else ''} there; fix that first (training with a wrong gradient "
                   "cannot track autograd)")
    else:
        details.update(inherited_from=first.tensor, exercise="ex1")
        message = (f"inherited from Exercise 1's d{first.tensor} [{first.diagnosis.code}]: at step 0, Exercise 1's own "
                   f"batch and parameters, {names} {'is' if len(failing) == 1 else 'are'} wrong; fix that first "
                   "(training with a wrong gradient cannot track autograd)")
    return SgdResult(_verdict(FAIL, "inherited", message, details), losses, failing)


def _failed(div: Divergence, details: dict[str, Any], losses: dict[str, list[float]], failing: dict) -> SgdResult:
    details.update(step=div.step, parameter=div.parameter, kind=div.kind)
    return SgdResult(_verdict(FAIL, "diverged", div.message, details, div), losses, failing, div)


def write_plots(result: SgdResult, folder: str | Path) -> list[Path]:
    """The loss curves (yours vs autograd) and a heatmap of |actual - expected| per failing gradient.

    Example::

        write_plots(result, "backprop-plots")   # [.../ex4_loss.png, .../ex4_step0_dW1.png]
    """
    from ..report.plots import difference_heatmap, loss_curves

    folder = Path(folder)
    written = []
    curves = {"your backward": result.losses.get("yours", []), "autograd": result.losses.get("autograd", [])}
    if any(curves.values()):
        written.append(loss_curves(curves, folder / "ex4_loss.png", title="Exercise 4: SGD with your gradients"))
    step = result.divergence.step if result.divergence else 0
    for name, (actual, expected) in result.failing.items():
        written.append(difference_heatmap(f"d{name} at SGD step {step}", actual, expected,
                                          folder / f"ex4_step{step}_d{name}.png"))
    return written

def wanted(kit: Any) -> bool:
    """Whether to collect the Exercise 4 item for this session: --backprop-steps > 0 and a full backward.

    Example::

        wanted(kit)   # True for a script that writes dlogprobs ... dC; False for a module with only Exercise 2
    """
    return getattr(kit, "lecture", True) and kit.option("steps") > 0 and "ex1" in kit.exercises()


def session_steps(kit: Any) -> int:
    """--backprop-steps (the same with --backprop-isolate: one warm child serves every step).

    Example::

        session_steps(kit)   # 50
    """
    return kit.option("steps")


def kit_sgd_result(kit: Any) -> SgdResult:
    """Run the check once per session at the session's settings (and write plots when asked)."""
    cached = kit.config.stash.get(_RESULT_KEY, None)
    if cached is not None:
        return cached
    problem = kit.problem
    if kit.implementation is None:
        result = SgdResult(_verdict(SKIP, "missing", "not run: the implementation could not be loaded", {}))
    elif any(v.status == ERROR for v in kit.verdicts("ex1")):  # a crash or endless loop: don't repeat it 50 times
        result = SgdResult(_verdict(SKIP, "missing", "not run: your code did not finish Exercise 1 (see its error)", {}))
    else:
        from ..problems.device import single_thread

        exercise1 = {v.tensor: v for v in kit.verdicts("ex1")}
        with single_thread():
            result = sgd_check(kit.implementation, problem.words, problem.config, steps=session_steps(kit),
                               lr=LECTURE_LR, timeout=kit.settings.timeout, device=kit.option("device"),
                               exercise1=exercise1)
    folder = kit.option("plots")
    if folder:
        try:
            write_plots(result, Path(folder))
        except Exception as exc:  # noqa: BLE001 -- a plot must never turn a verdict into a crash
            kit.run_warnings.setdefault(EXERCISE, []).append(Diagnosis("plots", f"could not write plots: {exc}"))
    kit.config.stash[_RESULT_KEY] = result
    return result
