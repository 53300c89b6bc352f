"""Implementations: turn a user's script or module into gradients, one fresh run at a time.

Forms (``--backprop-impl``):

- a **script** (``.py`` of straight-line code using the lecture's names): run in a fresh namespace
  holding copies of the forward tensors; the kit reads back ``d<name>`` variables and the student's
  own ``cmp(name, dt, t)`` calls;
- a **module** (a dotted name, or a ``.py`` file that defines ``backward``): ``backward(cache)``
  returns ``{name: gradient}``; optional ``cross_entropy_backward(...)`` (Exercise 2) and
  ``batchnorm_backward(...)`` (Exercise 3) get their arguments injected by parameter name;
- a **per-line module** (defines ``backward_<output>`` functions and no ``backward``): each line is
  checked on its own (exercise ``lines``) and the chained full backward is Exercise 1 (see
  :mod:`pytest_backprop.perline`);
- a **notebook** (``.ipynb``), or a script split into cells by ``# %%`` markers: each exercise runs
  only its own cells, see :mod:`pytest_backprop.notebook`.

Every run gets a fresh namespace and fresh copies of the forward values (detached, without
``.grad``), so one run cannot affect another or the kit's truth. Answers copied from autograd
(``dhpreact = hpreact.grad``) are traced in the user's source and get the ``reads_autograd``
verdict. This is not a sandbox: see :mod:`pytest_backprop.isolate` (``--backprop-isolate``).
"""

from __future__ import annotations

import ast
import functools
import re
import importlib
import importlib.util
import inspect
import itertools
import linecache
import sys
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
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
#: True gradients handed to Exercises 2 and 3 (only those upstream of the part to derive in one go).
EXERCISE_UPSTREAM = {"ex2": (), "ex3": GRADIENT_ORDER[:GRADIENT_ORDER.index("hpreact") + 1]}
_counter = itertools.count()


class LoadError(Exception):
    """The implementation cannot be found or loaded at all (bad path, syntax or import error)."""


@dataclass
class RunResult:
    """What one run of user code produced: gradients by tensor name, an error, warnings."""

    grads: dict[str, Any]
    error: UserError | None = None
    warnings: list[Diagnosis] = field(default_factory=list)
    #: Verdict overrides by tensor name (e.g. ``reads_autograd``): the answer fails with this hint.
    overrides: dict[str, Diagnosis] = field(default_factory=dict)


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
    """Warnings about the user's code changing what it was given: rebinding names, in-place edits.

    Example::

        warnings = forward_watch(handed_out, namespace, problem.truth.values)
        [w.code for w in warnings]   # e.g. ['reassigned_name'] after `for n in range(3)`
    """
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
    """Call ``fn`` with arguments taken by parameter name from ``available`` (like pytest fixtures).

    Example::

        inject(lambda logits, Yb: logits.shape, {"logits": logits, "Yb": Yb, "n": 32})   # (32, 27)
    """
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

    def verdicts(self, exercise: str, problem: Problem, timeout: float | None) -> list[Any] | None:
        """Verdicts for an exercise this implementation checks itself (per-line checks), else None."""
        return None

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
        result = run_code(self.code, problem, timeout, self._locate)
        trace_autograd(result, [(self.source, str(self.path))])
        return result


def namespace_for(problem: Problem) -> tuple[dict[str, Any], dict[str, Any], CmpRecorder]:
    """A fresh namespace for user code: copies of the forward values, constants, globals, ``cmp``.

    Example::

        namespace, handed_out, recorder = namespace_for(problem)
        exec("dlogprobs = -probs", namespace)
    """
    handed_out = problem.cache()
    recorder = CmpRecorder(handed_out)
    namespace: dict[str, Any] = {"__name__": "__backprop__", "torch": torch, "F": F, "cmp": recorder}
    namespace.update(problem.globals())
    namespace.update(handed_out)
    return namespace, handed_out, recorder


