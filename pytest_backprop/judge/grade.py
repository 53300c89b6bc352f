"""Grading one run: turn an implementation's answers (a :class:`~pytest_backprop.usercode.base.RunResult`)
into one verdict per gradient of the exercise."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import torch

from ..problems.lecture import GRADIENT_ORDER, LECTURE, LINES

from ..problems.instance import Problem
from ..problems.spec import ProblemSpec
from ..usercode.base import GradientError, RunResult
from ..verdict import ERROR, FAIL, PASS, SKIP, Diagnosis, Location, Verdict, first_wrong  # noqa: F401 -- re-exported
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


#: Exercises of the lecture only: another problem (``--backprop-problem``) has Exercise 1 (its whole
#: backward) and the per-line checks.
LECTURE_ONLY = ("ex2", "ex3", "ex4")


def exercise_tensors(exercise: str, spec: ProblemSpec | None = None) -> tuple[str, ...]:
    """The gradients ``exercise`` answers for the problem ``spec`` (the lecture's by default), in
    report order: every gradient for ``ex1``, every line's output for ``lines``.

    Example::

        exercise_tensors("ex1", load_spec("examples/problems/two_layer_relu.py"))[:2]   # ('logp', 'esum')
    """
    if spec is None or spec is LECTURE:
        return EXERCISE_TENSORS[exercise]
    if exercise == "ex1":
        return spec.order
    if exercise == "lines":
        return tuple(line.output for line in reversed(spec.lines))
    raise KeyError(f"{exercise} is an exercise of the lecture's problem only, not of {spec.name!r}")


def exercise_title(exercise: str, spec: ProblemSpec | None = None) -> str:
    """The report's heading of ``exercise`` (for another problem than the lecture's, its name)."""
    if spec is None or spec is LECTURE or exercise not in ("ex1",):
        return EXERCISE_TITLES.get(exercise, exercise)
    return f"{spec.name}: backprop through every line"


def forward_line(tensor: str, spec: ProblemSpec | None = None) -> str | None:
    """The forward line(s) to look at for ``d<tensor>``: those that read ``tensor``, since backprop
    through them is what produces its gradient (two for a tensor used twice, joined by ``; ``)."""
    sources = [line.source for line in (spec or LECTURE).consumers(tensor)]
    return "; ".join(sources) or None


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    try:
        return tuple(int(s) for s in shape) if shape is not None else None
    except TypeError:
        return None


def broadcast_note(tensor: str, actual: Any, problem: Problem) -> Diagnosis | None:
    """``shape_note`` when an intermediate's answer differs from its tensor's shape only by size-1
    dimensions, holds the right values, and broadcasts to the same values wherever its gradient is
    consumed (the inputs of the line computing the tensor), e.g. the lecture's own
    ``dbnmeani = (-dbndiff).sum(0)``: (64,) for (1, 64). A parameter's gradient needs its exact shape
    (``p.data += -lr * grad`` raises otherwise), so parameters never get a note; nor does a shape that
    broadcasts to other values ((32,) for (32, 1)).

    Example::

        broadcast_note("bnmeani", dbnmeani_flat, problem).code   # 'shape_note'
    """
    expected = problem.grads[tensor]
    line = problem.spec.line_of.get(tensor)
    if line is None or tensor in problem.spec.leaves or not isinstance(actual, torch.Tensor):
        return None
    a_shape, e_shape = tuple(actual.shape), tuple(expected.shape)
    if a_shape == e_shape or actual.numel() != expected.numel() or \
            [s for s in a_shape if s != 1] != [s for s in e_shape if s != 1]:
        return None
    if not compare(actual.reshape(e_shape), expected).approximate:
        return None
    values = problem.truth.values
    contexts = [tuple(values[name].shape) for name in line.inputs if isinstance(values.get(name), torch.Tensor)]
    for shape in contexts:
        try:
            spread = torch.broadcast_to(actual.detach(), shape)
        except RuntimeError:
            return None
        if not torch.equal(spread, torch.broadcast_to(actual.detach().reshape(e_shape), shape)):
            return None
    fmt = lambda shape: str(tuple(shape))  # noqa: E731
    return Diagnosis("shape_note", f"d{tensor} has shape {fmt(a_shape)}, {tensor} has {fmt(e_shape)}: keepdim=True "
                                   f"(or .view{fmt(e_shape)}) gives {tensor}'s exact shape; yours works here because "
                                   f"broadcasting restores it in the backprop of `{line.source}` (a parameter's "
                                   "gradient must have its exact shape)")


def verdict_for(exercise: str, tensor: str, actual: Any, problem: Problem,
                location: Location | None = None) -> Verdict:
    """Compare one answer with the truth and diagnose it (see :func:`broadcast_note` for shapes)."""
    expected = problem.grads[tensor]
    result = compare(actual, expected)
    note = broadcast_note(tensor, actual, problem) if result.problem == "shape" else None
    if note is not None:
        reshaped = compare(actual.reshape(expected.shape), expected)
        return Verdict(exercise, tensor, PASS, reshaped.exact, True, reshaped.maxdiff, tuple(expected.shape),
                       _shape(actual), note, atol=reshaped.tolerance.atol, mismatched=0, numel=expected.numel(),
                       line=forward_line(tensor, problem.spec), location=location)
    hint = diagnose(tensor, result, n=problem.n, values=problem.truth.values, spec=problem.spec)
    status = PASS if hint.code == "ok" else FAIL
    return Verdict(
        exercise=exercise, tensor=tensor, status=status, exact=result.exact, approximate=result.approximate,
        maxdiff=result.maxdiff, expected_shape=tuple(expected.shape), actual_shape=_shape(actual),
        diagnosis=hint, atol=result.tolerance.atol, mismatched=result.mismatched, numel=expected.numel(),
        worst_index=result.worst_index, line=forward_line(tensor, problem.spec), location=location,
    )


def unanswered(exercise: str, tensor: str, problem: Problem, status: str, hint: Diagnosis,
               location: Location | None = None) -> Verdict:
    """A verdict for a gradient the user did not produce."""
    return Verdict(exercise=exercise, tensor=tensor, status=status, exact=None, approximate=None, maxdiff=None,
                   expected_shape=tuple(problem.grads[tensor].shape), actual_shape=None, diagnosis=hint,
                   line=forward_line(tensor, problem.spec), location=location)


def error_message(tensor: str, error: GradientError) -> str:
    """Why ``d<tensor>`` has no complete answer, naming the user's own statement.

    Example::

        error_message("bndiff", GradientError("incomplete", err, Location("s.py", 24, None, "dbndiff += ...")))
        # 'dbndiff is incomplete: the `dbndiff += ...` at s.py:24 did not run, because your code raised ...'
    """
    err, st = error.error, error.statement
    where = f"the `{st.source}` at {st.describe()}" if st is not None and st.source else "its statement"
    if error.kind in ("raised", "timeout"):
        return err.describe()
    if error.kind == "incomplete":
        return f"d{tensor} is incomplete: {where} did not run, because {err.describe()}"
    return f"d{tensor} was not reached: {where} did not run, because {err.describe()}"


def _error_code(tensor: str, error: GradientError, run: RunResult) -> str:
    if tensor in run.overrides:
        return run.overrides[tensor].code
    if error.error.code:
        return error.error.code
    return "timeout" if error.kind == "timeout" or error.error.timeout else "exception"


def verdicts_for_run(exercise: str, run: RunResult, problem: Problem) -> list[Verdict]:
    """One verdict per gradient of ``exercise``, each about that gradient alone.

    A gradient the user has not written is skipped ("not attempted"). A gradient whose own statement
    raised, or whose statements did not all run, is an error at that statement
    (:class:`~pytest_backprop.usercode.base.GradientError`). Every other answer is compared with the
    truth. Runs without statement records (per-line chains, functions without source) fall back to
    charging the exception to the first gradient not computed.
    """
    verdicts: list[Verdict] = []
    statement_level = bool(run.locations) or bool(run.gradient_errors)
    error_reported = statement_level
    answered = {k for k, v in run.grads.items() if v is not None or k in run.overrides}
    for tensor in exercise_tensors(exercise, problem.spec):
        locations = run.locations.get(tensor, ())
        location = locations[0] if locations else None
        also = {"also_at": [f"{loc.describe()}: {loc.source}" for loc in locations[1:4]]} if len(locations) > 1 else {}
        gerr = run.gradient_errors.get(tensor)
        if gerr is not None:
            diagnosis = Diagnosis(_error_code(tensor, gerr, run), error_message(tensor, gerr))
            if tensor in run.overrides and run.overrides[tensor].message not in diagnosis.message:
                diagnosis = Diagnosis(diagnosis.code, run.overrides[tensor].message + "; " + diagnosis.message)
            verdicts.append(unanswered(exercise, tensor, problem, ERROR, diagnosis, gerr.statement or location))
        elif tensor in answered and tensor in run.overrides:  # e.g. reads_autograd: fails whatever its value
            verdicts.append(replace(verdict_for(exercise, tensor, run.grads[tensor], problem, location), status=FAIL,
                                    approximate=False, diagnosis=run.overrides[tensor]))
        elif tensor in answered:
            verdict = verdict_for(exercise, tensor, run.grads[tensor], problem, location)
            verdicts.append(replace(verdict, details={**verdict.details, **also}) if also else verdict)
        elif run.error is not None and not error_reported:
            error_reported = True
            code = run.error.code or ("timeout" if run.error.timeout else "exception")
            verdicts.append(unanswered(exercise, tensor, problem, ERROR, Diagnosis(code, run.error.describe())))
        elif run.error is not None and not statement_level:
            verdicts.append(unanswered(exercise, tensor, problem, SKIP, Diagnosis(
                "missing", f"not reached: your code stopped at {run.error.location} before computing d{tensor}")))
        else:
            what = f"d{tensor} is None" if tensor in run.grads else f"no d{tensor} yet"
            verdicts.append(unanswered(exercise, tensor, problem, SKIP, Diagnosis("missing", f"not attempted: {what}"),
                                       location))
    if run.error is not None and not error_reported:
        verdicts = _attach_late_error(verdicts, run)
    return verdicts


def _attach_late_error(verdicts: list[Verdict], run: RunResult) -> list[Verdict]:
    """Without statement records: the code raised (or timed out) after assigning every gradient; the
    last failing one in backward order is most likely the one it was still computing, so it carries
    the error; when none fails, the error becomes a warning."""
    code = run.error.code or ("timeout" if run.error.timeout else "exception")
    failing = [i for i, v in enumerate(verdicts) if v.status == FAIL]
    if not failing:
        run.warnings.append(Diagnosis(code, run.error.describe() + " (after every gradient was assigned)"))
        return verdicts
    i = failing[-1]
    message = f"d{verdicts[i].tensor} was probably left unfinished: {run.error.describe()}"
    return [*verdicts[:i], replace(verdicts[i], status=ERROR, diagnosis=Diagnosis(code, message)), *verdicts[i + 1:]]


def missing_exercise_verdicts(exercise: str, reason: str, problem: Problem) -> list[Verdict]:
    """An exercise the implementation does not answer: one ``skip`` row per gradient, with the reason
    and the fix (never a silent absence).

    Example::

        missing_exercise_verdicts("ex3", "no Exercise 3 cell found: tag the cell `backprop:ex3`", problem)
    """
    return [unanswered(exercise, t, problem, SKIP, Diagnosis("missing", reason)) for t in exercise_tensors(exercise, problem.spec)]


def load_failure_verdicts(exercise: str, message: str, problem: Problem) -> list[Verdict]:
    """Verdicts when the implementation cannot be loaded at all: one error, the rest skipped."""
    tensors = exercise_tensors(exercise, problem.spec)
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
