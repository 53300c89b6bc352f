"""Independent grading: every gradient is graded as if the gradients before it were right.

Backprop computes each gradient from those before it, so one wrong ``dprobs`` makes every gradient
computed from it wrong too. Rather than guess which of those failures are the student's own, the kit
measures it. It runs the code once; then, walking the gradients in backward order, whenever one fails
(a wrong value, an exception, a copied ``.grad``) and later gradients depend on it, it runs the code
again with that gradient's **true value substituted** where the code assigns it (after its last
assignment, or in place of the statement that raised; see :mod:`pytest_backprop.usercode.program`), and
grades the later gradients on that run. So there is at most one re-run per failing gradient, and:

- a gradient that fails as written but is right once the gradients it depends on are right is
  ``inherited`` (a failure, one line: "inherited from dprobs: fix that first");
- one that is still wrong is its own fault: its hint is computed on the re-run, against the truth;
- a gradient whose statements did not run because an earlier statement raised is graded on a re-run
  that continues past that statement.

Implementations that cannot be re-run this way (a module function without source) fall back to the
estimate of :func:`pytest_backprop.judge.blame.assign_blame` (VJPs of the user's own upstream answers).

Example::

    graded = grade_exercise(implementation, "ex1", problem, timeout=60)
    [(v.tensor, v.diagnosis.code) for v in graded.verdicts if v.status == "fail"]
    # [('probs', 'scale'), ('counts_sum_inv', 'inherited'), ...]
    graded.runs   # how many times the code ran
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from ..problems.lecture import LECTURE

from ..judge.blame import assign_blame, follows_upstream, own_fault_hint
from ..judge.grade import exercise_tensors, verdicts_for_run
from ..problems.instance import Problem
from ..problems.spec import ProblemSpec
from ..usercode.base import Implementation, RunResult
from ..usercode.program import Plan
from ..verdict import ERROR, FAIL, PASS, Diagnosis, Verdict

#: Exercises whose gradients depend on each other (the others have one answer each).
CASCADING = ("ex1",)


@dataclass
class Graded:
    """The verdicts of one exercise, the warnings of its runs, and how many runs it took."""

    verdicts: list[Verdict]
    warnings: list[Diagnosis] = field(default_factory=list)
    runs: int = 1
    first: RunResult | None = None  # the run as written (no substitution)


@lru_cache(maxsize=None)
def ancestors(tensor: str, spec: ProblemSpec = LECTURE) -> frozenset[str]:
    """The gradients ``d<tensor>`` is computed from (directly or not): those of the lines that read it
    (in the problem ``spec``, the lecture's by default).

    Example::

        "probs" in ancestors("counts")   # True: dcounts comes from dprobs (and dcounts_sum)
    """
    direct = {line.output for line in spec.consumers(tensor) if line.output in spec.order}
    return frozenset(direct.union(*(ancestors(t, spec) for t in direct)))


def _failing(v: Verdict) -> bool:
    return v.status in (FAIL, ERROR)


def _blocked(v: Verdict, run: RunResult) -> bool:
    """Not computed because another statement raised first (continuing past it will compute it)."""
    error = run.gradient_errors.get(v.tensor)
    return error is not None and error.kind in ("incomplete", "not_reached")


def grade_exercise(implementation: Implementation, exercise: str, problem: Problem, timeout: float | None) -> Graded:
    """Run ``implementation`` for ``exercise`` and grade every gradient independently (module docstring)."""
    run = implementation.run(exercise, problem, timeout)
    first = {v.tensor: v for v in verdicts_for_run(exercise, run, problem)}
    graded = Graded([first[t] for t in exercise_tensors(exercise, problem.spec)], _warnings([run]), 1, run)
    if exercise not in CASCADING or not any(_failing(v) for v in first.values()):
        return graded
    if not getattr(implementation, "supports_plans", False):
        graded.verdicts = assign_blame(graded.verdicts, run.grads, problem)
        return graded

    order = exercise_tensors(exercise, problem.spec)
    spec = problem.spec
    plan, current_run, current = Plan(), run, dict(first)
    runs, final, roots = [run], {}, {}  # roots: tensor -> the substituted own faults it depends on
    graded_on: dict[str, RunResult] = {}  # tensor -> the run its final verdict comes from

    def rerun(new_plan: Plan) -> None:
        nonlocal plan, current_run, current
        plan = new_plan
        current_run = implementation.run(exercise, problem, timeout, plan=plan)
        current = {v.tensor: v for v in verdicts_for_run(exercise, current_run, problem)}
        runs.append(current_run)

    for index, tensor in enumerate(order):
        if not _failing(first[tensor]):
            final[tensor] = first[tensor]
            continue
        stopped = current_run.error is not None and current_run.error.timeout
        if _blocked(current[tensor], current_run) and not stopped and \
                not set(current_run.failed_statements) <= plan.continue_past:
            rerun(plan.with_(continue_past=current_run.failed_statements))
        final[tensor], graded_on[tensor] = current[tensor], current_run
        roots[tensor] = [t for t in reversed(list(plan.substitute)) if t in ancestors(tensor, spec)]  # nearest first
        later = [t for t in order[index + 1:] if tensor in ancestors(t, spec)]
        if _failing(current[tensor]) and later and not stopped:
            rerun(plan.with_(substitute={tensor: problem.grads[tensor]}, continue_past=current_run.failed_statements))
            if tensor not in current_run.substituted:  # the code could not take the truth: estimate instead
                graded.verdicts = assign_blame(graded.verdicts, run.grads, problem)
                graded.runs = len(runs)
                return graded

    wrong_as_written = {t for t, v in first.items() if _failing(v)}
    for t in order:  # the local step checked on the run as written: right given the user's own upstream?
        if _failing(final[t]) and roots.get(t) and follows_upstream(t, run.grads, problem, wrong_as_written):
            final[t] = replace(first[t], status=PASS)
    graded.verdicts = [_verdict(first[t], final[t], roots.get(t, []), graded_on.get(t, run).grads, problem,
                                [ln.output for ln in spec.consumers(t) if ln.output in wrong_as_written])
                       for t in order]
    graded.warnings = _warnings(runs)
    graded.runs = len(runs)
    return graded


def _verdict(as_written: Verdict, final: Verdict, roots: list[str], grads: dict[str, Any], problem: Problem,
             upstream: list[str]) -> Verdict:
    """The reported verdict: as written when it passes; its own fault (with the most specific hint)
    when it is still wrong with the true upstream gradients; ``inherited`` when it is right then; and
    a pass when it was only not reached as written (a statement above it raised: that one is charged)."""
    if not _failing(as_written):
        return as_written
    if _failing(final):
        if final.status == FAIL and final.diagnosis.code != "reads_autograd":
            return replace(final, diagnosis=own_fault_hint(final, grads, problem))
        return final
    if not roots:
        return replace(final, details={**final.details, "as_written": as_written.diagnosis.message})
    named = ", ".join(f"d{r}" for r in roots[:3]) + (" ..." if len(roots) > 3 else "")
    via = [u for u in upstream if u not in roots]
    through = f" (through {', '.join(f'd{u}' for u in via)})" if via else ""
    fix = f"d{roots[0]}" if len(roots) == 1 else "those"
    message = (f"inherited from {named}{through}: fix {fix} first (d{as_written.tensor} is right once the "
               "gradients it is computed from are)")
    details = {**as_written.details, "inherited_from": roots[0], "roots": roots, "upstream": upstream,
               "as_written": as_written.diagnosis.code}
    return replace(as_written, status=FAIL, diagnosis=Diagnosis("inherited", message), details=details)


def _warnings(runs: list[RunResult]) -> list[Diagnosis]:
    seen: dict[tuple[str, str], Diagnosis] = {}
    for run in runs:
        for w in run.warnings:
            seen.setdefault((w.code, w.message), w)
    return list(seen.values())
