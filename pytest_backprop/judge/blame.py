"""Blame: which failing gradient is wrong on its own, and which only inherit an earlier mistake.

Backprop runs the forward lines in reverse, so ``d<t>`` is the sum, over the lines that read ``t``
(``reference_model.model.consumers``), of each line's vector-Jacobian product applied to the
gradient of that line's output. The gradients ``d<t>`` depends on are therefore the gradients of
those outputs ("upstream" gradients, earlier in the lecture's checking order).

The rule, applied to every failing gradient in backward order:

1. If every upstream gradient is right (passes, or was not answered), ``d<t>`` is its **own
   fault**.
2. If some upstream gradient is wrong, compute what ``d<t>`` *should* be given the user's own
   upstream gradients: the sum of the consuming lines' autograd VJPs
   (:func:`reference_model.model.line_vjp`) applied to the user's answers. If the user's ``d<t>``
   equals that, the local step is right and the error is **inherited** (code ``inherited``, the
   message names the wrong upstream gradient and the first own-fault gradient it comes from).
   If it does not, the local step is wrong too: ``d<t>`` is its own fault, and its hint is computed
   against that "what it should be" instead of the truth. When a wrong upstream gradient cannot be
   used (wrong shape or type), the local step cannot be checked and ``d<t>`` is ``inherited``.
3. An own-fault gradient gets the most specific hint found, in this order:
   ``aliased`` (it shares storage with another gradient, the storage was modified in place, and
   it now holds that other gradient's right answer: ``dhprebn = dbndiff`` then ``dhprebn += ...``);
   ``missing_branch`` (the answer is the sum of the contributions through a strict subset of the
   consuming lines, or for ``C[Xb]`` keeps only one of the repeated rows); a per-branch
   ``scale``/``sign`` (one line's contribution is c times what it should be, e.g. the missing 2 of
   ``bndiff**2``); otherwise the single-comparison hint of
   :func:`pytest_backprop.diagnose.diagnose` (``scale``, ``sign``, ``keepdim``, ...), except that
   an unexplained ``mismatch`` of a tensor bound to a second gradient name (``du = dt``, modified
   in place) is ``aliased`` too. A view that is legitimately shared (``demb = dembcat.view(...)``)
   is never blamed for aliasing unless it holds the other gradient's answer.

All hint codes (the JSON ``diagnosis.code`` contract): ``ok``, ``scale``, ``sign``,
``unreduced``, ``keepdim``, ``transposed``, ``missing_branch``, ``aliased``, ``nonfinite``,
``shape``, ``type``, ``exception``, ``timeout``, ``reads_autograd`` (set by the loaders when user
code touches ``.grad``/``.backward()``/``torch.autograd``), ``inherited``, ``mismatch``,
``missing``. Contributions through a line that are below the gradient's tolerance (the max
branch of ``dlogits``: its true upstream ``dlogit_maxes`` is ~1e-9) are noise, never "missing".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch

from reference_model.model import GRADIENT_ORDER, Line, consumers, line_vjp

from ..problems.instance import Problem
from ..verdict import FAIL, Diagnosis, Verdict
from .diagnose import close, name_constant, value_hint

CODES: tuple[str, ...] = (
    "ok", "scale", "sign", "unreduced", "keepdim", "transposed", "missing_branch", "aliased", "nonfinite",
    "shape", "type", "exception", "timeout", "reads_autograd", "inherited", "mismatch", "missing",
)


def _usable(value: Any, like: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == like.shape and value.dtype.is_floating_point


def _upstream_grad(line: Line, grads: Mapping[str, Any], problem: Problem, *, user: bool) -> torch.Tensor:
    if line.output not in GRADIENT_ORDER:  # the loss: d loss / d loss = 1
        return torch.ones((), dtype=problem.dtype)
    truth = problem.grads[line.output]
    answer = grads.get(line.output)
    if user and _usable(answer, truth):
        return answer.detach().to(truth.dtype)
    return truth


def contributions(tensor: str, grads: Mapping[str, Any], problem: Problem, *,
                  user: bool) -> list[tuple[Line, torch.Tensor]]:
    """Each consuming line's contribution to ``d<tensor>``, from the true upstream gradients or
    (``user=True``) from the user's own where they gave a usable one.

    Example::

        [(ln.output, c.shape) for ln, c in contributions("counts", {}, problem, user=False)]
        # [('counts_sum', (32, 27)), ('probs', (32, 27))]
    """
    out = []
    for line in consumers(tensor):
        upstream = _upstream_grad(line, grads, problem, user=user)
        out.append((line, line_vjp(line, problem.truth.values, upstream)[tensor]))
    return out


def _aliased_with(tensor: str, grads: Mapping[str, Any], problem: Problem) -> tuple[str, bool] | None:
    """Another gradient sharing ``d<tensor>``'s storage, where that storage was modified in place, and
    whether ``d<tensor>`` now holds that other gradient's right answer (the clearest sign)."""
    mine = grads.get(tensor)
    if not isinstance(mine, torch.Tensor) or mine._version == 0:
        return None
    ptr = mine.untyped_storage().data_ptr()
    found = None
    for other, value in grads.items():
        if other == tensor or not isinstance(value, torch.Tensor) or value.untyped_storage().data_ptr() != ptr:
            continue
        truth = problem.truth64.grads.get(other)
        holds = (truth is not None and truth.numel() == mine.numel()
                 and close(mine.detach().reshape(truth.shape), truth, problem.tolerances[other].atol))
        if holds:
            return other, True
        if value is mine:  # `du = dt`: two names for one tensor
            found = (other, False)
    return found


