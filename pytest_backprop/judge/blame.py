"""Blame: which failing gradient is wrong on its own, and which only inherit an earlier mistake.

Backprop runs the forward lines in reverse, so ``d<t>`` is the sum, over the lines that read ``t``
(``pytest_backprop.problems.lecture.consumers``), of each line's vector-Jacobian product applied to the
gradient of that line's output. The gradients ``d<t>`` depends on are therefore the gradients of
those outputs ("upstream" gradients, earlier in the lecture's checking order).

The rule, applied to every failing gradient in backward order:

1. If every upstream gradient is right (passes, or was not answered), ``d<t>`` is its **own
   fault**.
2. If some upstream gradient is wrong, compute what ``d<t>`` *should* be given the user's own
   upstream gradients: the sum of the consuming lines' autograd VJPs
   (:func:`pytest_backprop.problems.lecture.line_vjp`) applied to the user's answers. If the user's ``d<t>``
   equals that, the local step is right and the error is **inherited** (code ``inherited``, the
   message names the wrong upstream gradient and the first own-fault gradient it comes from).
   If it does not, the local step is wrong too: ``d<t>`` is its own fault, and its hint is computed
   against that "what it should be" instead of the truth. When a wrong upstream gradient cannot be
   used (wrong shape or type), the local step cannot be checked and ``d<t>`` is ``inherited``.
3. An own-fault gradient gets the most specific hint found, in this order:
   ``aliased`` (it shares storage with another gradient, the storage was modified in place, and
   it now holds that other gradient's right answer: ``dhprebn = dbndiff`` then ``dhprebn += ...``);
   ``lost_branch`` (it holds only the contributions that are float noise, the max branch of
   ``dlogits``, and none of the real one: ``dlogits = <max branch>`` where ``+=`` belongs);
   ``missing_branch`` (the answer is the sum of the contributions through a strict subset of the
   consuming lines); a per-branch ``scale``/``sign`` (one line's contribution is c times what it
   should be, e.g. the missing 2 of ``bndiff**2``; the factor's meaning quotes the forward line it
   belongs to); for ``C[Xb]``: ``loop_range`` (the answer lacks exactly the contributions of the
   last or first batch rows or context positions: a loop that stops early) or ``missing_branch``
   (each row of C that Xb reads several times holds one occurrence's contribution, not their sum);
   otherwise the single-comparison hint of
   :func:`pytest_backprop.diagnose.diagnose` (``scale``, ``sign``, ``keepdim``, ...), except that
   an unexplained ``mismatch`` of a tensor bound to a second gradient name (``du = dt``, modified
   in place) is ``aliased`` too. A view that is legitimately shared (``demb = dembcat.view(...)``)
   is never blamed for aliasing unless it holds the other gradient's answer.

All hint codes (the JSON ``diagnosis.code`` contract): ``ok``, ``scale``, ``sign``,
``unreduced``, ``keepdim``, ``transposed``, ``missing_branch``, ``lost_branch``, ``loop_range``, ``aliased``, ``nonfinite``,
``shape``, ``type``, ``exception``, ``timeout``, ``reads_autograd`` (set by the loaders when user
code touches ``.grad``/``.backward()``/``torch.autograd``), ``inherited``, ``mismatch``,
``missing``. Contributions through a line that are below the gradient's tolerance (the max
branch of ``dlogits``: its true upstream ``dlogit_maxes`` is ~1e-9) are noise, never "missing".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch

from ..problems.table import Line
from ..problems.forward import line_vjp

from ..problems.instance import Problem
from ..verdict import FAIL, Diagnosis, Verdict
from .diagnose import close, hints_for, name_constant, significant, value_hint

CODES: tuple[str, ...] = (
    "ok", "scale", "sign", "unreduced", "keepdim", "transposed", "missing_branch", "lost_branch", "loop_range",
    "aliased", "nonfinite", "shape", "type", "exception", "timeout", "reads_autograd", "inherited", "mismatch",
    "missing",
)


def _usable(value: Any, like: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == like.shape and value.dtype.is_floating_point


def _upstream_grad(line: Line, grads: Mapping[str, Any], problem: Problem, *, user: bool) -> torch.Tensor:
    if line.output not in problem.spec.order:  # the loss: d loss / d loss = 1
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
    for line in problem.spec.consumers(tensor):
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


def _aliased_hint(tensor: str, other: str, problem: Problem) -> Diagnosis:
    first, second = sorted((tensor, other), key=problem.spec.order.index)
    return Diagnosis("aliased", f"d{tensor} and d{other} are the same tensor in memory (`d{second} = d{first}` without "
                                f".clone()?): updating d{second} in place (`d{second} += ...`) also changed d{first}. "
                                f"Write `d{second} = d{first}.clone()`")


def _lookup_line(tensor: str, problem: Problem) -> Line | None:
    """The line that reads ``tensor`` through ``Xb`` (the lecture's ``emb = C[Xb]``): its gradient is a loop over Xb."""
    if problem.Xb is None:
        return None
    return next((ln for ln in problem.spec.consumers(tensor) if "Xb" in ln.constants), None)


def _lookup(tensor: str, actual: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor,
            problem: Problem) -> tuple[Line, torch.Tensor] | None:
    """The lookup line reading ``tensor`` and its upstream gradient as (n, block, width), or None
    when there is no such line or the shapes do not fit."""
    line = _lookup_line(tensor, problem)
    Xb = problem.Xb
    if (line is None or actual.shape != target.shape or actual.dim() != 2 or upstream.shape[:2] != Xb.shape
            or upstream[0, 0].numel() != actual.shape[1]):
        return None
    return line, upstream.detach().double().reshape(*Xb.shape, actual.shape[1])


def _repeated_rows_hint(tensor: str, actual: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor, atol: float,
                        problem: Problem) -> Diagnosis | None:
    """``C[Xb]`` reads some rows of C several times; an answer wrong only on those rows, where each
    wrong row holds exactly one occurrence's contribution, forgot ``+=`` (checked row by row)."""
    found = _lookup(tensor, actual, target, upstream, problem)
    if found is None:
        return None
    line, up = found
    Xb = problem.Xb
    counts = torch.bincount(Xb.reshape(-1), minlength=actual.shape[0])
    repeated = counts > 1
    wrong = ((actual.double() - target.double()).abs() > atol).any(dim=1)
    if not bool(wrong.any()) or bool((wrong & ~repeated).any()):
        return None
    for row in torch.nonzero(wrong).flatten().tolist():
        occurrences = up[Xb == row]  # (count, width): one contribution per occurrence
        if not any(close(actual[row], c, atol) for c in occurrences):
            return None
    return Diagnosis("missing_branch", f"d{tensor} is wrong only on rows that `{line.source}` reads several times "
                                       f"({int(repeated.sum())} rows of {tensor} appear more than once in Xb), and "
                                       "each of those holds one occurrence's contribution instead of their sum: "
                                       f"accumulate every occurrence, `d{tensor}[ix] += d{line.output}[k, j]` in the "
                                       f"loop (or index_add_); `d{tensor}[ix] = ...` and `d{tensor}[Xb] += ...` keep "
                                       "only one of them. Did you forget `+=`?")


def _span(indices: list[int], total: int, what: str) -> str:
    """``batch row 31 (the last of 32)`` or ``batch rows 0-2 (the first 3 of 32)``."""
    end = "last" if indices[-1] == total - 1 else "first"
    if len(indices) == 1:
        return f"{what} {indices[0]} (the {end} of {total})"
    return f"{what}s {indices[0]}-{indices[-1]} (the {end} {len(indices)} of {total})"


def _loop_range_hint(tensor: str, actual: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor, atol: float,
                     problem: Problem) -> Diagnosis | None:
    """A loop over Xb that skips its first or last batch rows (or context positions): the answer is
    the truth minus exactly those rows' contributions."""
    found = _lookup(tensor, actual, target, upstream, problem)
    if found is None:
        return None
    line, up = found
    Xb = problem.Xb
    n, block = Xb.shape
    residual = target.detach().double() - actual.detach().double()
    if close(residual, torch.zeros_like(residual), atol):
        return None

    def part(k: int | None, j: int | None) -> torch.Tensor:
        rows = Xb[k] if j is None else (Xb[:, j] if k is None else Xb[k, j].reshape(1))
        values = up[k] if j is None else (up[:, j] if k is None else up[k, j].reshape(1, -1))
        return torch.zeros_like(residual).index_add_(0, rows.reshape(-1), values.reshape(-1, residual.shape[1]))

    for what, total, contribution, fix in (
            ("batch row", n, lambda k: part(k, None), "range(Xb.shape[0])"),
            ("context position", block, lambda j: part(None, j), "range(Xb.shape[1])")):
        if total < 2:
            continue
        parts = [contribution(i) for i in range(total)]
        for order in (list(range(total - 1, 0, -1)), list(range(total - 1))):  # the last ones, then the first ones
            missing = torch.zeros_like(residual)
            for count, i in enumerate(order, start=1):
                missing = missing + parts[i]
                if close(missing, residual, atol):
                    skipped = sorted(order[:count])
                    how = "stops early" if skipped[-1] == total - 1 else "starts late"
                    return Diagnosis("loop_range", f"d{tensor} lacks exactly the contributions of "
                                                   f"{_span(skipped, total, what)} of Xb (through `{line.source}`); "
                                                   f"every other {what} is right: your loop over the {what}s {how}. "
                                                   f"Loop over `{fix}` (all {total} of them)")
    return None


def _lost_branch_hint(tensor: str, actual: torch.Tensor, parts: list[tuple[Line, torch.Tensor]],
                      atol: float) -> Diagnosis | None:
    """The answer holds only the contributions that are float noise (the max branch of ``dlogits``)
    and none of the real ones: ``d<t> = <noise branch>`` overwrote the main branch (``=`` for ``+=``).

    Checked: the answer is within the tolerance of the noise contributions, it is zero wherever
    they are zero (so it is not a plain zero or random answer), and the lost ones are not noise."""
    parts = [(ln, c.detach().double()) for ln, c in parts if c.shape == actual.shape]
    noise = [(ln, c) for ln, c in parts if float(c.abs().max()) <= atol]
    main = [(ln, c) for ln, c in parts if float(c.abs().max()) > atol]
    if not noise or not main:
        return None
    kept = sum((c for _, c in noise[1:]), noise[0][1])
    lost = sum((c for _, c in main[1:]), main[0][1])
    mine = actual.detach().double()
    if not bool(mine.any()) or bool((mine[kept == 0] != 0).any()) or not close(mine, kept, atol):
        return None
    if not close(lost, torch.zeros_like(lost), atol) and significant(lost, atol):
        kept_lines = " and ".join(f"`{ln.source}`" for ln, _ in noise)
        lost_lines = " and ".join(f"`{ln.source}`" for ln, _ in main)
        upstream = ", ".join(f"d{ln.output}" for ln, _ in noise)
        return Diagnosis("lost_branch", f"d{tensor} holds only the contribution through {kept_lines}, which is ~0 "
                                        f"({upstream} is float noise), and not the main one, through {lost_lines}: a "
                                        f"`d{tensor} = ...` where `d{tensor} += ...` belongs overwrote it (keep the "
                                        "first contribution and add the second)")
    return None


def _branch_hint(tensor: str, actual: torch.Tensor, parts: list[tuple[Line, torch.Tensor]], atol: float,
                 n: int) -> Diagnosis | None:
    """Fit the answer as a weighted sum of the consuming lines' contributions and name what is off."""
    lost = _lost_branch_hint(tensor, actual, parts, atol)
    if lost is not None:
        return lost
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
        named = name_constant(w, n, tensor=tensor, through=ln)
        if named is not None and named[0] == "-1":
            return Diagnosis("sign", f"d{tensor}: the contribution through `{ln.source}` has the wrong sign "
                                     "(a minus sign is missing or extra); the other line(s) are right")
        label, meaning = named if named is not None else (f"{w:.4g}", "look for a wrong constant factor")
        return Diagnosis("scale", f"d{tensor}: the contribution through `{ln.source}` is {label} × what it should "
                                  f"be: {meaning}; the other line(s) are right")
    return None


def _own_fault(tensor: str, verdict: Verdict, actual: Any, target: torch.Tensor, parts: list[tuple[Line, torch.Tensor]],
               grads: Mapping[str, Any], problem: Problem, given_upstream: bool) -> Diagnosis:
    """The most specific hint for a gradient whose mistake is (at least partly) its own (quoting the
    lines of ``problem``'s forward)."""
    with hints_for(problem.spec):
        return _own_fault_hint(tensor, verdict, actual, target, parts, grads, problem, given_upstream)


def _own_fault_hint(tensor: str, verdict: Verdict, actual: Any, target: torch.Tensor,
                    parts: list[tuple[Line, torch.Tensor]], grads: Mapping[str, Any], problem: Problem,
                    given_upstream: bool) -> Diagnosis:
    alias = _aliased_with(tensor, grads, problem)
    if alias is not None and alias[1]:
        return _aliased_hint(tensor, alias[0], problem)
    if not _usable(actual, target) or not bool(torch.isfinite(actual).all()):
        return verdict.diagnosis
    atol = problem.tolerances[tensor].atol
    actual = actual.detach()
    hint = _branch_hint(tensor, actual, parts, atol, problem.n)
    lookup = _lookup_line(tensor, problem)
    if hint is None and lookup is not None:
        upstream = _upstream_grad(lookup, grads, problem, user=given_upstream)
        hint = (_loop_range_hint(tensor, actual, target, upstream, atol, problem)
                or _repeated_rows_hint(tensor, actual, target, upstream, atol, problem))
    if hint is not None:
        return hint
    if alias is not None and verdict.diagnosis.code == "mismatch":
        return _aliased_hint(tensor, alias[0], problem)
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
    lines = problem.spec.consumers(tensor)
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
        if v.status != FAIL or v.tensor not in problem.spec.order or v.diagnosis.code == "reads_autograd":
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
    wrong = [ln for ln in problem.spec.consumers(tensor) if ln.output in failing]
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
    if tensor not in problem.spec.order or not isinstance(actual, torch.Tensor) or not actual.dtype.is_floating_point:
        return verdict.diagnosis
    try:
        parts = contributions(tensor, grads, problem, user=False)
        return _own_fault(tensor, verdict, actual, problem.truth64.grads[tensor], parts, grads, problem, False)
    except Exception:  # noqa: BLE001 -- a hint must never turn a verdict into a crash
        return verdict.diagnosis