def run_code(code: Any, problem: Problem, timeout: float | None, locate_error: Callable[[BaseException], UserError]) -> RunResult:
    """Execute compiled user code in a fresh namespace and collect its gradients.

    Example::

        run = run_code(compile(src, "student.py", "exec"), problem, 60, impl._locate)
        run.grads["logprobs"]
    """
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


def defines_functions(path: Path) -> bool:
    """Whether a .py file is a module of backward functions rather than a straight-line script.

    Example::

        defines_functions(Path("lines.py"))   # True when it defines backward_h(...)
    """
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError:
        return False
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return "backward" in names or any(n in names for n in EXERCISE_FUNCTIONS.values()) or any(
        n.startswith("backward_") for n in names)


def find_file(spec: str, rootdir: Path) -> Path | None:
    """The file ``--backprop-impl`` names (tried in the current directory, then the rootdir); None
    for a dotted module name. A path-like spec that exists nowhere is a :class:`LoadError`."""
    folders = list(dict.fromkeys([Path.cwd().resolve(), Path(rootdir).resolve()]))
    path = next((p for p in (Path(spec), *(f / spec for f in folders)) if p.is_file()), None)
    if path is None and (spec.endswith((".py", ".ipynb")) or "/" in spec):
        raise LoadError(f"--backprop-impl: no such file: {spec} (looked in {' and '.join(map(str, folders))})")
    return path


def load_implementation(spec: str, rootdir: Path) -> Implementation:
    """Resolve ``--backprop-impl``: a file path (script, module or notebook) or a dotted module name.

    Relative paths are tried against the current directory, then the rootdir.

    Example::

        impl = load_implementation("ninja.ipynb", Path.cwd())
        impl.exercises()   # ('ex1', 'ex2', 'ex3')
    """
    path = find_file(spec, rootdir)
    if path is None:
        if str(rootdir) not in sys.path:
            sys.path.insert(0, str(rootdir))
        return module_implementation(spec)
    path = path.resolve()
    if path.suffix == ".ipynb":
        from .notebook import NotebookImplementation  # noqa: PLC0415 -- optional form, loaded when used

        return NotebookImplementation(path)
    if defines_functions(path):
        return module_implementation(spec, path)
    script = ScriptImplementation(path)
    if any(line.startswith(("# %%", "#%%")) for line in script.source.splitlines()):
        from .notebook import NotebookImplementation  # noqa: PLC0415

        return NotebookImplementation.from_script(path)  # cells: Exercises 2 and 3 found like a notebook's
    return script



def module_implementation(spec: str, path: Path | None = None) -> "ModuleImplementation":
    """A module's implementation: per-line when it has ``backward_<output>`` functions and no ``backward``.

    Example::

        module_implementation("reference_model.backward_lines").exercises()   # ('ex1', 'lines')
    """
    impl = ModuleImplementation(spec, path)
    from .perline import line_functions  # noqa: PLC0415 -- perline imports this module

    if not hasattr(impl.module, "backward") and line_functions(impl.module):
        from .perline import LinesImplementation  # noqa: PLC0415

        return LinesImplementation(impl)
    return impl


# --- answers copied from autograd -----------------------------------------------------------------

_AUTOGRAD_ATTRS = {"grad", "backward", "retain_grad", "retain_grads", "autograd"}
_AUTOGRAD_TEXT = re.compile(r"\.(grad|backward|retain_grad|retain_grads)\b|\bautograd\b")


def _reads_autograd(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in _AUTOGRAD_ATTRS for n in ast.walk(node)) or any(
        isinstance(n, ast.Name) and n.id == "autograd" for n in ast.walk(node))


def target_names(target: ast.AST) -> list[str]:
    """The variable names an assignment target binds (``x``, ``x[i]``, ``a, b = ...``)."""
    while isinstance(target, (ast.Subscript, ast.Attribute, ast.Starred)):
        target = target.value
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in target_names(elt)]
    return []


@dataclass
class AutogradUse:
    """Where user code takes a gradient from autograd: assigned variables and cmp calls, by line."""

    assigned: dict[str, int] = field(default_factory=dict)  # variable -> line that reads autograd
    cmp_direct: dict[str, int] = field(default_factory=dict)  # tensor -> line of a cmp(dt=<reads autograd>)
    cmp_vars: dict[str, str] = field(default_factory=dict)  # variable passed as dt -> tensor named by t
    lines: list[int] = field(default_factory=list)  # every line that reads autograd


