"""Judging per-line backward functions: each ``backward_<output>`` against autograd's VJP of its line.

``check_line(fn, line, values)`` calls ``fn`` (through :mod:`pytest_backprop.usercode.perline`) with a
random upstream gradient and compares every contribution with
:func:`pytest_backprop.problems.lecture.line_vjp` under the tolerance rule (float64 VJP as truth):
``LineCheck.passed``, ``.message()``, ``.verdict()``. Never raises for user errors.

Example::

    from reference_model import backward_lines
    from pytest_backprop.problems.lecture import LINE_OF
    fns = line_functions(backward_lines)
    check = check_line(fns["probs"], LINE_OF["probs"], problem.truth.values)
    assert check.passed, check.message()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..problems.forward import line_vjp
from ..problems.lecture import LINES
from ..problems.table import Line
from ..problems.tolerance import Reference, attach, derive
from ..usercode.perline import EXERCISE, PREFIX, answer_line, random_upstream
from ..usercode.run import UserError
from ..verdict import ERROR, FAIL, PASS, SKIP, Diagnosis, Verdict
from .compare import Comparison, compare
from .diagnose import diagnose, hints_for


def expected_contributions(line: Line, values: Mapping[str, Any], upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autograd's VJP of ``line`` in the run's dtype, each tensor carrying its float64 truth and tolerance.

    Example::

        expected_contributions(LINE_OF["h"], values, dh)["hpreact"]   # (1 - h**2) * dh
    """
    expected = line_vjp(line, values, upstream)
    as64 = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in values.items() if k in (*line.inputs, *line.constants)}
    truth64 = line_vjp(line, as64, upstream.double())
    for name, tensor in expected.items():
        attach(tensor, Reference(truth64[name], derive(tensor, truth64[name], tensor.dtype)))
    return expected


@dataclass
class LineCheck:
    """The outcome of checking one per-line function with one upstream gradient."""

    line: Line
    upstream: torch.Tensor
    expected: dict[str, torch.Tensor]
    answers: dict[str, Any] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    diagnoses: dict[str, Diagnosis] = field(default_factory=dict)
    error: UserError | None = None
    missing: bool = False  # no function for this line

    @property
    def passed(self) -> bool:
        """True when every input's contribution matches autograd's VJP."""
        return (not self.missing and self.error is None and len(self.diagnoses) == len(self.line.inputs)
                and all(d.code == "ok" for d in self.diagnoses.values()))

    def message(self) -> str:
        """A human summary: the error, or one line per input."""
        if self.missing:
            return f"not attempted: no {PREFIX}{self.line.output}() yet"
        if self.error is not None:
            return self.error.describe()
        parts = []
        for name in self.line.inputs:
            hint = self.diagnoses.get(name)
            if hint is None:
                parts.append(f"{name}: no contribution returned (d{name} gets one from `{self.line.source}`)")
            else:
                parts.append(f"{name}: [{hint.code}] {hint.message}")
        return (f"with a random upstream d{self.line.output}, compared with autograd's VJP of `{self.line.source}`:\n  "
                + "\n  ".join(parts))

    def verdict(self, exercise: str = EXERCISE) -> Verdict:
        """One :class:`Verdict` for the line (tensor = the line's output), details per input."""
        out_shape = tuple(self.upstream.shape)
        if self.missing:
            return Verdict(exercise, self.line.output, SKIP, None, None, None, out_shape, None,
                           Diagnosis("missing", self.message()), line=self.line.source)
        if self.error is not None:
            code = "timeout" if self.error.timeout else "exception"
            return Verdict(exercise, self.line.output, ERROR, None, None, None, out_shape, None,
                           Diagnosis(code, self.message()), line=self.line.source)
        comps = [c for c in self.comparisons.values() if c.problem is None]
        maxdiffs = [c.maxdiff for c in comps if c.maxdiff is not None]
        worst = next((n for n in self.line.inputs if self.diagnoses.get(n, Diagnosis("missing", "")).code != "ok"),
                     self.line.inputs[0])
        wc = self.comparisons.get(worst)
        code = "ok" if self.passed else self.diagnoses.get(worst, Diagnosis("missing", "")).code
        details = {"upstream": "standard normal, seeded", "inputs": {
            n: {"code": self.diagnoses[n].code if n in self.diagnoses else "missing",
                "maxdiff": _finite(self.comparisons[n].maxdiff) if n in self.comparisons else None}
            for n in self.line.inputs}}
        return Verdict(
            exercise, self.line.output, PASS if self.passed else FAIL,
            exact=all(bool(c.exact) for c in comps) and len(comps) == len(self.line.inputs),
            approximate=self.passed, maxdiff=max(maxdiffs) if maxdiffs else None,
            expected_shape=tuple(self.expected[worst].shape), actual_shape=wc.actual_shape if wc else None,
            diagnosis=Diagnosis(code, "every contribution matches autograd's VJP" if self.passed else self.message()),
            atol=wc.tolerance.atol if wc else None, line=self.line.source, details=details)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def judge_line(line: Line, values: Mapping[str, Any], upstream: torch.Tensor, answers: Mapping[str, Any] | None,
               error: UserError | None = None) -> LineCheck:
    """Compare answers already computed (e.g. in a child process) with autograd's VJP.

    Example::

        answers, error = answer_line(fn, line, values, up)   # e.g. in a child process
        check = judge_line(line, values, up, answers, error)
    """
    check = LineCheck(line, upstream, expected_contributions(line, values, upstream), error=error)
    if answers is None:
        check.missing = error is None
        return check
    check.answers = dict(answers)
    for name, value in answers.items():
        result = compare(value, check.expected[name])
        check.comparisons[name] = result
        check.diagnoses[name] = diagnose(name, result)
    return check


