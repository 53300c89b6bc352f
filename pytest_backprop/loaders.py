"""Implementations: turn a user's script or module into gradients, one fresh run at a time.

Forms (``--backprop-impl``):

- a **script** (``.py`` of straight-line code using the lecture's names): run in a fresh namespace
  holding copies of the forward tensors; the kit reads back ``d<name>`` variables and the student's
  own ``cmp(name, dt, t)`` calls;
- a **module** (a dotted name, or a ``.py`` file that defines ``backward``): ``backward(cache)``
  returns ``{name: gradient}``; optional ``cross_entropy_backward(...)`` (Exercise 2) and
  ``batchnorm_backward(...)`` (Exercise 3) get their arguments injected by parameter name.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import itertools
import linecache
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from reference_model.model import CONSTANTS, GRADIENT_ORDER

from .problem import Problem
from .usercode import UserError, call_user, locate
from .verdict import Diagnosis

EXERCISE_FUNCTIONS = {"ex2": "cross_entropy_backward", "ex3": "batchnorm_backward"}
#: What each exercise's answer is the gradient of, and which true upstream gradients it may use.
EXERCISE_TARGET = {"ex1": None, "ex2": "logits", "ex3": "hprebn"}
_counter = itertools.count()


class LoadError(Exception):
    """The implementation cannot be found or loaded at all (bad path, syntax or import error)."""


@dataclass
class RunResult:
    """What one run of user code produced: gradients by tensor name, an error, warnings."""

    grads: dict[str, Any]
    error: UserError | None = None
    warnings: list[Diagnosis] = field(default_factory=list)


class CmpRecorder:
    """The namespace's ``cmp(name, dt, t)``: records which forward tensor each answer is for.

    ``t`` is recognised by identity among the tensors the kit handed out, so renamed gradients
    (``cmp('logprobs', dL_dlogprobs, logprobs)``) are checked through the student's own calls.
    """

    def __init__(self, handed_out: Mapping[str, Any]):
        self._by_id = {id(v): k for k, v in handed_out.items() if isinstance(v, torch.Tensor)}
        self.recorded: dict[str, Any] = {}

    def __call__(self, s: str, dt: Any, t: Any = None) -> None:
        name = self._by_id.get(id(t)) or (s.strip() if isinstance(s, str) else None)
        if name in GRADIENT_ORDER:
            self.recorded[name] = dt


def forward_watch(handed_out: Mapping[str, Any], namespace: Mapping[str, Any], originals: Mapping[str, Any]) -> list[Diagnosis]:
    """Warnings about the user's code changing what it was given: rebinding names, in-place edits."""
    warnings: list[Diagnosis] = []
    for name, given in handed_out.items():
        if name in namespace and namespace[name] is not given and name in (*CONSTANTS, *GRADIENT_ORDER):
            warnings.append(Diagnosis("reassigned_name",
                                      f"your code rebinds `{name}` (e.g. `for {name} in range(...)`); later lines that "
                                      f"use `{name}` see your value, not the forward pass's"))
        if isinstance(given, torch.Tensor) and not torch.equal(given, originals[name]):
            warnings.append(Diagnosis("mutated_input",
                                      f"your code modified `{name}` in place; the kit's own copy is unaffected, but "
                                      "lines of yours that read it afterwards saw the modified values"))
    return warnings


def inject(fn: Callable[..., Any], available: Mapping[str, Any]) -> Any:
    """Call ``fn`` with arguments taken by parameter name from ``available`` (like pytest fixtures)."""
    kwargs = {}
    for pname, param in inspect.signature(fn).parameters.items():
        if pname in available:
            kwargs[pname] = available[pname]
        elif param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{fn.__name__}() asks for `{pname}`, which the kit cannot supply; "
                            f"available: {', '.join(sorted(k for k in available if not k.startswith('_')))}")
    return fn(**kwargs)


class Implementation:
    """Base class: a named source of gradients. Subclasses implement :meth:`run`."""

    description: str = "?"

    def exercises(self) -> tuple[str, ...]:
        """The exercises this implementation answers, e.g. ``("ex1", "ex2", "ex3")``."""
        return ("ex1",)

    def run(self, exercise: str, problem: Problem, timeout: float | None) -> RunResult:  # pragma: no cover
        raise NotImplementedError

    def _is_user_file(self, filename: str) -> bool:
        return False

    def _locate(self, exc: BaseException) -> UserError:
        return locate(exc, self._is_user_file, lambda f, l: linecache.getline(f, l) or None)


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
        linecache.updatecache(str(path))

    def _is_user_file(self, filename: str) -> bool:
        return filename == str(self.path)

    def run(self, exercise: str, problem: Problem, timeout: float | None) -> RunResult:
        return run_code(self.code, problem, timeout, self._locate)


def namespace_for(problem: Problem) -> tuple[dict[str, Any], dict[str, Any], CmpRecorder]:
    """A fresh namespace for user code: copies of the forward values, constants, globals, ``cmp``."""
    handed_out = problem.cache()
    recorder = CmpRecorder(handed_out)
    namespace: dict[str, Any] = {"__name__": "__backprop__", "torch": torch, "F": F, "cmp": recorder}
    namespace.update(problem.globals())
    namespace.update(handed_out)
    return namespace, handed_out, recorder


def run_code(code: Any, problem: Problem, timeout: float | None, locate_error: Callable[[BaseException], UserError]) -> RunResult:
    """Execute compiled user code in a fresh namespace and collect its gradients."""
    namespace, handed_out, recorder = namespace_for(problem)
    _, exc = call_user(lambda: exec(code, namespace), timeout)
    grads = {name: namespace["d" + name] for name in GRADIENT_ORDER if "d" + name in namespace}
    grads.update(recorder.recorded)
    warnings = forward_watch(handed_out, namespace, problem.truth.values)
    return RunResult(grads, locate_error(exc) if exc else None, warnings)


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
            grads = {k: v for k, v in (result or {}).items() if k in GRADIENT_ORDER}
        else:
            target = EXERCISE_TARGET[exercise]
            available = dict(handed_out)
            available.update({"d" + k: v.clone() for k, v in problem.grads.items() if k != target})
            fn = getattr(self.module, EXERCISE_FUNCTIONS[exercise])
            result, exc = call_user(lambda: inject(fn, available), timeout)
            grads = {target: result} if exc is None else {}
        warnings = forward_watch(handed_out, handed_out, problem.truth.values)
        return RunResult(grads, self._locate(exc) if exc else None, warnings)


def defines_functions(path: Path) -> bool:
    """Whether a .py file is a module of backward functions rather than a straight-line script."""
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError:
        return False
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return "backward" in names or any(n in names for n in EXERCISE_FUNCTIONS.values()) or any(
        n.startswith("backward_") for n in names)


def load_implementation(spec: str, rootdir: Path) -> Implementation:
    """Resolve ``--backprop-impl``: a file path (script, module or notebook) or a dotted module name.

    Relative paths are tried against the current directory, then the rootdir.
    """
    candidates = [Path(spec), rootdir / spec]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if spec.endswith((".py", ".ipynb")) or "/" in spec:
            raise LoadError(f"--backprop-impl: no such file: {spec} (looked in {Path.cwd()} and {rootdir})")
        if str(rootdir) not in sys.path:
            sys.path.insert(0, str(rootdir))
        return ModuleImplementation(spec)
    path = path.resolve()
    if path.suffix == ".ipynb":
        from .notebook import NotebookImplementation  # noqa: PLC0415 -- optional form, loaded when used

        return NotebookImplementation(path)
    if defines_functions(path):
        return ModuleImplementation(spec, path)
    return ScriptImplementation(path)

