"""Jupyter notebooks as implementations: find each exercise's cells and run only those.

A notebook in the lecture's layout mixes data loading, initialisation, the forward pass, the
exercises, training and plotting. The kit runs only the exercises' cells, each exercise in a fresh
namespace holding copies of the forward values (as every implementation gets them):

- **Exercise 1**: cells that assign gradients of the expanded pass (two or more ``d<name>`` for
  names of the table), or that call ``cmp(...)`` on tensors of the table (renamed answers such as
  ``dL_dlogprobs``), plus the cells that compute the variables those calls pass;
- **Exercise 2**: the cell that computes ``dlogits`` from the logits alone (no other ``d<name>``);
- **Exercise 3**: the cell that computes ``dhprebn`` in one go (reads ``dhpreact``, assigns no
  other ``d<name>``); it gets the true ``dhpreact`` (and the gradients upstream of it).

Training cells (a loop that updates ``.data``, calls ``.backward()`` or uses ``torch.no_grad``)
never run, nor do shell and magic lines (``!wget``, ``%matplotlib``; replaced by ``pass``). Cell
tags ``backprop:ex1``, ``backprop:ex2``, ``backprop:ex3`` override the detection for that exercise;
``backprop:skip`` excludes a cell. Simple constant assignments of earlier cells (``BATCH_SIZE =
32``), their ``def`` statements and imports of common modules are available too; a name the kit
cannot supply gives a message naming the cell that defines it. Locations read ``cell N, line M``,
N counting every cell of the notebook from 1 (markdown included), as notebook editors show them.

Example::

    impl = NotebookImplementation(Path("makemore_part4_backprop.ipynb"))
    impl.exercises()                   # ('ex1', 'ex2', 'ex3')
    impl.cells_of("ex2")               # [14]
"""

from __future__ import annotations

import ast
import operator
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reference_model.model import GRADIENT_ORDER

from ..problems.instance import Problem
from .autograd_use import target_names, trace_autograd
from .base import (
    EXERCISE_TARGET,
    EXERCISE_UPSTREAM,
    Implementation,
    LoadError,
    RunResult,
    SourceSpan,
    display_path,
    forward_watch,
    namespace_for,
)
from .run import UserError, call_user, locate

TAG_PREFIX = "backprop:"
GRAD_NAMES = frozenset("d" + name for name in GRADIENT_ORDER)
CELL_MARKER = re.compile(r"^# ?%%")
_MAGIC = re.compile(r"^(\s*)[!%]")
_ASSIGN_TEXT = re.compile(r"^\s*(d[A-Za-z_0-9]+)\s*(?:[-+*/@]|//)?=[^=]", re.MULTILINE)
SAFE_IMPORTS = frozenset({"torch", "math", "random", "numpy", "torch.nn.functional", "torch.nn", "itertools",
                          "functools", "collections"})


@dataclass
class Cell:
    """One code cell: its 1-based position in the notebook, source with magics removed, parse tree."""

    index: int
    source: str
    tags: frozenset[str] = frozenset()
    tree: ast.Module | None = None
    syntax_error: SyntaxError | None = None
    assigned: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)
    cmp_tensors: set[str] = field(default_factory=set)
    cmp_vars: dict[str, str] = field(default_factory=dict)  # variable passed as dt -> tensor
    training: bool = False
    origin: str | None = None  # for a script split by ``# %%`` markers: its path
    offset: int = 0  # line of the script before the cell's first line

    @property
    def name(self) -> str:
        """How messages name the cell: ``cell 4``, or ``the cell at student.py:12`` in a script."""
        return f"cell {self.index}" if self.origin is None else f"the cell at {self.origin}:{self.offset + 1}"

    def where(self, lineno: int) -> tuple[str, int]:
        """(filename, line) of a line of the cell: ``("cell 4", 2)`` or ``("student.py", 14)``."""
        return (f"cell {self.index}", lineno) if self.origin is None else (self.origin, self.offset + lineno)

    @property
    def filename(self) -> str:
        return f"<backprop notebook cell {self.index}>"


def strip_magics(source: str) -> str:
    """Replace shell (``!``) and magic (``%``) lines by ``pass``, keeping line numbers.

    Example::

        strip_magics("!wget x\\nn = 1")   # 'pass\\nn = 1'
    """
    if source.lstrip().startswith("%%"):
        return ""
    return "\n".join(_MAGIC.sub(r"\1pass  # ", line) if _MAGIC.match(line) else line for line in source.splitlines())