def _aliased_hint(tensor: str, other: str) -> Diagnosis:
    first, second = sorted((tensor, other), key=GRADIENT_ORDER.index)
    return Diagnosis("aliased", f"d{tensor} and d{other} are the same tensor in memory (`d{second} = d{first}` without "
                                f".clone()?): updating d{second} in place (`d{second} += ...`) also changed d{first}. "
                                f"Write `d{second} = d{first}.clone()`")


def _repeated_rows_hint(tensor: str, actual: torch.Tensor, target: torch.Tensor, atol: float,
                        problem: Problem) -> Diagnosis | None:
    """``C[Xb]`` reads some rows of C several times; an answer wrong only on those rows forgot ``+=``."""
    line = next((ln for ln in consumers(tensor) if "Xb" in ln.constants), None)
    if line is None or actual.dim() != 2 or actual.shape != target.shape:
        return None
    counts = torch.bincount(problem.Xb.reshape(-1), minlength=actual.shape[0])
    repeated = counts > 1
    wrong = ((actual.double() - target.double()).abs() > atol).any(dim=1)
    if not bool(wrong.any()) or bool((wrong & ~repeated).any()):
        return None
    return Diagnosis("missing_branch", f"d{tensor} is wrong only on rows that `{line.source}` reads several times "
                                       f"({int(repeated.sum())} rows of {tensor} appear more than once in Xb): "
                                       f"accumulate every occurrence, `d{tensor}[ix] += d{line.output}[k, j]` in the "
                                       f"loop (or index_add_); `d{tensor}[ix] = ...` and `d{tensor}[Xb] += ...` keep "
                                       "only one of them. Did you forget `+=`?")


