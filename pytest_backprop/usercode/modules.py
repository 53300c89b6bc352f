"""Scripts and modules: straight-line code with ``d<name>`` variables, or ``backward(cache)`` functions."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import itertools
import linecache
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from ..problems.lecture import GRADIENT_ORDER, LECTURE
from ..problems.spec import ProblemSpec

from ..problems.instance import Problem
from ..verdict import Diagnosis
from .autograd_use import trace_autograd
from .base import (
    EXERCISE_FUNCTIONS,
    EXERCISE_TARGET,
    EXERCISE_UPSTREAM,
    Implementation,
    LoadError,
    RunResult,
    SourceSpan,
    display_path,
    inject,
    namespace_for,
)
from .program import Plan, Program, UnitSource, collect, with_truths
from .run import RUNS, UserError, call_user
from .watch import forward_watch, rebinding_warnings

_counter = itertools.count()


class ScriptImplementation(Implementation):
    """Straight-line code that assigns ``d<name>`` variables, run statement by statement in a fresh
    namespace each time (see :mod:`pytest_backprop.usercode.program`)."""

    supports_plans = True

    def __init__(self, path: Path, problem_spec: ProblemSpec = LECTURE):
        self.path = path
        self.problem_spec = problem_spec
        self.description = f"script {display_path(path)}"
        try:
            self.source = path.read_text()
        except (OSError, ValueError) as exc:
            raise LoadError(f"cannot load {display_path(path)}: {exc}") from exc
        span = SourceSpan(self.source, display_path(path))
        unit = UnitSource(self.source, span, str(path))
        self.program = Program([unit], problem_spec.order)
        error = self.program.units[0].syntax_error
        if error is not None:
            raise LoadError(f"cannot load {display_path(path)}: {error.describe().replace('your code raised ', '')}")
        linecache.updatecache(str(path))

    def _is_user_file(self, filename: str) -> bool:
        return filename == str(self.path)

    def source_spans(self, exercise: str | None = None) -> list[SourceSpan]:
        return [SourceSpan(self.source, display_path(self.path))]

    def run(self, exercise: str, problem: Problem, timeout: float | None, *, plan: Plan | None = None) -> RunResult:
        namespace, handed_out, recorder = namespace_for(problem)
        plan = with_truths(plan, self.program, problem.grads)
        outcome = self.program.run(namespace, plan, timeout=timeout, locate=self._locate)
        result = collect(self.program, outcome, namespace, handed_out, recorder.recorded)
        result.warnings += rebinding_warnings(self.program, namespace, handed_out, problem.truth.values)
        trace_autograd(result, [(self.source, display_path(self.path))], tensors=problem.spec.order)
        return result


class ModuleImplementation(Implementation):
    """A module offering ``backward(cache)`` and optionally the Exercise 2 and 3 functions.

    ``backward``'s body is instrumented like a script (statement by statement, see
    :mod:`pytest_backprop.usercode.program`) when its source is available, so that an exception is
    charged to the gradient its statement assigns and a re-run can substitute true gradients.
    """

    supports_plans = True

    def __init__(self, spec: str, path: Path | None = None, problem_spec: ProblemSpec = LECTURE):
        self.spec, self.path = spec, path
        self.problem_spec = problem_spec
        self.description = f"module {display_path(path) if path else spec}"
        self.module = self._load()  # load once now, so that import errors surface early
        self._program: Program | None | bool = False

    def _load(self) -> ModuleType:
        try:
            if self.path is None:
                return importlib.import_module(self.spec)
            name = f"_backprop_user_{self.path.stem}_{next(_counter)}"
            spec = importlib.util.spec_from_file_location(name, self.path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except BaseException as exc:  # noqa: BLE001 -- user code may raise anything, SystemExit included
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise LoadError(self._locate(exc).describe()) from exc

    def _is_user_file(self, filename: str) -> bool:
        file = getattr(self, "module", None) and getattr(self.module, "__file__", None)
        return filename in {str(self.path), str(file)}

    def exercises(self) -> tuple[str, ...]:
        found = ["ex1"] if hasattr(self.module, "backward") else []
        found += [ex for ex, fn in EXERCISE_FUNCTIONS.items() if hasattr(self.module, fn)]
        return tuple(found) or ("ex1",)

    def program(self) -> Program | None:
        """``backward``'s body as a program (None when its source cannot be read or it is not a plain function)."""
        if self._program is False:
            sources = self._sources()
            plain = inspect.isfunction(getattr(self.module, "backward", None))
            self._program = backward_program(*sources[0], problem_spec=self.problem_spec) if sources and plain else None
        return self._program

    def run(self, exercise: str, problem: Problem, timeout: float | None, *, plan: Plan | None = None) -> RunResult:
        handed_out = problem.cache()
        if exercise != "ex1":
            return self._run_fused(exercise, problem, handed_out, timeout)
        fn = getattr(self.module, "backward", None)
        if fn is None:
            return RunResult({}, UserError("AttributeError", f"{self.spec} defines no backward(cache) function"))
        program = self.program()
        hook = None
        if program is not None:
            fn, hook = program.function(vars(self.module), with_truths(plan, program, problem.grads), self._locate)
        RUNS["backward"] += 1
        result, exc = call_user(lambda: fn(handed_out), timeout)
        if exc is None and not isinstance(result, Mapping):
            return RunResult({}, UserError("TypeError", f"backward(cache) returned {type(result).__name__}; "
                                                        "expected a dict {tensor name: gradient}"))
        grads, key_warnings = gradients_by_name(result or {}, problem.spec.order)
        if hook is not None:
            values = {"d" + t: v for t, v in grads.items()} if exc is None else dict(hook.outcome.frame_locals)
            run = collect(program, hook.outcome, values, {})
            if exc is None:
                run.grads.update(grads)
        else:
            run = RunResult(grads, self._locate(exc) if exc else None)
        run.warnings += key_warnings + forward_watch(handed_out, handed_out, problem.truth.values)
        trace_autograd(run, self._sources(), tensors=problem.spec.order)
        return run

    def _run_fused(self, exercise: str, problem: Problem, handed_out: dict[str, Any], timeout: float | None) -> RunResult:
        target = EXERCISE_TARGET[exercise]
        available = dict(handed_out)
        available.update(problem.globals())
        available.update({"d" + k: problem.grads[k].detach().clone() for k in EXERCISE_UPSTREAM[exercise]})
        fn = getattr(self.module, EXERCISE_FUNCTIONS[exercise])
        RUNS["backward"] += 1
        result, exc = call_user(lambda: inject(fn, available), timeout)
        run = RunResult({target: result} if exc is None else {}, self._locate(exc) if exc else None,
                        forward_watch(handed_out, handed_out, problem.truth.values))
        trace_autograd(run, self._sources())
        return run

    def source_spans(self, exercise: str | None = None) -> list[SourceSpan]:
        return [SourceSpan(text, display_path(file)) for text, file in self._sources()]

    def _sources(self) -> list[tuple[str, str]]:
        file = getattr(self.module, "__file__", None)
        try:
            return [(Path(file).read_text(), str(file))] if file else []
        except OSError:
            return []