def _is_training(tree: ast.Module) -> bool:
    for loop in (n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))):
        for node in ast.walk(loop):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Attribute) and t.attr in ("data", "grad") for t in targets):
                    return True
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "backward", "step", "no_grad", "zero_grad"):
                return True
            if isinstance(node, ast.Name) and node.id in ("max_steps", "lossi", "stepi"):
                return True
    return any(isinstance(n, ast.With) and "no_grad" in ast.unparse(n.items[0].context_expr)
               for n in tree.body)


def parse_cell(index: int, raw: str, tags: frozenset[str]) -> Cell:
    """Parse one code cell and record what it assigns, reads and passes to ``cmp``.

    Example::

        parse_cell(3, "dh = dlogits @ W2.T\ndW2 = h.T @ dlogits", frozenset()).assigned   # {'dh', 'dW2'}
    """
    cell = Cell(index, strip_magics(raw), tags)
    try:
        cell.tree = ast.parse(cell.source)
    except SyntaxError as exc:
        cell.syntax_error = exc
        cell.assigned = set(_ASSIGN_TEXT.findall(cell.source))
        if "cmp(" in cell.source:
            cell.cmp_tensors = {"?"}
        return cell
    for node in ast.walk(cell.tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                cell.assigned.update(target_names(t))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            cell.read.add(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cmp" and len(node.args) >= 3:
            if isinstance(node.args[2], ast.Name) and node.args[2].id in GRADIENT_ORDER:
                cell.cmp_tensors.add(node.args[2].id)
                if isinstance(node.args[1], ast.Name):
                    cell.cmp_vars[node.args[1].id] = node.args[2].id
    cell.training = _is_training(cell.tree)
    return cell


def classify(cells: list[Cell]) -> dict[str, list[Cell]]:
    """Which cells belong to which exercise (tags first, then detection; see the module docstring).

    Example::

        classify(cells)["ex2"]   # [the cell computing dlogits with F.softmax]
    """
    usable = [c for c in cells if TAG_PREFIX + "skip" not in c.tags]
    tagged = {ex: [c for c in usable if TAG_PREFIX + ex in c.tags] for ex in ("ex1", "ex2", "ex3")}
    found: dict[str, list[Cell]] = {}
    candidates = [c for c in usable if not c.training and not any(t.startswith(TAG_PREFIX) for t in c.tags)]
    grads_of = {c.index: (c.assigned | c.read) & GRAD_NAMES for c in candidates}
    found["ex2"] = [c for c in candidates if ("dlogits" in c.assigned and grads_of[c.index] == {"dlogits"})
                    or (c.cmp_tensors == {"logits"} and not grads_of[c.index])][-1:]
    found["ex3"] = [c for c in candidates if ("dhprebn" in c.assigned and (c.assigned & GRAD_NAMES) == {"dhprebn"})
                    or (c.cmp_tensors == {"hprebn"} and not c.assigned & GRAD_NAMES)][-1:]
    taken = {c.index for c in found["ex2"] + found["ex3"]}
    ex1 = [c for c in candidates if c.index not in taken
           and (len(c.assigned & GRAD_NAMES) >= 2 or c.cmp_tensors)]
    wanted = {v for c in ex1 for v in c.cmp_vars} - GRAD_NAMES
    ex1 += [c for c in candidates if c.index not in taken and c not in ex1 and c.assigned & wanted]
    found["ex1"] = sorted(ex1, key=lambda c: c.index)
    return {ex: tagged[ex] or found[ex] for ex in ("ex1", "ex2", "ex3")}


class _Constants(ast.NodeVisitor):
    _ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
            ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}

    def __init__(self, known: dict[str, Any]):
        self.known = known

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.known and isinstance(self.known[node.id], (int, float, str, bool)):
            return self.known[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.value(node.operand)
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.BinOp) and type(node.op) in self._ops:
            left, right = self.value(node.left), self.value(node.right)
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) and not (
                    isinstance(node.op, ast.Pow) and abs(right) > 64):
                return self._ops[type(node.op)](left, right)
        if isinstance(node, ast.Tuple):
            return tuple(self.value(e) for e in node.elts)
        raise ValueError("not a simple constant")


