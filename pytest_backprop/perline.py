"""Per-line backward functions: check each line of the forward pass on its own, and chain them.

A per-line implementation is a module with functions ``backward_<output>`` for lines of
:data:`reference_model.model.LINES`, e.g. ``backward_probs(dprobs, counts, counts_sum_inv)``.
Arguments are injected by parameter name (like pytest fixtures) from: the upstream gradient
``d<output>``, the line's inputs, its output, and the constants ``n``, ``Xb``, ``Yb``. A function
returns ``{input name: contribution}`` (keys ``counts`` or ``dcounts`` both work), or a bare tensor
when the line has one differentiable input. See :mod:`reference_model.backward_lines`.

Public API (small on purpose; :mod:`pytest_backprop.properties` builds on it):

- ``line_functions(source) -> {output: fn}``: the ``backward_<output>`` functions of a module,
  a dict or any object, for outputs that are lines of the table.
- ``call_line(fn, line, values, upstream) -> {input: contribution}``: inject, call, normalize and
  validate the answer; raises :class:`LineAnswerError` (a ``TypeError``) with a clear message.
- ``random_upstream(line, values, seed=0) -> Tensor``: a random normal upstream gradient of the
  output's shape and dtype. Never ones, never the true one: for ``logit_maxes`` the true upstream
  is ~0 and would hide a wrong routing.
- ``check_line(fn, line, values, upstream=None, *, seed=0, timeout=None) -> LineCheck``: call ``fn``
  with a random upstream and compare every contribution with autograd's vector-Jacobian product
  of the line (:func:`reference_model.model.line_vjp`) under the tolerance rule (float64 VJP as
  truth). ``LineCheck.passed``, ``.message()``, ``.verdict()``. Never raises for user errors.
- ``chain(functions, values, *, timeout=None) -> RunResult``: the full backward from ``dloss = 1``,
  lines in reverse order, accumulating the contributions of tensors read by two lines. A tensor
  gets a gradient only when every line that reads it contributed. The result is checked like any
  implementation's (``checks.verdicts_for_run("ex1", result, problem)``).

Example::

    from reference_model import backward_lines
    from reference_model.model import LINE_OF
    fns = line_functions(backward_lines)
    check = check_line(fns["probs"], LINE_OF["probs"], problem.truth.values)
    assert check.passed, check.message()
    run = chain(fns, problem.truth.values)      # run.grads["counts"] sums both branches
"""

from __future__ import annotations

import linecache
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from reference_model.model import LINE_OF, LINES, Line, line_vjp

from .compare import Comparison, compare, describe_type
from .diagnose import diagnose
from .loaders import Implementation, RunResult, inject, trace_autograd
from .tolerance import Reference, attach, derive
from .usercode import UserError, call_user, locate
from .verdict import ERROR, FAIL, PASS, SKIP, Diagnosis, Verdict

PREFIX = "backward_"
#: The exercise name of per-line checks (items ``backprop::lines::<output>``).
EXERCISE = "lines"


class LineAnswerError(TypeError):
    """A per-line function returned something the kit cannot use (wrong type or keys)."""


def line_functions(source: Any) -> dict[str, Callable[..., Any]]:
    """The ``backward_<output>`` callables of ``source`` (module, dict or object), keyed by output.

    Example::

        line_functions(reference_model.backward_lines)["probs"].__name__   # 'backward_probs'
    """
    items = source.items() if isinstance(source, Mapping) else ((k, getattr(source, k, None)) for k in dir(source))
    found = {}
    for name, fn in items:
        if isinstance(name, str) and name.startswith(PREFIX) and callable(fn) and name[len(PREFIX):] in LINE_OF:
            found[name[len(PREFIX):]] = fn
    return {line.output: found[line.output] for line in LINES if line.output in found}