def backward_program(text: str, file: str, *, problem_spec: ProblemSpec = LECTURE) -> Program | None:
    """The body of the ``backward`` function defined in ``text`` as a program, analysed and compiled
    without running anything (None when there is no such function).

    Example::

        backward_program("def backward(cache):\n    dprobs = -cache['probs']\n    return {'probs': dprobs}", "m.py")
    """
    unit = UnitSource(text, SourceSpan(text, display_path(file)), file, function="backward")
    program = Program([unit], problem_spec.order, extra_names=returned_names(text, "backward", problem_spec.order))
    return program if program.statements and program.units[0].code is not None else None


def returned_names(source: str, function: str, tensors: tuple[str, ...] = GRADIENT_ORDER) -> dict[str, str]:
    """``{variable: tensor}`` from the dict literal a function returns (``return {"probs": dP, ...}``).

    Example::

        returned_names("def backward(c):\n    return {'probs': dP}", "backward")   # {'dP': 'probs'}
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function), None)
    out: dict[str, str] = {}
    for node in ast.walk(fn) if fn is not None else ():
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(value, ast.Name):
                    name = key.value[1:] if key.value not in tensors and key.value[1:] in tensors else key.value
                    if name in tensors:
                        out[value.id] = name
    return out


def gradients_by_name(result: Mapping[Any, Any], tensors: tuple[str, ...] = GRADIENT_ORDER
                      ) -> tuple[dict[str, Any], list[Diagnosis]]:
    """The gradients in what ``backward(cache)`` returned, keyed ``probs`` or ``dprobs``; a warning
    (with a did-you-mean) for every key that names no tensor of the forward pass (``tensors``: the
    problem's gradient names, the lecture's by default)."""
    import difflib

    grads: dict[str, Any] = {}
    warnings: list[Diagnosis] = []
    for key, value in result.items():
        name = key[1:] if isinstance(key, str) and key not in tensors and key[1:] in tensors else key
        if name in tensors:
            grads[name] = value
            continue
        close = difflib.get_close_matches(str(key), tensors, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        warnings.append(Diagnosis("unknown_key", f"backward(cache) returned a gradient under {key!r}, which is no "
                                                 f"tensor of the forward pass{hint}; it was not checked"))
    return grads, warnings


