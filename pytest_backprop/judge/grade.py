"""Grading one run: turn an implementation's answers (a :class:`~pytest_backprop.usercode.base.RunResult`)
into one verdict per gradient of the exercise."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

from reference_model.model import GRADIENT_ORDER, LINES, consumers

from ..problems.instance import Problem
from ..usercode.base import RunResult
from ..verdict import ERROR, FAIL, PASS, SKIP, Diagnosis, Verdict
from .compare import compare
from .diagnose import diagnose

#: The gradients each exercise answers, in the order they are reported.
EXERCISE_TENSORS: dict[str, tuple[str, ...]] = {
    "ex1": GRADIENT_ORDER,
    "ex2": ("logits",),
    "ex3": ("hprebn",),
    "lines": tuple(line.output for line in reversed(LINES)),  # per-line checks, backward order
    "ex4": ("sgd",),  # one whole check (pytest_backprop.checks.exercise4); listed here for the report's order
}
EXERCISE_TITLES = {
    "ex1": "Exercise 1: backprop through every line",
    "ex2": "Exercise 2: cross-entropy in one go",
    "ex3": "Exercise 3: batchnorm in one go",
    "lines": "Per-line backward functions, each vs autograd's VJP of its line",
    "ex4": "Exercise 4: training with your gradients",
}


def forward_line(tensor: str) -> str | None:
    """The forward line(s) to look at for ``d<tensor>``: those that read ``tensor``, since backprop
    through them is what produces its gradient (two for a tensor used twice, joined by ``; ``)."""
    sources = [line.source for line in consumers(tensor)]
    return "; ".join(sources) or None


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    try:
        return tuple(int(s) for s in shape) if shape is not None else None
    except TypeError:
        return None


def verdict_for(exercise: str, tensor: str, actual: Any, problem: Problem) -> Verdict:
    """Compare one answer with the truth and diagnose it."""
    expected = problem.grads[tensor]
    result = compare(actual, expected)
    hint = diagnose(tensor, result, n=problem.n, values=problem.truth.values)
    status = PASS if hint.code == "ok" else FAIL
    return Verdict(
        exercise=exercise, tensor=tensor, status=status, exact=result.exact, approximate=result.approximate,
        maxdiff=result.maxdiff, expected_shape=tuple(expected.shape), actual_shape=_shape(actual),
        diagnosis=hint, atol=result.tolerance.atol, mismatched=result.mismatched, numel=expected.numel(),
        worst_index=result.worst_index, line=forward_line(tensor),
    )


def unanswered(exercise: str, tensor: str, problem: Problem, status: str, hint: Diagnosis) -> Verdict:
    """A verdict for a gradient the user did not produce."""
    return Verdict(exercise=exercise, tensor=tensor, status=status, exact=None, approximate=None, maxdiff=None,
                   expected_shape=tuple(problem.grads[tensor].shape), actual_shape=None, diagnosis=hint,
                   line=forward_line(tensor))


def verdicts_for_run(exercise: str, run: RunResult, problem: Problem) -> list[Verdict]:
    """One verdict per gradient of ``exercise``.

    A gradient the user has not written is skipped ("not attempted"). When the code raised, the
    first gradient it did not reach (in backward order) carries the exception as an error and the
    rest are skipped as not reached; gradients computed before the exception are still checked.
    """
    verdicts: list[Verdict] = []
    error_reported = False
    # `dprobs = None` (a template's placeholder) is not an answer yet, unless a hint explains it
    answered = {k for k, v in run.grads.items() if v is not None or k in run.overrides}
    for tensor in EXERCISE_TENSORS[exercise]:
        if tensor in answered and tensor in run.overrides:  # e.g. reads_autograd: fails whatever its value
            verdicts.append(replace(verdict_for(exercise, tensor, run.grads[tensor], problem), status=FAIL,
                                    approximate=False, diagnosis=run.overrides[tensor]))
        elif tensor in answered:
            verdicts.append(verdict_for(exercise, tensor, run.grads[tensor], problem))
        elif run.error is not None and not error_reported:
            error_reported = True
            code = run.error.code or ("timeout" if run.error.timeout else "exception")
            verdicts.append(unanswered(exercise, tensor, problem, ERROR, Diagnosis(code, run.error.describe())))
        elif run.error is not None:
            verdicts.append(unanswered(exercise, tensor, problem, SKIP, Diagnosis(
                "missing", f"not reached: your code stopped at {run.error.location} before computing d{tensor}")))
        else:
            what = f"d{tensor} is None" if tensor in run.grads else f"no d{tensor} yet"
            verdicts.append(unanswered(exercise, tensor, problem, SKIP, Diagnosis("missing", f"not attempted: {what}")))
    if run.error is not None and not error_reported:
        verdicts = _attach_late_error(verdicts, run)
    if exercise == "ex1":  # blame across the line graph: inherited, missing_branch, aliased
        from .blame import assign_blame  # noqa: PLC0415

        verdicts = assign_blame(verdicts, run.grads, problem)
    return verdicts


def _attach_late_error(verdicts: list[Verdict], run: RunResult) -> list[Verdict]:
    """The code raised (or timed out) after assigning every gradient: the last failing one in backward
    order is most likely the one it was still computing (a dC loop cut short), so it carries the error;
    when none fails, the error becomes a warning."""
    code = run.error.code or ("timeout" if run.error.timeout else "exception")
    failing = [i for i, v in enumerate(verdicts) if v.status == FAIL]
    if not failing:
        run.warnings.append(Diagnosis(code, run.error.describe() + " (after every gradient was assigned)"))
        return verdicts
    i = failing[-1]
    message = f"d{verdicts[i].tensor} was probably left unfinished: {run.error.describe()}"
    return [*verdicts[:i], replace(verdicts[i], status=ERROR, diagnosis=Diagnosis(code, message)), *verdicts[i + 1:]]


def load_failure_verdicts(exercise: str, message: str, problem: Problem) -> list[Verdict]:
    """Verdicts when the implementation cannot be loaded at all: one error, the rest skipped."""
    tensors = EXERCISE_TENSORS[exercise]
    first = unanswered(exercise, tensors[0], problem, ERROR, Diagnosis("exception", message))
    rest = [unanswered(exercise, t, problem, SKIP, Diagnosis("missing", "not run: the implementation could not be loaded"))
            for t in tensors[1:]]
    return [first, *rest]


def summarize(verdicts: list[Verdict]) -> dict[str, int]:
    """Counts of each status."""
    counts = {PASS: 0, FAIL: 0, SKIP: 0, ERROR: 0}
    for v in verdicts:
        counts[v.status] += 1
    return counts


def first_wrong(verdicts: Iterable[Verdict]) -> Verdict | None:
    """The first failing gradient in backward order that is its own fault."""
    for v in verdicts:
        if v.status in ("fail", "error") and v.diagnosis.code != "inherited":
            return v
    return None