def _fresh(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def injectable(line: Line, values: Mapping[str, Any], upstream: Any) -> dict[str, Any]:
    """What a per-line function may ask for: fresh copies of the inputs, output and constants, and ``d<output>``.

    Example::

        injectable(LINE_OF["h"], values, dh).keys()   # hpreact, h, n, Xb, Yb, dh
    """
    names = (*line.inputs, line.output, "n", "Xb", "Yb")
    available = {k: _fresh(values[k]) for k in names if k in values}
    if "n" not in available and "Xb" in values:
        available["n"] = int(values["Xb"].shape[0])
    available["d" + line.output] = _fresh(upstream)
    return available


def _normalize(fn_name: str, line: Line, result: Any) -> dict[str, Any]:
    inputs = ", ".join(line.inputs)
    if isinstance(result, Mapping):
        out: dict[str, Any] = {}
        for key, value in result.items():
            name = key[1:] if isinstance(key, str) and key not in line.inputs and key[1:] in line.inputs and key.startswith("d") else key
            if name not in line.inputs:
                raise LineAnswerError(f"{fn_name}() returned a contribution for {key!r}, which `{line.source}` does not "
                                      f"read; its differentiable inputs are: {inputs}")
            out[name] = value
        return out
    if isinstance(result, torch.Tensor):
        if len(line.inputs) != 1:
            raise LineAnswerError(f"{fn_name}() returned a bare tensor, but `{line.source}` has {len(line.inputs)} "
                                  f"differentiable inputs ({inputs}): return a dict {{input name: contribution}}")
        return {line.inputs[0]: result}
    if isinstance(result, (tuple, list)) and len(result) == len(line.inputs) and len(line.inputs) > 1:
        raise LineAnswerError(f"{fn_name}() returned a {type(result).__name__}; return a dict keyed by input name "
                              f"instead, e.g. {{{', '.join(repr(i) + ': ...' for i in line.inputs)}}}")
    expected = "a tensor" if len(line.inputs) == 1 else "a dict {input name: contribution}"
    raise LineAnswerError(f"{fn_name}() returned {describe_type(result)}; expected {expected} "
                          f"(the gradient contribution{'s' if len(line.inputs) > 1 else ''} to {inputs})")


def call_line(fn: Callable[..., Any], line: Line, values: Mapping[str, Any], upstream: Any) -> dict[str, Any]:
    """Call a per-line function with injected arguments; return ``{input: contribution}``.

    Raises :class:`LineAnswerError` when the answer has the wrong form; exceptions of ``fn`` propagate.

    Example::

        call_line(backward_lines.backward_h, LINE_OF["h"], values, dh)   # {'hpreact': ...}
    """
    result = inject(fn, injectable(line, values, upstream))
    return _normalize(getattr(fn, "__name__", PREFIX + line.output), line, result)


def random_upstream(line: Line, values: Mapping[str, Any], seed: int = 0) -> torch.Tensor:
    """A standard-normal upstream gradient shaped like ``line.output`` (seeded per line).

    Example::

        random_upstream(LINE_OF["logit_maxes"], values).shape   # (32, 1)
    """
    like = values[line.output] if line.output in values else None
    shape = tuple(like.shape) if like is not None else ()
    dtype = like.dtype if like is not None else torch.float32
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + [l.output for l in LINES].index(line.output))
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


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


def _user_locator(fn: Callable[..., Any]) -> Callable[[BaseException], UserError]:
    filename = getattr(getattr(fn, "__code__", None), "co_filename", None)
    return lambda exc: locate(exc, lambda f: f == filename, lambda f, l: linecache.getline(f, l) or None)


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


def answer_line(fn: Callable[..., Any] | None, line: Line, values: Mapping[str, Any], upstream: torch.Tensor,
                timeout: float | None = None) -> tuple[dict[str, Any] | None, UserError | None]:
    """Run one per-line function on ``upstream``: (answers, None), (None, error), or (None, None) without fn.

    Example::

        answers, error = answer_line(backward_lines.backward_h, LINE_OF["h"], values, dh)
    """
    if fn is None:
        return None, None
    answers, exc = call_user(lambda: call_line(fn, line, values, upstream), timeout)
    if exc is None:
        return answers, None
    if isinstance(exc, LineAnswerError):
        return None, UserError("TypeError", str(exc))
    return None, _user_locator(fn)(exc)


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


def _accumulate(total: Any, part: Any) -> Any:
    if total is None:
        return part
    if isinstance(total, torch.Tensor) and isinstance(part, torch.Tensor) and total.shape == part.shape \
            and total.dtype == part.dtype:
        return total + part
    # Incompatible contributions: keep the odd one out, so the verdict names its type or shape.
    return total if not isinstance(total, torch.Tensor) or (isinstance(part, torch.Tensor) and total.shape != part.shape) else part


