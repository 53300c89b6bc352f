"""Hint codes: why a gradient is wrong, in the lecture's words.

``diagnose`` looks at one comparison (the answer and its truth) and returns a
:class:`~pytest_backprop.verdict.Diagnosis` whose message names the likely fix:

- ``ok``: matches (exactly, or within the tolerance rule);
- ``type``: not a floating tensor of the tensor's dtype;
- ``keepdim``: right values, shapes differ only by size-1 dimensions ((64,) for (1, 64));
- ``unreduced``: the answer has the broadcast shape; summing it over the broadcast dimension(s)
  gives the truth (names the forward line where the tensor was broadcast);
- ``transposed``: the answer's ``.T`` is the truth;
- ``shape``: any other shape mismatch, with both shapes and the dimension(s) that differ;
- ``nonfinite``: NaN or inf where the truth is finite;
- ``sign``: the answer is -1 times the truth;
- ``scale``: the answer is c times the truth, with c named when it is n, 1/n, n/(n-1), (n-1)/n,
  n-1, 1/(n-1), 2 or 1/2 ("1/n where Bessel's correction needs 1/(n-1)?"), quoting the forward
  line on the gradient's path that the factor belongs to (:func:`factor_line`: ``dlogprobs`` off
  by n/(n-1) points at the loss's mean, ``dhprebn`` missing 1/n at ``bnmeani = 1/n*...``);
- ``mismatch``: none of the above.

Hints that speak of the lecture (n, 1/n, Bessel's correction, the mean over the batch, its forward
lines, its ``cmp``) are given only for the lecture's own tensors (``Comparison.lecture``, or
``lecture=True``, the default of the building blocks); any other tensor (``check_backward``,
``assert_grad_matches`` on plain tensors) gets generic wording: ``dx is 25 × the true gradient: look
for a wrong constant factor``.

Scale and sign are only looked for where the truth is clearly not noise (its largest magnitude
is at least :data:`SIGNIFICANT` times the tolerance), so ``db1`` (true value 0) and
``dlogit_maxes`` (true value ~1e-9) never get a scale hint. Blame across gradients
(``inherited``), per-line hints (``missing_branch``, ``lost_branch``, ``loop_range``) and ``aliased`` are added by
:mod:`pytest_backprop.judge.blame`; ``exception``, ``timeout`` and ``missing`` come from the run itself,
and ``reads_autograd`` from the loaders.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Mapping

import torch

from ..verdict import Diagnosis
from .compare import Comparison, describe_failure

#: A truth whose largest magnitude is below this many tolerances is treated as noise (no scale hints).
SIGNIFICANT = 100.0
#: Relative slack (of the largest magnitude) when a hint checks "these values are the same".
REL = 1e-5


def close(actual: torch.Tensor, target: torch.Tensor, atol: float, *, rel: float = REL) -> bool:
    """Whether two tensors of the same shape agree within ``atol`` plus ``rel`` of the larger magnitude.

    Looser than the verdict: it only decides which hint to give. NaN never agrees.

    Example::

        close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-9]), 1e-8)   # True
    """
    a, t = actual.detach().double(), target.detach().double()
    if a.shape != t.shape or not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(t).all()):
        return False
    if a.numel() == 0:
        return True
    scale = max(float(a.abs().max()), float(t.abs().max()))
    return float((a - t).abs().max()) <= atol + rel * scale


def significant(truth: torch.Tensor, atol: float) -> bool:
    """Whether ``truth`` is clearly more than float noise (scale and sign hints need that).

    Example::

        significant(problem.grads["b1"], problem.tolerances["b1"].atol)   # False: db1's truth is 0
    """
    return truth.numel() > 0 and float(truth.detach().double().abs().max()) >= SIGNIFICANT * max(atol, 1e-30)


def _fmt(shape: Any) -> str:
    return str(tuple(int(s) for s in shape))


#: The lecture problem's NAME (reference_model.model.NAME), without importing the problem here.
LECTURE_NAME = "makemore MLP (the lecture)"
#: The problem whose lines hints quote (set by :func:`diagnose`'s ``spec``; None: the lecture's).
_SPEC: ContextVar[Any] = ContextVar("backprop_hint_spec", default=None)


def _lines_reading(name: str, lecture: bool = True) -> tuple[Any, ...]:
    if not lecture:  # a tensor outside the problem: its name says nothing about the problem's lines
        return ()
    spec = _SPEC.get()
    if spec is not None:
        return spec.consumers(name) if name in spec.order or name in spec.line_of else ()
    from ..problems.lecture import consumers  # noqa: PLC0415 -- only where hints name lines

    return consumers(name)


@contextmanager
def hints_for(spec: Any) -> Iterator[None]:
    """Within the block, hints quote the lines of the problem ``spec`` (None: the lecture's).

    Example::

        with hints_for(problem.spec):
            value_hint("z1", actual, truth, atol, n=8)
    """
    token = _SPEC.set(spec)
    try:
        yield
    finally:
        _SPEC.reset(token)


def _is_lecture() -> bool:
    spec = _SPEC.get()
    return spec is None or spec.name == LECTURE_NAME


def _infer_integer(c: float) -> int | None:
    """The k for which c is k, 1/k, k/(k-1) or (k-1)/k (k >= 3), or None."""
    if c <= 0:
        return None
    for k in (c, 1 / c, c / (c - 1) if c > 1 else 0.0, 1 / (1 - c) if c < 1 else 0.0):
        if k >= 2.5 and abs(k - round(k)) <= 1e-4 * k and round(k) <= 10**6:
            return int(round(k))
    return None


#: Where each named factor comes from in a forward pass: a mean's 1/n, Bessel's 1/(n-1), the 2 of x**2.
FACTOR_KIND = {"n": "mean", "1/n": "mean", "n/(n-1)": "mean", "(n-1)/n": "bessel", "n-1": "bessel",
               "1/(n-1)": "bessel", "2": "square", "1/2": "square"}
#: The lecture's line for each kind of factor, quoted when a hint does not know which gradient it is about.
LECTURE_FACTOR_LINES = {"mean": "loss = -logprobs[range(n), Yb].mean()",
                        "bessel": "bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)", "square": "bndiff2 = bndiff**2"}


def _holds_factor(source: str, kind: str) -> bool:
    rhs = source.split("=", 1)[-1].replace(" ", "")
    if kind == "mean":
        return "1/n" in rhs or ".mean()" in rhs
    if kind == "bessel":
        return "1/(n-1)" in rhs
    return "**2" in rhs


def factor_line(name: str | None, kind: str, *, through: Any = None) -> str | None:
    """The forward line nearest to ``name`` on its gradient's path to the loss that holds a factor of
    ``kind`` (``mean``: 1/n or ``.mean()``; ``bessel``: 1/(n-1); ``square``: ``**2``, only in the
    lines that read ``name`` itself), or None. ``through`` (a line) starts the path there instead.

    Example::

        factor_line("logprobs", "mean")   # 'loss = -logprobs[range(n), Yb].mean()'
        factor_line("hprebn", "mean")     # 'bnmeani = 1/n*hprebn.sum(0, keepdim=True)'
        factor_line("logits", "bessel")   # None: no Bessel factor between logits and the loss
    """
    frontier = [through] if through is not None else list(_lines_reading(name)) if name else []
    seen: set[str] = set()
    while frontier:
        for line in frontier:
            if _holds_factor(line.source, kind):
                return line.source
        if kind == "square":  # d(x**2)/dx belongs to the step right at x
            return None
        seen.update(line.output for line in frontier)
        frontier = [ln for line in frontier for ln in _lines_reading(line.output) if ln.output not in seen]
    return None


def name_constant(c: float, n: int | None, *, tensor: str | None = None, through: Any = None,
                  lecture: bool = True) -> tuple[str, str] | None:
    """Name a factor ``c`` between an answer and its truth: (label, what it usually means).

    ``n`` is the batch size; when it is None it is inferred from ``c`` itself. With ``lecture=False``
    (a tensor that is not the lecture's) only the generic factors (2, 1/2, -1) are named, and no
    forward line is quoted. With ``tensor`` (and
    optionally ``through``, one line reading it) the meaning quotes the forward line on that
    gradient's path that the factor belongs to (:func:`factor_line`); when that path holds no
    such factor (no Bessel correction between ``logits`` and the loss), the meaning says only what
    the factor is.

    Example::

        name_constant(31 / 32, 32, tensor="bndiff2")[1]
        # "1/n where Bessel's correction needs 1/(n-1)? (n = 32) (`bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)`)"
        name_constant(32 / 31, 32, tensor="logprobs")[1]
        # "1/(n-1) where the mean needs 1/n? (n = 32) (`loss = -logprobs[range(n), Yb].mean()`)"
    """
    if not math.isfinite(c) or c == 0:
        return None
    sign = -1.0 if c < 0 else 1.0
    m = abs(c)
    inferred = n is None
    if not lecture:
        n = None
    elif inferred:
        n = _infer_integer(m)
    located = tensor is not None or through is not None
    # value, label, meaning ({line}: the forward line in backticks), meaning when the path has no such line
    candidates: list[tuple[float, str, str, str]] = [
        (2.0, "2", "an extra factor 2 (a branch counted twice, or the 2 of d(x**2)/dx = 2x in {line} applied twice?)",
         "an extra factor 2 (a branch counted twice?)"),
        (0.5, "1/2", "a factor 2 is missing (d(x**2)/dx = 2x, for {line}?)", "a factor 2 is missing"),
    ]
    if n is not None and n >= 2:
        nn = f" (n = {n}{'?' if inferred else ''})"
        candidates += [
            (n, "n", f"a factor 1/n is missing{nn}: the 1/n of the mean in {{line}}", f"a factor 1/n is missing{nn}"),
            (1 / n, "1/n", f"an extra factor 1/n{nn}: the 1/n of the mean in {{line}} applied twice?",
             f"an extra factor 1/n{nn}"),
            ((n - 1) / n, "(n-1)/n", f"1/n where Bessel's correction needs 1/(n-1)?{nn} ({{line}})",
             f"a factor (n-1)/n{nn}: n-1 and n mixed up?"),
            (n / (n - 1), "n/(n-1)", f"1/(n-1) where the mean needs 1/n?{nn} ({{line}})",
             f"a factor n/(n-1){nn}: n and n-1 mixed up?"),
        ]
        if n > 2:
            candidates += [
                (n - 1, "n-1", f"the factor 1/(n-1) of Bessel's correction is missing{nn} ({{line}})",
                 f"a factor n-1{nn}: look for a wrong constant factor"),
                (1 / (n - 1), "1/(n-1)", f"an extra factor 1/(n-1){nn}: Bessel's correction applied twice? ({{line}})",
                 f"a factor 1/(n-1){nn}: look for a wrong constant factor"),
            ]
    for value, label, meaning, plain in candidates:
        if abs(m - value) <= 1e-3 * value:
            if not lecture:
                meaning = plain
            elif located:
                line = factor_line(tensor, FACTOR_KIND[label], through=through)
                meaning = meaning.format(line=f"`{line}`") if line else plain
            elif not _is_lecture():  # another problem: no usual place to name
                meaning = plain
            else:  # nothing says which gradient: the lecture's usual place for each factor
                meaning = meaning.format(line=f"`{LECTURE_FACTOR_LINES[FACTOR_KIND[label]]}`")
            if sign < 0:
                return f"-{label}", meaning + "; and the sign is flipped too"
            return label, meaning
    if sign < 0 and abs(m - 1) <= 1e-3:
        return "-1", "a minus sign is missing or extra"
    return None


def fit_scale(actual: torch.Tensor, target: torch.Tensor, atol: float) -> float | None:
    """The constant c with actual ≈ c * target (None when no single constant fits).

    Example::

        fit_scale(-2 * truth, truth, 1e-8)   # -2.0
    """
    a, t = actual.detach().double().flatten(), target.detach().double().flatten()
    tt = float(t @ t)
    if tt == 0.0 or not bool(torch.isfinite(a).all()):
        return None
    c = float(a @ t) / tt
    if abs(c) < 1e-6:
        return None
    return c if close(a, c * t, abs(c) * atol) else None


def _sign_where(name: str, lecture: bool = True) -> str:
    lines = [ln.source for ln in _lines_reading(name, lecture) if "-" in ln.source.split("=", 1)[1]]
    return f" (the backprop of `{lines[0]}` has a minus sign)" if lines else ""


def value_hint(name: str, actual: torch.Tensor, target: torch.Tensor, atol: float, *,
               n: int | None = None, what: str = "the true gradient", lecture: bool = True) -> Diagnosis | None:
    """Scale, sign or transposed hints for a same-shape answer that is wrong, or None.

    ``target`` is what the answer should be (the truth, or what the user's own upstream gradients
    imply); ``atol`` its tolerance. ``lecture=False``: generic wording (no n, no lecture lines).

    Example::

        value_hint("bndiff2", 31 / 32 * truth, truth, 1e-9, n=32).code   # 'scale'
    """
    square = actual.dim() == 2 and actual.shape[0] == actual.shape[1] and actual.shape[0] > 1
    if square and close(actual.T, target, atol):
        return _transposed(name, actual.shape, target.shape, lecture)
    if not significant(target, atol):
        return None
    c = fit_scale(actual, target, atol)
    if c is None or abs(c - 1) <= 1e-3:
        return None
    named = name_constant(c, n, tensor=name, lecture=lecture)
    if named is not None and named[0] == "-1":
        return Diagnosis("sign", f"d{name} is -1 × {what}: a minus sign is missing or extra{_sign_where(name, lecture)}")
    if named is not None:
        label, meaning = named
        return Diagnosis("scale", f"d{name} is {label} × {what}: {meaning}")
    if target.numel() < 2:  # one number is always some multiple of another: say nothing
        return None
    return Diagnosis("scale", f"d{name} is {c:.4g} × {what}: look for a wrong constant factor")


def _transposed(name: str, actual_shape: Any, expected_shape: Any, lecture: bool = True) -> Diagnosis:
    matmul = [ln.source for ln in _lines_reading(name, lecture) if "@" in ln.source]
    where = f" In `{matmul[0]}`," if matmul else " For `Y = X @ W`,"
    return Diagnosis("transposed", f"d{name} is transposed ({_fmt(actual_shape)} for {name}'s {_fmt(expected_shape)}): "
                                   f"its .T is the true gradient.{where} dX = dY @ W.T and dW = X.T @ dY "
                                   "(match the shapes)")


def _broadcast_line(name: str, shape: tuple[int, ...], values: Mapping[str, Any] | None,
                    lecture: bool = True) -> str | None:
    lines = _lines_reading(name, lecture)
    if values is not None:
        for ln in lines:
            out = values.get(ln.output)
            if isinstance(out, torch.Tensor) and tuple(out.shape) == shape:
                return ln.source
    return lines[0].source if len(lines) == 1 else None


def _unreduced(name: str, actual: torch.Tensor, truth: torch.Tensor, atol: float,
               values: Mapping[str, Any] | None, lecture: bool = True) -> Diagnosis | None:
    a_shape, e_shape = tuple(actual.shape), tuple(truth.shape)
    lead = len(a_shape) - len(e_shape)
    if lead < 0:
        return None
    padded = (1,) * lead + e_shape
    if any(e not in (1, a) for e, a in zip(padded, a_shape)):
        return None
    dims = [i for i, (e, a) in enumerate(zip(padded, a_shape)) if e == 1 and a != 1]
    if not dims:
        return None
    summed = actual.detach().double().sum(dim=dims, keepdim=True).reshape(e_shape)
    if not close(summed, truth, atol):
        return None
    dropped = [d for d in dims if d < lead]
    kept = [d for d in dims if d >= lead]
    parts = []
    if dropped:
        parts.append(f"sum over dim {', '.join(map(str, dropped))}")
    if kept:
        parts.append(f"sum over dim {', '.join(map(str, kept))} with keepdim=True")
    how = " and ".join(parts)
    line = _broadcast_line(name, a_shape, values, lecture)
    where = f": {name} was broadcast in `{line}`" if line else f": {name} was broadcast to {_fmt(a_shape)}"
    return Diagnosis("unreduced", f"d{name} has the broadcast shape {_fmt(a_shape)}, not {name}'s {_fmt(e_shape)}; "
                                  f"{how}{where}, so its gradient sums over the copies")


def _size1_dim(longer: tuple[int, ...], shorter: tuple[int, ...]) -> int:
    """The index of the size-1 dimension that ``longer`` has and ``shorter`` lacks (0 if ambiguous)."""
    for i, size in enumerate(longer):
        if size == 1 and longer[:i] + longer[i + 1:] == shorter:
            return i
    return 0


def _keepdim(name: str, actual: torch.Tensor, truth: torch.Tensor, atol: float, lecture: bool = True) -> Diagnosis | None:
    a_shape, e_shape = tuple(actual.shape), tuple(truth.shape)
    if actual.numel() != truth.numel() or [s for s in a_shape if s != 1] != [s for s in e_shape if s != 1]:
        return None
    if not close(actual.reshape(e_shape), truth, atol):
        return None
    if len(e_shape) > len(a_shape):
        dim = _size1_dim(e_shape, a_shape)
        fix = f"keep the size-1 dimension (`.sum({dim}, keepdim=True)` or `.view{_fmt(e_shape)}`)"
    else:
        dim = _size1_dim(a_shape, e_shape)
        fix = f"drop the size-1 dimension (`.sum({dim})` without keepdim, or `.view{_fmt(e_shape)}`)"
    cmp_note = (" The lecture's cmp() uses `==`, which broadcasts, so it let this through;"
                if lecture and _is_lecture() else "")
    return Diagnosis("keepdim", f"d{name} has shape {_fmt(a_shape)} but {name} has shape {_fmt(e_shape)}: the values "
                                f"are right; {fix}.{cmp_note} a gradient has exactly the shape of its tensor")


def _wrong_dim(name: str, a_shape: tuple[int, ...], e_shape: tuple[int, ...], values: Mapping[str, Any] | None) -> str:
    if values is None or len(a_shape) != len(e_shape):
        return ""
    for ln in _lines_reading(name):
        out = values.get(ln.output)
        if not isinstance(out, torch.Tensor) or out.dim() != len(a_shape):
            continue
        b = tuple(out.shape)
        if all(a in (1, bb) for a, bb in zip(a_shape, b)) and all(e in (1, bb) for e, bb in zip(e_shape, b)):
            need = [i for i, (e, bb) in enumerate(zip(e_shape, b)) if e == 1 and bb != 1]
            had = [i for i, (a, bb) in enumerate(zip(a_shape, b)) if a == 1 and bb != 1]
            if need and need != had:
                return (f"; summed over the wrong dimension? {name} was broadcast in `{ln.source}`: sum over dim "
                        f"{', '.join(map(str, need))}" + (f", not dim {', '.join(map(str, had))}" if had else ""))
    return ""


def shape_hint(name: str, actual: torch.Tensor, truth: torch.Tensor, atol: float, *,
               values: Mapping[str, Any] | None = None, lecture: bool = True) -> Diagnosis:
    """The hint for an answer whose shape differs from the tensor's: keepdim, unreduced, transposed or shape.

    Example::

        shape_hint("bnbias", dhpreact.sum(0), truth, 1e-7).code   # 'keepdim'
    """
    a_shape, e_shape = tuple(actual.shape), tuple(truth.shape)
    if bool(torch.isfinite(actual).all()):
        hint = _keepdim(name, actual, truth, atol, lecture) or _unreduced(name, actual, truth, atol, values, lecture)
        if hint is not None:
            return hint
        if actual.dim() == 2 and a_shape == e_shape[::-1] and close(actual.T, truth, atol):
            return _transposed(name, a_shape, e_shape, lecture)
    if len(a_shape) == len(e_shape):
        diff = "; ".join(f"dim {i}: {a} vs {e}" for i, (a, e) in enumerate(zip(a_shape, e_shape)) if a != e)
    else:
        diff = f"{len(a_shape)} dimensions vs {len(e_shape)}"
    wrong_dim = _wrong_dim(name, a_shape, e_shape, values)
    return Diagnosis("shape", f"d{name} has shape {_fmt(a_shape)} but {name} has shape {_fmt(e_shape)} ({diff}); "
                              f"a gradient has exactly the shape of its tensor{wrong_dim}")


def diagnose(name: str, result: Comparison, *, n: int | None = None,
             values: Mapping[str, Any] | None = None, spec: Any = None) -> Diagnosis:
    """The hint for one failed (or passed) comparison of ``d<name>``.

    ``n`` (the batch size) lets scale hints name n, 1/n, n/(n-1) ...; without it they infer it from
    the factor. Both only for the lecture's tensors (``result.lecture``); others get generic hints. ``values`` (the forward tensors by name, with ``n``) lets shape hints quote the
    forward line where the tensor was broadcast. ``spec`` (a
    :class:`~pytest_backprop.problems.spec.ProblemSpec`; default the lecture's) is the problem whose
    lines hints quote.

    Example::

        diagnose("bnbias", compare(dbnbias_flat, truth)).code           # 'keepdim'
        diagnose("bndiff2", compare(dbndiff2, truth), n=32).message    # "... Bessel's correction ..."
    """
    if n is None and values is not None and isinstance(values.get("n"), int):
        n = values["n"]
    if result.problem == "type" or result.problem == "dtype":
        return Diagnosis("type", describe_failure(name, result))
    try:
        with hints_for(spec if spec is not None else _SPEC.get()):
            return _diagnose(name, result, n, values)
    except Exception:  # noqa: BLE001 -- a hint must never crash a check; say what is known
        code = "shape" if result.problem == "shape" else ("ok" if result.approximate else "mismatch")
        return Diagnosis(code, describe_failure(name, result) if code != "ok" else "matches autograd")


def _diagnose(name: str, result: Comparison, n: int | None, values: Mapping[str, Any] | None) -> Diagnosis:
    atol = result.tolerance.atol
    if result.problem == "shape":
        return shape_hint(name, result.actual.detach().to(result.truth.device), result.truth, atol, values=values,
                          lecture=result.lecture)
    if result.approximate:
        return Diagnosis("ok", "matches autograd" + (" exactly" if result.exact else " within the tolerance rule"))
    if result.nonfinite and bool(torch.isfinite(result.truth).all()):
        return Diagnosis("nonfinite", f"d{name} contains NaN or inf where the true gradient is finite: "
                                      "look for a division by zero, log of 0 or exp overflow")
    actual = result.actual.detach().to(result.truth.device)
    hint = value_hint(name, actual, result.truth, atol, n=n, lecture=result.lecture)
    if hint is not None:
        return hint
    if not bool(actual.any()) and significant(result.truth, atol):
        return Diagnosis("mismatch", f"d{name} is all zeros; " + describe_failure(name, result))
    return Diagnosis("mismatch", describe_failure(name, result))
