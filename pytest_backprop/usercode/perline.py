"""Per-line backward functions: check each line of the forward pass on its own, and chain them.

A per-line implementation is a module with functions ``backward_<output>`` for lines of
:data:`pytest_backprop.problems.lecture.LINES`, e.g. ``backward_probs(dprobs, counts, counts_sum_inv)``.
Arguments are injected by parameter name (like pytest fixtures) from: the upstream gradient
``d<output>``, the line's inputs, its output, and the constants ``n``, ``Xb``, ``Yb``. A function
returns ``{input name: contribution}`` (keys ``counts`` or ``dcounts`` both work), or a bare tensor
when the line has one differentiable input. See :mod:`reference_model.backward_lines`.

Public API (small on purpose; :mod:`pytest_backprop.judge.lines` and :mod:`pytest_backprop.properties` build on it):

- ``line_functions(source) -> {output: fn}``: the ``backward_<output>`` functions of a module,
  a dict or any object, for outputs that are lines of the table.
- ``call_line(fn, line, values, upstream) -> {input: contribution}``: inject, call, normalize and
  validate the answer; raises :class:`LineAnswerError` (a ``TypeError``) with a clear message.
- ``random_upstream(line, values, seed=0) -> Tensor``: a random normal upstream gradient of the
  output's shape and dtype. Never ones, never the true one: for ``logit_maxes`` the true upstream
  is ~0 and would hide a wrong routing.
- ``answer_line(fn, line, values, upstream, timeout) -> (answers, error)``: one call, never raising
  for user errors (judged by :func:`pytest_backprop.judge.lines.check_line`).
- ``chain(functions, values, *, timeout=None) -> RunResult``: the full backward from ``dloss = 1``,
  lines in reverse order, accumulating the contributions of tensors read by two lines. A tensor
  gets a gradient only when every line that reads it contributed. The result is checked like any
  implementation's (``checks.verdicts_for_run("ex1", result, problem)``).

Example::

    from reference_model import backward_lines
    from pytest_backprop.problems.lecture import LINE_OF
    fns = line_functions(backward_lines)
    check = check_line(fns["probs"], LINE_OF["probs"], problem.truth.values)
    assert check.passed, check.message()
    run = chain(fns, problem.truth.values)      # run.grads["counts"] sums both branches
"""

from __future__ import annotations

import linecache
import time
import zlib
from typing import Any, Callable, Mapping

import torch

from ..problems.lecture import LECTURE, LINES
from ..problems.spec import ProblemSpec
from ..problems.table import Line

from .autograd_use import trace_autograd
from .base import Implementation, RunResult, SourceSpan, inject
from .run import RUNS, UserError, call_user, describe_type, locate

PREFIX = "backward_"
#: The exercise name of per-line checks (items ``backprop::lines::<output>``).
EXERCISE = "lines"


class LineAnswerError(TypeError):
    """A per-line function returned something the kit cannot use (wrong type or keys)."""


def line_functions(source: Any, spec: ProblemSpec = LECTURE) -> dict[str, Callable[..., Any]]:
    """The ``backward_<output>`` callables of ``source`` (module, dict or object), keyed by output,
    for the lines of the problem ``spec`` (the lecture's by default).

    Example::

        line_functions(reference_model.backward_lines)["probs"].__name__   # 'backward_probs'
    """
    items = source.items() if isinstance(source, Mapping) else ((k, getattr(source, k, None)) for k in dir(source))
    found = {}
    for name, fn in items:
        if isinstance(name, str) and name.startswith(PREFIX) and callable(fn) and name[len(PREFIX):] in spec.line_of:
            found[name[len(PREFIX):]] = fn
    return {line.output: found[line.output] for line in spec.lines if line.output in found}


def _fresh(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def injectable(line: Line, values: Mapping[str, Any], upstream: Any) -> dict[str, Any]:
    """What a per-line function may ask for: fresh copies of the inputs, output and constants (those the
    line reads, and the lecture's n, Xb, Yb), and ``d<output>``.

    Example::

        injectable(LINE_OF["h"], values, dh).keys()   # hpreact, h, n, Xb, Yb, dh
    """
    names = (*line.inputs, line.output, *line.constants, "n", "Xb", "Yb")
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
    outputs = [l.output for l in LINES]
    index = outputs.index(line.output) if line.output in outputs else zlib.crc32(line.output.encode()) % 1_000_000
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + index)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _user_locator(fn: Callable[..., Any]) -> Callable[[BaseException], UserError]:
    filename = getattr(getattr(fn, "__code__", None), "co_filename", None)
    return lambda exc: locate(exc, lambda f: f == filename, lambda f, l: linecache.getline(f, l) or None)