def _branch_hint(tensor: str, actual: torch.Tensor, parts: list[tuple[Line, torch.Tensor]], atol: float,
                 n: int) -> Diagnosis | None:
    """Fit the answer as a weighted sum of the consuming lines' contributions and name what is off."""
    parts = [(ln, c) for ln, c in parts if c.shape == actual.shape and float(c.abs().max()) > atol]
    if len(parts) < 2 or actual.numel() < 4 * len(parts):  # too few numbers for a meaningful fit
        return None
    cols = torch.stack([c.double().flatten() for _, c in parts], dim=1)
    unit = cols / cols.norm(dim=0, keepdim=True)
    gram = (unit.T @ unit - torch.eye(len(parts), dtype=torch.float64)).abs()
    if float(gram.max()) > 0.999:  # two contributions nearly parallel: no unique fit
        return None
    b = actual.detach().double().flatten()
    alpha = torch.linalg.lstsq(cols, b.unsqueeze(1)).solution.squeeze(1)
    if not close(cols @ alpha, b, atol):
        return None
    weights = [float(a) for a in alpha]
    ones = [ln for (ln, _), w in zip(parts, weights) if abs(w - 1) <= 1e-3]
    zeros = [ln for (ln, _), w in zip(parts, weights) if abs(w) <= 1e-3]
    others = [(ln, w) for (ln, _), w in zip(parts, weights) if abs(w - 1) > 1e-3 and abs(w) > 1e-3]
    if zeros and ones and not others:
        missing = " and ".join(f"`{ln.source}`" for ln in zeros)
        kept = ", ".join(f"`{ln.source}`" for ln in ones)
        return Diagnosis("missing_branch", f"d{tensor} holds only the contribution through {kept}; {tensor} is also "
                                           f"used in {missing}: did you forget `+=`?")
    if len(others) == 1 and ones and not zeros:
        ln, w = others[0]
        named = name_constant(w, n)
        if named is not None and named[0] == "-1":
            return Diagnosis("sign", f"d{tensor}: the contribution through `{ln.source}` has the wrong sign "
                                     "(a minus sign is missing or extra); the other line(s) are right")
        label, meaning = named if named is not None else (f"{w:.4g}", "look for a wrong constant factor")
        return Diagnosis("scale", f"d{tensor}: the contribution through `{ln.source}` is {label} × what it should "
                                  f"be: {meaning}; the other line(s) are right")
    return None


def _own_fault(tensor: str, verdict: Verdict, actual: Any, target: torch.Tensor, parts: list[tuple[Line, torch.Tensor]],
               grads: Mapping[str, Any], problem: Problem, given_upstream: bool) -> Diagnosis:
    """The most specific hint for a gradient whose mistake is (at least partly) its own."""
    alias = _aliased_with(tensor, grads, problem)
    if alias is not None and alias[1]:
        return _aliased_hint(tensor, alias[0])
    if not _usable(actual, target) or not bool(torch.isfinite(actual).all()):
        return verdict.diagnosis
    atol = problem.tolerances[tensor].atol
    actual = actual.detach()
    hint = (_repeated_rows_hint(tensor, actual, target, atol, problem)
            or _branch_hint(tensor, actual, parts, atol, problem.n))
    if hint is not None:
        return hint
    if alias is not None and verdict.diagnosis.code == "mismatch":
        return _aliased_hint(tensor, alias[0])
    if not given_upstream:
        return verdict.diagnosis
    what = "what your upstream gradients imply"
    hint = value_hint(tensor, actual, target, atol, n=problem.n, what=what)
    if hint is not None:
        return hint
    return Diagnosis("mismatch", f"d{tensor} is wrong beyond what the wrong upstream gradient(s) explain: the backprop "
                                 f"through {', '.join(f'`{ln.source}`' for ln, _ in parts)} itself is off too")


def blame_one(tensor: str, verdict: Verdict, by_name: Mapping[str, Verdict], roots: Mapping[str, str],
              grads: Mapping[str, Any], problem: Problem) -> tuple[Diagnosis, dict[str, Any]]:
    """The diagnosis (and details for the JSON) of one failing gradient; see the module docstring.

    ``by_name`` holds the verdicts so far (upstream ones already blamed), ``roots`` maps each
    failing gradient to the own-fault gradient it comes from.

    Example::

        hint, details = blame_one("bndiff", verdict, by_name, {"bndiff2": "bndiff2"}, run.grads, problem)
        hint.code, details["inherited_from"]   # ('inherited', 'bndiff2')
    """
    actual = grads.get(tensor)
    if not isinstance(actual, torch.Tensor) or not actual.dtype.is_floating_point:
        return verdict.diagnosis, {}  # not a float tensor: its own mistake, whatever is upstream (a wrong shape may be inherited)
    lines = consumers(tensor)
    wrong = [ln for ln in lines if ln.output in by_name and by_name[ln.output].status == FAIL]
    if not wrong:
        parts = contributions(tensor, grads, problem, user=False)
        target = problem.truth64.grads[tensor]
        return _own_fault(tensor, verdict, actual, target, parts, grads, problem, False), {}
    root = next((roots[ln.output] for ln in wrong if ln.output in roots), wrong[0].output)
    ups = ", ".join(f"d{ln.output} (from `{ln.source}`)" for ln in wrong)
    inherited = Diagnosis("inherited", f"d{tensor} is computed from {ups}, which is wrong; fix d{root} first "
                                       "(the first wrong gradient this one depends on)")
    details = {"inherited_from": root, "upstream": [ln.output for ln in wrong]}
    if not all(_usable(grads.get(ln.output), problem.grads[ln.output]) for ln in wrong):
        return inherited, details
    parts = contributions(tensor, grads, problem, user=True)
    target = sum((c for _, c in parts[1:]), parts[0][1])
    if _usable(actual, target) and close(actual.detach(), target, problem.tolerances[tensor].atol):
        return inherited, details
    if _usable(actual, target) and not bool(torch.isfinite(target).all()) and not bool(torch.isfinite(actual).all()):
        return inherited, details  # NaN/inf flowing down from upstream
    return _own_fault(tensor, verdict, actual, target, parts, grads, problem, True), {}


