"""Scripts and modules: straight-line code with ``d<name>`` variables, or ``backward(cache)`` functions."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from reference_model.model import GRADIENT_ORDER

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
    forward_watch,
    inject,
    run_code,
)
from .run import UserError, call_user

_counter = itertools.count()


class ScriptImplementation(Implementation):
    """Straight-line code that assigns ``d<name>`` variables, run in a fresh namespace each time."""

    def __init__(self, path: Path):
        self.path = path
        self.description = f"script {path}"
        try:
            self.source = path.read_text()
            self.code = compile(self.source, str(path), "exec")
        except (OSError, SyntaxError, ValueError) as exc:
            raise LoadError(f"cannot load {path}: {exc}") from exc
        import linecache

        linecache.updatecache(str(path))

    def _is_user_file(self, filename: str) -> bool:
        return filename == str(self.path)

    def source_spans(self) -> list[SourceSpan]:
        return [SourceSpan(self.source, display_path(self.path))]

    def run(self, exercise: str, problem: Problem, timeout: float | None) -> RunResult:
        result = run_code(self.code, problem, timeout, self._locate)
        trace_autograd(result, [(self.source, str(self.path))])
        return result


class ModuleImplementation(Implementation):
    """A module offering ``backward(cache)`` and optionally the Exercise 2 and 3 functions."""

    def __init__(self, spec: str, path: Path | None = None):
        self.spec, self.path = spec, path
        self.description = f"module {spec}"
        self.module = self._load()  # load once now, so that import errors surface early

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

    def run(self, exercise: str, problem: Problem, timeout: float | None) -> RunResult:
        handed_out = problem.cache()
        if exercise == "ex1":
            fn = getattr(self.module, "backward", None)
            if fn is None:
                return RunResult({}, UserError("AttributeError", f"{self.spec} defines no backward(cache) function"))
            result, exc = call_user(lambda: fn(handed_out), timeout)
            if exc is None and not isinstance(result, Mapping):
                return RunResult({}, UserError("TypeError", f"backward(cache) returned {type(result).__name__}; "
                                                            "expected a dict {tensor name: gradient}"))
            grads, key_warnings = gradients_by_name(result or {})
        else:
            key_warnings = []
            target = EXERCISE_TARGET[exercise]
            available = dict(handed_out)
            available.update(problem.globals())
            available.update({"d" + k: problem.grads[k].detach().clone() for k in EXERCISE_UPSTREAM[exercise]})
            fn = getattr(self.module, EXERCISE_FUNCTIONS[exercise])
            result, exc = call_user(lambda: inject(fn, available), timeout)
            grads = {target: result} if exc is None else {}
        warnings = key_warnings + forward_watch(handed_out, handed_out, problem.truth.values)
        run = RunResult(grads, self._locate(exc) if exc else None, warnings)
        trace_autograd(run, self._sources())
        return run

    def source_spans(self) -> list[SourceSpan]:
        return [SourceSpan(text, display_path(file)) for text, file in self._sources()]

    def _sources(self) -> list[tuple[str, str]]:
        file = getattr(self.module, "__file__", None)
        try:
            return [(Path(file).read_text(), str(file))] if file else []
        except OSError:
            return []


def gradients_by_name(result: Mapping[Any, Any]) -> tuple[dict[str, Any], list[Diagnosis]]:
    """The gradients in what ``backward(cache)`` returned, keyed ``probs`` or ``dprobs``; a warning
    (with a did-you-mean) for every key that names no tensor of the forward pass."""
    import difflib

    grads: dict[str, Any] = {}
    warnings: list[Diagnosis] = []
    for key, value in result.items():
        name = key[1:] if isinstance(key, str) and key not in GRADIENT_ORDER and key[1:] in GRADIENT_ORDER else key
        if name in GRADIENT_ORDER:
            grads[name] = value
            continue
        close = difflib.get_close_matches(str(key), GRADIENT_ORDER, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        warnings.append(Diagnosis("unknown_key", f"backward(cache) returned a gradient under {key!r}, which is no "
                                                 f"tensor of the forward pass{hint}; it was not checked"))
    return grads, warnings