def autograd_use(source: str) -> AutogradUse:
    """Scan user source (never run) for ``.grad``, ``.backward()``, ``retain_grad`` and ``torch.autograd``.

    The scan of a given source is done once (Exercise 4 runs the same code 50 times); each call
    returns a fresh copy.

    Example::

        autograd_use("dhpreact = hpreact.grad").assigned   # {'dhpreact': 1}
    """
    import copy

    return copy.deepcopy(_autograd_use_once(source))


@functools.lru_cache(maxsize=64)
def _autograd_use_once(source: str) -> AutogradUse:
    use = AutogradUse()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return use
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if _reads_autograd(node.value):
                for t in targets:
                    for name in target_names(t):
                        use.assigned.setdefault(name, node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cmp" and len(node.args) >= 3:
            dt, t = node.args[1], node.args[2]
            tname = t.id if isinstance(t, ast.Name) else None
            if tname and _reads_autograd(dt):
                use.cmp_direct.setdefault(tname, node.lineno)
            elif tname and isinstance(dt, ast.Name):
                use.cmp_vars[dt.id] = tname
        if isinstance(node, (ast.Attribute, ast.Name)) and _reads_autograd(node):
            use.lines.append(node.lineno)
    return use


def _autograd_message(tensor: str, where: str, line: str | None) -> str:
    quoted = f" (`{line.strip()}`)" if line else ""
    return (f"d{tensor} is copied from autograd at {where}{quoted}. The kit hands your code tensors without .grad "
            f"(and no graph to call .backward() on): it checks your own derivation, so write d{tensor} by the chain rule")


def trace_autograd(run: RunResult, sources: list[tuple[str, str]],
                   where: Callable[[str, int], str] = lambda f, l: f"{f}:{l}") -> None:
    """Mark answers (and an exception) that come from ``.grad``/``.backward()`` with ``reads_autograd``.

    ``sources`` is [(source text, display name)]; ``where(name, lineno)`` formats a location.

    Example::

        run = run_code(code, problem, 60, locate_error)
        trace_autograd(run, [(source, "student.py")])
        run.overrides["hpreact"].code   # 'reads_autograd' after `dhpreact = hpreact.grad`
    """
    for source, display in sources:
        use = autograd_use(source)
        if not use.lines:
            continue
        src_lines = source.splitlines()

        def at(lineno: int) -> tuple[str, str | None]:
            return where(display, lineno), (src_lines[lineno - 1] if 0 < lineno <= len(src_lines) else None)

        for tensor in GRADIENT_ORDER:
            lineno = use.assigned.get("d" + tensor) or use.cmp_direct.get(tensor) or next(
                (use.assigned[v] for v, t in use.cmp_vars.items() if t == tensor and v in use.assigned), None)
            if lineno is not None and tensor not in run.overrides:
                run.overrides[tensor] = Diagnosis("reads_autograd", _autograd_message(tensor, *at(lineno)))
        err = run.error
        copied = [v for v in use.assigned if err is not None and err.source_line
                  and re.search(rf"\b{re.escape(v)}\b", err.source_line)]
        if err is not None and err.code is None and copied and "NoneType" in err.message:
            line = use.assigned[copied[0]]
            run.error = dc_replace(err, code="reads_autograd", message=(
                f"{err.message} (`{copied[0]}` is None: it is copied from autograd at {at(line)[0]}, but the kit hands "
                "your code tensors without .grad and checks your own derivation: compute it by the chain rule)"))
        elif err is not None and err.source_line and _AUTOGRAD_TEXT.search(err.source_line) and err.code is None:
            run.error = dc_replace(err, code="reads_autograd", message=(
                f"{err.message} (this line reads autograd: .grad / .backward(); the kit hands your code tensors "
                "without .grad and no graph, and checks your own derivation: compute the gradient by the chain rule)"))