def chain(functions: Mapping[str, Callable[..., Any]], values: Mapping[str, Any], *,
          timeout: float | None = None) -> RunResult:
    """The full backward from per-line functions: ``dloss = 1``, then every line in reverse order.

    A tensor read by two lines (counts, logits, bndiff, hprebn) gets the sum of both contributions;
    it gets a gradient only when every line that reads it contributed. The first exception becomes
    ``RunResult.error``; lines that do not depend on the failing one still run. ``timeout`` bounds
    the whole chain.

    Example::

        run = chain(line_functions(backward_lines), problem.truth.values)
        sorted(run.grads) == sorted(GRADIENT_ORDER)   # True
    """
    loss = values.get("loss")
    dtype = loss.dtype if isinstance(loss, torch.Tensor) else torch.float32
    partial: dict[str, Any] = {"loss": torch.ones((), dtype=dtype)}
    broken: set[str] = set()
    error: UserError | None = None
    deadline = time.monotonic() + timeout if timeout else None
    for line in reversed(LINES):
        if line.output in broken or line.output not in partial or line.output not in functions:
            broken.update(line.inputs)
            continue
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            error = error or UserError("Timeout", f"still running after {timeout:g} s (--backprop-timeout)", timeout=True)
            break
        answers, err = answer_line(functions[line.output], line, values, partial[line.output], remaining)
        if err is not None:
            error = error or err
            broken.update(line.inputs)
            if err.timeout:
                break
            continue
        for name in line.inputs:
            if name in answers:
                partial[name] = _accumulate(partial.get(name), answers[name])
            else:
                broken.add(name)
    grads = {k: v for k, v in partial.items() if k != "loss" and k not in broken}
    return RunResult(grads, error)


def line_verdicts(functions: Mapping[str, Callable[..., Any]], values: Mapping[str, Any], *, seed: int = 0,
                  timeout: float | None = None) -> list[Verdict]:
    """One verdict per line of the table (backward order): ``check_line`` for each, skipped when absent.

    Example::

        [v.status for v in line_verdicts(line_functions(backward_lines), values)]   # 20 x 'pass'
    """
    return [check_line(functions.get(line.output), line, values, seed=seed, timeout=timeout).verdict()
            for line in reversed(LINES)]


class LinesImplementation(Implementation):
    """A module of ``backward_<output>`` functions: per-line checks (``lines``) and the chain as Exercise 1.

    Wraps the module's :class:`~pytest_backprop.loaders.ModuleImplementation`, which still answers
    Exercises 2 and 3 when the module defines their functions.

    Example::

        impl = load_implementation("reference_model.backward_lines", rootdir)
        impl.exercises()   # ('ex1', 'lines')
    """

    def __init__(self, module_impl: Any):
        self.inner = module_impl
        self.module = module_impl.module
        self.description = f"per-line module {module_impl.spec}"
        self.functions = line_functions(self.module)

    def exercises(self) -> tuple[str, ...]:
        return ("ex1", *(ex for ex in self.inner.exercises() if ex in ("ex2", "ex3")), EXERCISE)

    def line_answers(self, problem: Any, timeout: float | None) -> dict[str, tuple[Any, UserError | None]]:
        """Every line's answer to its random upstream (what ``verdicts`` judges; sent back by --backprop-isolate)."""
        values = problem.truth.values
        deadline = time.monotonic() + timeout if timeout else None
        out = {}
        for line in reversed(LINES):
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            out[line.output] = answer_line(self.functions.get(line.output), line, values,
                                           random_upstream(line, values), remaining)
        return out

    def verdicts(self, exercise: str, problem: Any, timeout: float | None) -> list[Verdict] | None:
        if exercise != EXERCISE:
            return None
        return judge_answers(self.line_answers(problem, timeout), problem)

    def run(self, exercise: str, problem: Any, timeout: float | None) -> RunResult:
        if exercise != "ex1":
            return self.inner.run(exercise, problem, timeout)
        result = chain(self.functions, problem.cache(), timeout=timeout)
        trace_autograd(result, self.inner._sources())
        return result


def judge_answers(answers: Mapping[str, tuple[Any, UserError | None]], problem: Any) -> list[Verdict]:
    """Verdicts for per-line answers computed by :meth:`LinesImplementation.line_answers`.

    Example::

        verdicts = judge_answers(impl.line_answers(problem, 60), problem)
    """
    values = problem.truth.values
    verdicts = []
    for line in reversed(LINES):
        ans, err = answers.get(line.output, (None, None))
        verdicts.append(judge_line(line, values, random_upstream(line, values), ans, err).verdict())
    return verdicts
