"""Text renderings of the verdicts: the failing item's report, the terminal table and summary."""

from __future__ import annotations

from typing import Iterable

from ..verdict import Diagnosis, Verdict, first_wrong

#: Exercises whose rows are single gradients (not training runs or property searches).
GRADIENT_EXERCISES = ("ex1", "ex2", "ex3", "lines")
#: How each status is shown in a table.
SYMBOL = {"pass": "ok", "fail": "FAIL", "skip": "skip", "error": "ERROR"}


def fmt_bool(value: bool | None) -> str:
    """``True``/``False`` as the lecture's table prints them, ``-`` when not measured."""
    return "-" if value is None else str(value)


def _fmt_float(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


#: Codes that say the user's code did not run to the end: the location is in their code, not the forward pass.
STOPPED = ("exception", "timeout")


def label(v: Verdict) -> str:
    """``dcounts`` for a gradient, ``ex4::sgd`` for other checks."""
    return f"d{v.tensor}" if v.exercise in GRADIENT_EXERCISES else v.key


def your_line(v: Verdict) -> str | None:
    """``cell 9, line 5: dcounts = counts_sum_inv * dprobs`` (and the other statements assigning it), or None."""
    loc = v.location
    if loc is None:
        return None
    text = f"{loc.describe()}: {loc.source}" if loc.source else loc.describe()
    more = v.details.get("also_at") or []
    return text + "".join(f"; {m}" for m in more)


def render_verdict(v: Verdict) -> str:
    """The failing item's report: what is wrong, the student's own line, the forward line, the hint.
    An inherited failure is one line: the fix is upstream."""
    if v.diagnosis.code == "inherited":
        return f"{label(v)} [inherited]: {v.diagnosis.message}"
    mine = your_line(v)
    if v.diagnosis.code in STOPPED:
        head = f"{label(v)} was not computed [{v.diagnosis.code}]: {v.diagnosis.message}"
        return head + (f"\n    your line: {mine}" if mine and mine.split(':')[0] not in v.diagnosis.message else "")
    lines = [f"{label(v)} [{v.diagnosis.code}]: {v.diagnosis.message}"]
    if mine:
        lines.append(f"    your line: {mine}")
    if v.maxdiff is not None and v.atol is not None:
        lines.append(f"    exact: {v.exact} | approximate: {v.approximate} | maxdiff: {v.maxdiff:.3g} | atol: {v.atol:.2g}")
    if v.line:
        lines.append(f"    backprop through: {v.line}")
    return "\n".join(lines)


def render_table(verdicts: Iterable[Verdict]) -> list[str]:
    """The lecture's table (name | exact | approximate | maxdiff) plus verdict and hint code."""
    rows = list(verdicts)
    lines = [f"{'exercise':8s} {'tensor':15s} | {'exact':5s} | {'approximate':11s} | {'maxdiff':8s} | verdict"]
    lines.append("-" * len(lines[0]))
    for v in rows:
        hint = "" if v.diagnosis.code in ("ok", "missing") else f" [{v.diagnosis.code}]"
        lines.append(f"{v.exercise:8s} {v.tensor:15s} | {fmt_bool(v.exact):5s} | {fmt_bool(v.approximate):11s} | "
                     f"{_fmt_float(v.maxdiff):8s} | {SYMBOL[v.status]}{hint}")
    counts = {s: sum(v.status == s for v in rows) for s in SYMBOL}
    inherited = sum(v.status == "fail" and v.diagnosis.code == "inherited" for v in rows)
    lines.append(f"{len(rows)} checks: {counts['pass']} pass, {counts['fail']} fail ({inherited} of them inherited), "
                 f"{counts['error']} error, {counts['skip']} skipped")
    return lines


def skipped_exercises(verdicts: Iterable[Verdict]) -> list[str]:
    """One line per exercise that has no answer at all, with the reason and the fix."""
    by_exercise: dict[str, list[Verdict]] = {}
    for v in verdicts:
        if v.exercise in GRADIENT_EXERCISES:
            by_exercise.setdefault(v.exercise, []).append(v)
    out = []
    for exercise, rows in by_exercise.items():
        reasons = {v.diagnosis.message for v in rows}
        if all(v.status == "skip" for v in rows) and len(reasons) == 1 and not next(iter(reasons)).startswith("not attempted"):
            out.append(f"{exercise} skipped: {next(iter(reasons))}")
    return out


def render_summary(verdicts: list[Verdict], warnings: Iterable[Diagnosis]) -> list[str]:
    """The terminal summary: the table, the first wrong gradient with its forward line, warnings."""
    lines = render_table(verdicts)
    wrong = first_wrong(verdicts)
    if wrong is not None and wrong.diagnosis.code in STOPPED:
        lines += ["", f"your code did not finish ({wrong.exercise}) [{wrong.diagnosis.code}]:",
                  f"    {wrong.diagnosis.message}"]
    elif wrong is not None:
        lines += ["", f"first wrong gradient: {label(wrong)} ({wrong.exercise}) [{wrong.diagnosis.code}]"]
        mine = your_line(wrong)
        if mine:
            lines.append(f"    your line: {mine}")
        if wrong.line:
            lines.append(f"    backprop through: {wrong.line}")
        lines.append(f"    {wrong.diagnosis.message}")
        others = [v for v in verdicts if v is not wrong and v.status in ("fail", "error")
                  and v.diagnosis.code != "inherited" and v.exercise in GRADIENT_EXERCISES]
        for other in others:
            lines.append(f"also wrong on its own: {label(other)} ({other.exercise}) [{other.diagnosis.code}]")
    skipped = skipped_exercises(verdicts)
    if skipped:
        lines += ["", *skipped]
    lines += [f"warning [{w.code}]: {w.message}" for w in warnings]
    return lines