def earlier_definitions(cells: list[Cell], before: int, supplied: dict[str, Any]) -> tuple[dict[str, Any], list[Cell]]:
    """Simple constants of cells before ``before`` (not overriding ``supplied``), and cells of their defs/imports.

    Example::

        constants, defs = earlier_definitions(cells, 9, namespace)
        constants   # {'BATCH_SIZE': 32}
    """
    constants: dict[str, Any] = {}
    known = dict(supplied)
    defs: list[Cell] = []
    for cell in cells:
        if cell.index >= before or cell.tree is None:
            continue
        evaluator = _Constants(known)
        keep = []
        for node in cell.tree.body:
            if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
                try:
                    value = evaluator.value(node.value)
                except (ValueError, ArithmeticError, TypeError):
                    for t in node.targets:  # a later non-constant assignment hides an earlier constant
                        constants.pop(t.id, None)
                    continue
                for t in node.targets:
                    if t.id not in supplied:
                        constants[t.id] = known[t.id] = value
            elif isinstance(node, ast.FunctionDef) and node.name != "cmp":
                keep.append(node)
            elif isinstance(node, ast.Import) and all(a.name in SAFE_IMPORTS for a in node.names):
                keep.append(node)
            elif isinstance(node, ast.ImportFrom) and node.module in SAFE_IMPORTS and node.level == 0:
                keep.append(node)
        if keep:
            defs.append(Cell(cell.index, cell.source, cell.tags, ast.Module(body=keep, type_ignores=[])))
    return constants, defs


def defining_cells(cells: list[Cell], name: str) -> list[Cell]:
    """Cells that bind ``name`` at top level (assignment, def, import, for target).

    Example::

        [c.index for c in defining_cells(cells, "W2_t")]   # [8]
    """
    out = []
    for cell in cells:
        if cell.tree is None:
            continue
        for node in ast.walk(cell.tree):
            bound: list[str] = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    bound += target_names(t)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                bound = [node.name]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound = [(a.asname or a.name).split(".")[0] for a in node.names]
            elif isinstance(node, ast.For):
                bound = target_names(node.target)
            if name in bound:
                out.append(cell)
                break
    return out


