"""Text renderings of the verdicts: the failing item's report, the terminal table and summary."""

from __future__ import annotations

from typing import Iterable

from ..judge.grade import first_wrong
from ..verdict import Diagnosis, Verdict

#: Exercises whose rows are single gradients (not training runs or property searches).
GRADIENT_EXERCISES = ("ex1", "ex2", "ex3", "lines")
_SYMBOL = {"pass": "ok", "fail": "FAIL", "skip": "skip", "error": "ERROR"}


def _fmt_bool(value: bool | None) -> str:
    return "-" if value is None else str(value)


def _fmt_float(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


#: Codes that say the user's code did not run to the end: the location is in their code, not the forward pass.
STOPPED = ("exception", "timeout")


def label(v: Verdict) -> str:
    """``dcounts`` for a gradient, ``ex4::sgd`` for other checks."""
    return f"d{v.tensor}" if v.exercise in GRADIENT_EXERCISES else v.key


def render_verdict(v: Verdict) -> str:
    """The failing item's report: what is wrong, where to look, and the hint."""
    if v.diagnosis.code in STOPPED:
        return f"{label(v)} was not computed [{v.diagnosis.code}]: {v.diagnosis.message}"
    lines = [f"{label(v)} [{v.diagnosis.code}]: {v.diagnosis.message}"]
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
        lines.append(f"{v.exercise:8s} {v.tensor:15s} | {_fmt_bool(v.exact):5s} | {_fmt_bool(v.approximate):11s} | "
                     f"{_fmt_float(v.maxdiff):8s} | {_SYMBOL[v.status]}{hint}")
    counts = {s: sum(v.status == s for v in rows) for s in _SYMBOL}
    lines.append(f"{len(rows)} checks: {counts['pass']} pass, {counts['fail']} fail, "
                 f"{counts['error']} error, {counts['skip']} not attempted")
    return lines




def render_summary(verdicts: list[Verdict], warnings: Iterable[Diagnosis]) -> list[str]:
    """The terminal summary: the table, the first wrong gradient with its forward line, warnings."""
    lines = render_table(verdicts)
    wrong = first_wrong(verdicts)
    if wrong is not None and wrong.diagnosis.code in STOPPED:
        lines += ["", f"your code did not finish ({wrong.exercise}) [{wrong.diagnosis.code}]:",
                  f"    {wrong.diagnosis.message}"]
    elif wrong is not None:
        lines += ["", f"first wrong gradient: {label(wrong)} ({wrong.exercise}) [{wrong.diagnosis.code}]"]
        if wrong.line:
            lines.append(f"    look at: {wrong.line}")
        lines.append(f"    {wrong.diagnosis.message}")
        others = [v for v in verdicts if v is not wrong and v.status in ("fail", "error")
                  and v.diagnosis.code != "inherited" and v.exercise in GRADIENT_EXERCISES]
        for other in others:
            lines.append(f"also wrong on its own: {label(other)} ({other.exercise}) [{other.diagnosis.code}]")
    lines += [f"warning [{w.code}]: {w.message}" for w in warnings]
    return lines