def check_line(fn: Callable[..., Any] | None, line: Line, values: Mapping[str, Any],
               upstream: torch.Tensor | None = None, *, seed: int = 0, timeout: float | None = None) -> LineCheck:
    """Check one per-line function against autograd's VJP for a random (or given) upstream gradient.

    ``values`` holds the forward tensors by name (at least the line's inputs, output and constants);
    they are copied before ``fn`` sees them. Never raises for a user error: see ``LineCheck.error``.

    Example::

        check = check_line(backward_lines.backward_logit_maxes, LINE_OF["logit_maxes"], values)
        check.passed    # True
    """
    if upstream is None:
        upstream = random_upstream(line, values, seed)
    answers, error = answer_line(fn, line, values, upstream, timeout)
    return judge_line(line, values, upstream, answers, error)


def line_verdicts(functions: Mapping[str, Callable[..., Any]], values: Mapping[str, Any], *, seed: int = 0,
                  timeout: float | None = None, lines: tuple[Line, ...] = LINES) -> list[Verdict]:
    """One verdict per line of the table (``lines``: the lecture's by default; backward order):
    ``check_line`` for each, skipped when absent.

    Example::

        [v.status for v in line_verdicts(line_functions(backward_lines), values)]   # 20 x 'pass'
    """
    return [check_line(functions.get(line.output), line, values, seed=seed, timeout=timeout).verdict()
            for line in reversed(lines)]


def judge_answers(answers: Mapping[str, tuple[Any, UserError | None]], problem: Any) -> list[Verdict]:
    """Verdicts for per-line answers computed by :meth:`LinesImplementation.line_answers`.

    Example::

        verdicts = judge_answers(impl.line_answers(problem, 60), problem)
    """
    values = problem.truth.values
    verdicts = []
    with hints_for(problem.spec):
        for line in reversed(problem.spec.lines):
            ans, err = answers.get(line.output, (None, None))
            verdicts.append(judge_line(line, values, random_upstream(line, values), ans, err).verdict())
    return verdicts