class NotebookImplementation(Implementation):
    """A ``.ipynb`` notebook: each exercise runs its own cells in a fresh namespace."""

    def __init__(self, path: Path):
        try:
            import nbformat  # noqa: PLC0415 -- only needed for notebooks
        except ImportError as exc:  # pragma: no cover
            raise LoadError("reading notebooks needs nbformat: pip install nbformat") from exc
        self.path = path
        self.description = f"notebook {path}"
        try:
            nb = nbformat.read(str(path), as_version=4)
        except Exception as exc:  # noqa: BLE001 -- nbformat raises many kinds for a broken file
            raise LoadError(f"cannot read notebook {path}: {exc}") from exc
        self._setup([parse_cell(i, c.get("source", ""), frozenset(c.get("metadata", {}).get("tags", [])))
                     for i, c in enumerate(nb.cells, start=1) if c.get("cell_type") == "code"])

    def _setup(self, cells: list[Cell]) -> None:
        self.cells = cells
        self.by_exercise = classify(self.cells)
        self._by_file = {c.filename: c for c in self.cells}

    @classmethod
    def from_script(cls, path: Path) -> "NotebookImplementation":
        """A ``.py`` script split into cells by ``# %%`` markers (VS Code, Jupytext's percent format);
        a marker line may carry tags: ``# %% [backprop:ex2]``. Locations are ``file:line``.

        Example::

            impl = NotebookImplementation.from_script(Path("ninja.py"))
        """
        self = cls.__new__(cls)
        self.path = path
        self._script = True
        self.description = f"script {path} (cells)"
        try:
            text = path.read_text()
        except OSError as exc:
            raise LoadError(f"cannot load {path}: {exc}") from exc
        cells, start, tags, index = [], 0, frozenset(), 1
        lines = text.splitlines()
        for i, line in enumerate([*lines, "# %%"]):
            if CELL_MARKER.match(line):
                if i > start and "".join(lines[start:i]).strip():
                    cell = parse_cell(index, "\n".join(lines[start:i]), tags)
                    cell.origin, cell.offset = str(path), start
                    cells.append(cell)
                    index += 1
                start, tags = i + 1, frozenset(re.findall(r"backprop:\w+", line))
        self._setup(cells)
        return self

    def source_spans(self) -> list[SourceSpan]:
        if getattr(self, "_script", False):
            return [SourceSpan(c.source, display_path(self.path), None, c.offset + 1) for c in self.cells]
        return [SourceSpan(c.source, display_path(self.path), c.index) for c in self.cells]

    def cells_of(self, exercise: str) -> list[int]:
        """The notebook positions (1-based) of the cells that run for ``exercise``."""
        return [c.index for c in self.by_exercise.get(exercise, [])]

    def exercises(self) -> tuple[str, ...]:
        return ("ex1", *(ex for ex in ("ex2", "ex3") if self.by_exercise[ex]))

    def _locate(self, exc: BaseException) -> UserError:
        def source_line(filename: str, lineno: int) -> str | None:
            lines = self._by_file[filename].source.splitlines()
            return lines[lineno - 1] if 0 < lineno <= len(lines) else None

        error = locate(exc, lambda f: f in self._by_file, source_line,
                       lambda f, l: self._by_file[f].where(l))
        if isinstance(exc, NameError) and getattr(exc, "name", None):
            error = _explain_name(error, exc.name, self.cells)
        return error

    def run(self, exercise: str, problem: Problem, timeout: float | None) -> RunResult:
        cells = self.by_exercise.get(exercise, [])
        if not cells:
            return RunResult({}, UserError("LookupError", f"no {exercise} cells found in {self.path.name}: tag the "
                                                          f"cells with `{TAG_PREFIX}{exercise}` (cell tags)"))
        namespace, handed_out, recorder = namespace_for(problem)
        target = EXERCISE_TARGET[exercise]
        if target is not None:  # the true upstream gradients, also under the student's own names
            upstream = set(EXERCISE_UPSTREAM[exercise])
            namespace.update({"d" + k: problem.grads[k].detach().clone() for k in upstream})
            namespace.update({var: problem.grads[t].detach().clone() for c in self.cells
                              for var, t in c.cmp_vars.items() if t in upstream})
        constants, defs = earlier_definitions(self.cells, cells[-1].index, namespace)
        namespace.update(constants)
        for cell in defs:  # defs and imports only: nothing of those cells runs
            call_user(lambda c=cell: exec(compile(c.tree, c.filename, "exec"), namespace), timeout)
        deadline = time.monotonic() + timeout if timeout else None
        error: UserError | None = None
        for cell in cells:
            if cell.syntax_error is not None:
                se = cell.syntax_error
                error = error or UserError("SyntaxError", se.msg, *cell.where(se.lineno or 1),
                                           (se.text or "").strip() or None)
                continue
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            code = compile(cell.tree, cell.filename, "exec")
            _, exc = call_user(lambda: exec(code, namespace), remaining)
            if exc is not None:
                error = error or self._locate(exc)
                if error.timeout:
                    break
        if target is None:
            grads = {name: namespace["d" + name] for name in GRADIENT_ORDER
                     if "d" + name in namespace and "d" + name not in handed_out}
        else:
            grads = {target: namespace["d" + target]} if "d" + target in namespace else {}
        grads.update({k: v for k, v in recorder.recorded.items() if target is None or k == target})
        result = RunResult(grads, error, forward_watch(handed_out, namespace, problem.truth.values))
        by_name = {c.name: c for c in cells}
        trace_autograd(result, [(c.source, c.name) for c in cells],
                       where=lambda f, l: UserError("", "", *by_name[f].where(l)).location)
        return result


def _explain_name(error: UserError, name: str, cells: list[Cell]) -> UserError:
    where = defining_cells(cells, name)
    if where:
        cell = where[-1]
        hint = (f"`{name}` is defined in {cell.name}, which the kit does not run: only the exercise's cells run, "
                "with the forward values, the lecture's globals and simple constants of earlier cells; define "
                f"`{name}` in the exercise's cell (or tag {cell.name} `{TAG_PREFIX}ex1`)")
    else:
        hint = f"`{name}` is not defined anywhere in the notebook"
    return UserError(error.type, f"{error.message}: {hint}", error.filename, error.lineno, error.source_line,
                     error.timeout, error.code)