def assign_blame(verdicts: list[Verdict], grads: Mapping[str, Any], problem: Problem) -> list[Verdict]:
    """Re-diagnose the failing verdicts of an Exercise 1 run with blame across gradients.

    ``verdicts`` are in backward order; ``grads`` are the user's answers (``RunResult.grads``).
    Passing, skipped and errored verdicts are returned unchanged.

    Example::

        vs = assign_blame(verdicts, run.grads, problem)
        [(v.tensor, v.diagnosis.code) for v in vs if v.status == "fail"]
        # [('bndiff2', 'scale'), ('bndiff', 'inherited'), ...]
    """
    by_name = {v.tensor: v for v in verdicts}
    roots: dict[str, str] = {}
    out = []
    for v in verdicts:
        if v.status != FAIL or v.tensor not in GRADIENT_ORDER or v.diagnosis.code == "reads_autograd":
            if v.status == FAIL:
                roots[v.tensor] = v.tensor
            out.append(v)
            continue
        try:
            hint, details = blame_one(v.tensor, v, by_name, roots, grads, problem)
        except Exception as exc:  # noqa: BLE001 -- a hint must never turn a verdict into a crash
            hint, details = v.diagnosis, {"blame_error": f"{type(exc).__name__}: {exc}"}
        roots[v.tensor] = details.get("inherited_from", v.tensor)
        new = replace(v, diagnosis=hint, details={**v.details, **details})
        by_name[v.tensor] = new
        out.append(new)
    return out


def follows_upstream(tensor: str, grads: Mapping[str, Any], problem: Problem, failing: set[str]) -> bool:
    """Whether the user's ``d<tensor>`` is exactly the backprop of their own (wrong) upstream answers
    through the lines that read ``tensor``: its local step is right, its error comes from upstream.

    Example::

        follows_upstream("emb", run.grads, problem, {"embcat"})   # True for demb = dembcat.view(...)
    """
    actual = grads.get(tensor)
    wrong = [ln for ln in consumers(tensor) if ln.output in failing]
    if not wrong or not _usable(actual, problem.grads[tensor]):
        return False
    if not all(_usable(grads.get(ln.output), problem.grads[ln.output]) for ln in wrong):
        return False
    parts = contributions(tensor, grads, problem, user=True)
    target = sum((c for _, c in parts[1:]), parts[0][1])
    return close(actual.detach(), target, problem.tolerances[tensor].atol)


def own_fault_hint(verdict: Verdict, grads: Mapping[str, Any], problem: Problem) -> Diagnosis:
    """The most specific hint for a gradient that is wrong although the gradients it is computed from
    are right (measured by independent grading: ``grads`` come from a run with the true upstream
    gradients substituted): ``aliased``, ``missing_branch``, a per-branch ``scale``/``sign``, or the
    single-comparison hint it already has.

    Example::

        own_fault_hint(verdict, rerun.grads, problem).code   # e.g. 'missing_branch'
    """
    tensor = verdict.tensor
    actual = grads.get(tensor)
    if tensor not in GRADIENT_ORDER or not isinstance(actual, torch.Tensor) or not actual.dtype.is_floating_point:
        return verdict.diagnosis
    try:
        parts = contributions(tensor, grads, problem, user=False)
        return _own_fault(tensor, verdict, actual, problem.truth64.grads[tensor], parts, grads, problem, False)
    except Exception:  # noqa: BLE001 -- a hint must never turn a verdict into a crash
        return verdict.diagnosis