def answer_line(fn: Callable[..., Any] | None, line: Line, values: Mapping[str, Any], upstream: torch.Tensor,
                timeout: float | None = None) -> tuple[dict[str, Any] | None, UserError | None]:
    """Run one per-line function on ``upstream``: (answers, None), (None, error), or (None, None) without fn.

    Example::

        answers, error = answer_line(backward_lines.backward_h, LINE_OF["h"], values, dh)
    """
    if fn is None:
        return None, None
    RUNS["line"] += 1
    answers, exc = call_user(lambda: call_line(fn, line, values, upstream), timeout)
    if exc is None:
        return answers, None
    if isinstance(exc, LineAnswerError):
        return None, UserError("TypeError", str(exc))
    return None, _user_locator(fn)(exc)


def _accumulate(total: Any, part: Any) -> Any:
    if total is None:
        return part
    if isinstance(total, torch.Tensor) and isinstance(part, torch.Tensor) and total.shape == part.shape \
            and total.dtype == part.dtype:
        return total + part
    # Incompatible contributions: keep the odd one out, so the verdict names its type or shape.
    return total if not isinstance(total, torch.Tensor) or (isinstance(part, torch.Tensor) and total.shape != part.shape) else part


def chain(functions: Mapping[str, Callable[..., Any]], values: Mapping[str, Any], *,
          timeout: float | None = None, substitute: Mapping[str, Any] | None = None,
          lines: tuple[Line, ...] = LINES) -> RunResult:
    """The full backward from per-line functions: ``dloss = 1``, then every line of ``lines`` (the
    lecture's by default) in reverse order.

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
    substitute = substitute or {}
    used: set[str] = set()
    for line in reversed(lines):
        if line.output in substitute:  # independent grading: the true gradient flows on from here
            partial[line.output] = substitute[line.output].detach().clone()
            broken.discard(line.output)
            used.add(line.output)
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
    return RunResult(grads, error, substituted=frozenset(used))


class LinesImplementation(Implementation):
    """A module of ``backward_<output>`` functions: per-line checks (``lines``) and the chain as Exercise 1.

    Wraps the module's :class:`~pytest_backprop.loaders.ModuleImplementation`, which still answers
    Exercises 2 and 3 when the module defines their functions.

    Example::

        impl = load_implementation("reference_model.backward_lines", rootdir)
        impl.exercises()   # ('ex1', 'lines')
    """

    supports_plans = True

    def __init__(self, module_impl: Any, problem_spec: ProblemSpec = LECTURE):
        self.inner = module_impl
        self.module = module_impl.module
        self.description = f"per-line module {module_impl.spec}"
        self.problem_spec = problem_spec
        self.functions = line_functions(self.module, problem_spec)

    def exercises(self) -> tuple[str, ...]:
        return ("ex1", *(ex for ex in self.inner.exercises() if ex in ("ex2", "ex3")), EXERCISE)

    def source_spans(self, exercise: str | None = None) -> list[SourceSpan]:
        return self.inner.source_spans(exercise)

    def line_answers(self, problem: Any, timeout: float | None) -> dict[str, tuple[Any, UserError | None]]:
        """Every line's answer to its random upstream (what ``verdicts`` judges; sent back by --backprop-isolate)."""
        values = problem.truth.values
        deadline = time.monotonic() + timeout if timeout else None
        out = {}
        for line in reversed(problem.spec.lines):
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            out[line.output] = answer_line(self.functions.get(line.output), line, values,
                                           random_upstream(line, values), remaining)
        return out

    def run(self, exercise: str, problem: Any, timeout: float | None, *, plan: Any = None) -> RunResult:
        if exercise != "ex1":
            return self.inner.run(exercise, problem, timeout)
        substitute = plan.substitute if plan is not None else None
        result = chain(self.functions, problem.cache(), timeout=timeout, substitute=substitute,
                       lines=problem.spec.lines)
        trace_autograd(result, self.inner._sources(), tensors=problem.spec.order)
        return result
