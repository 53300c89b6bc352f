"""Jupyter notebooks (and scripts split by ``# %%``) as implementations: each exercise runs its own cells.

A notebook in the lecture's layout mixes data loading, initialisation, the forward pass, the exercises,
exploration, training and plotting. The kit runs, for each exercise, only that exercise's cells (top to
bottom, each in the same fresh namespace holding copies of the kit's forward values), so that what is
graded is what those cells compute. The detection rule:

- A cell's **gradient variables** are ``d<name>`` for the tensors of the forward pass, and the variables
  the notebook's own ``cmp(s, dt, t)`` calls pass for ``t`` (renamed answers such as ``dL_dlogprobs``).
- **Exercise 2** cells write ``dlogits`` (or its renamed variable, or a placeholder ``dlogits = None``) and
  neither read nor write the gradients between the loss and the logits (``dlogprobs`` ... ``dlogit_maxes``);
  **Exercise 3** cells write ``dhprebn`` and neither read nor write those between ``hpreact`` and
  ``hprebn`` (``dbnraw`` ... ``dbnmeani``). Such a cell may also compute ``dbngain``/``dbnbias`` or start
  with a bridging line (``dhpreact = dL_dhpreact``).
- **Exercise 1** cells are all other cells that write a gradient variable or call ``cmp(...)`` on a tensor
  of the forward pass, however many there are (one cell, or 75 one-line cells with exploration between).
- **Support** cells: a cell that is none of these, nor a training or set-up cell, runs with an exercise
  when it defines a name that exercise's cells read (a helper function, ``one_hot = ...``). Exploration
  cells that define nothing used later do not run, so a scratch cell cannot break the grading.
- Never run: **set-up** cells (they write the forward values, parameters, batch or data the kit supplies:
  the kit hands out its own), **training** cells (a loop that updates ``.data``, steps an optimizer or
  records ``lossi``; ``with torch.no_grad():``), cells tagged ``backprop:skip``, and non-Python cell
  magics (``%%bash``, ``%%writefile``, ...).
- Cells run top to bottom: a repeated cell or the lecture's solution pasted below an attempt wins, as in
  the notebook; an exception stops its cell and the next cell runs; a placeholder (``dlogits = None``)
  never replaces an answer; ``%%time`` cells run their body; shell (``!wget``), magic (``%matplotlib``) and
  help (``torch.all??``) lines are ``pass``; a cell indented as a whole (one leading space) is dedented.
- Simple constants of earlier cells (``BATCH_SIZE = 32``), their ``def`` statements and imports of
  common modules are available too. Cell tags ``backprop:ex1``/``ex2``/``ex3`` override the detection for
  that exercise. An exercise with no cell gets a ``skip`` row that says how to tag one.

Locations read ``cell N, line M``, N counting every cell from 1 (markdown included), as editors show them.

Example::

    impl = NotebookImplementation(Path("makemore_part4_backprop.ipynb"))
    impl.exercises()                   # ('ex1', 'ex2', 'ex3')
    impl.cells_of("ex2")               # [14]
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..problems.lecture import CONSTANTS, GRADIENT_ORDER, PARAMETERS

from ..problems.instance import Problem
from .autograd_use import trace_autograd
from .base import (EXERCISE_TARGET, EXERCISE_UPSTREAM, Implementation, LoadError, RunResult, SourceSpan,
                   display_path, namespace_for)
from .program import Plan, Program, UnitSource, bound_names, cmp_names, collect, with_truths
from .run import UserError, call_user, locate
from .watch import rebinding_warnings

TAG_PREFIX = "backprop:"
EXERCISES = ("ex1", "ex2", "ex3")
CELL_MARKER = re.compile(r"^# ?%%")
_LINE_MAGIC = re.compile(r"^(\s*)[!%]")
_HELP = re.compile(r"^(\s*)(\?{1,2}[\w.]+|[\w.]+(\(\))?\?{1,2})\s*$")
_ASSIGN_TEXT = re.compile(r"^\s*([A-Za-z_][A-Za-z_0-9]*)\s*(?:\[[^\]]*\])?\s*(?:[-+*/@]|//)?=[^=]", re.MULTILINE)
#: Cell magics whose body is not Python: such cells never run.
FOREIGN_CELL_MAGICS = frozenset({"bash", "sh", "script", "writefile", "file", "html", "javascript", "js", "markdown",
                                 "latex", "svg", "perl", "ruby", "python2", "sx", "system", "pypy"})
#: Modules that only draw or display: an exercise cell's `plt.imshow(...)` must not stop it, so in the
#: kit's runs their names stand for :class:`Inert` objects.
DISPLAY_MODULES = ("matplotlib", "seaborn", "IPython", "plotly", "tqdm")
SAFE_IMPORTS = frozenset({"torch", "math", "random", "numpy", "torch.nn.functional", "torch.nn", "itertools",
                          "functools", "collections"})
#: Names the kit supplies: forward values, parameters, batch, the lecture's globals, torch, F and cmp (a
#: cell that writes one of them and no gradient is a set-up cell; a cell never runs to provide one).
SUPPLIED = frozenset({*GRADIENT_ORDER, *PARAMETERS, *CONSTANTS, "loss", "vocab_size", "n_embd", "n_hidden",
                      "block_size", "batch_size", "torch", "F", "cmp"})
#: Gradients that only an Exercise 1 cell writes or reads, per fused exercise (its target is the one answer).
FUSED: dict[str, tuple[str, frozenset[str]]] = {
    "ex2": ("logits", frozenset(GRADIENT_ORDER[:GRADIENT_ORDER.index("logits")])),
    "ex3": ("hprebn", frozenset(t for t in GRADIENT_ORDER[GRADIENT_ORDER.index("hpreact") + 1:GRADIENT_ORDER.index("hprebn")]
                                if t not in PARAMETERS)),
}


@dataclass(frozen=True)
class NotebookNames:
    """What detection and runs read of the problem: its gradient names, the names the kit supplies,
    the fused exercises (the lecture's Exercises 2 and 3; none for another problem) and the exercises."""

    tensors: tuple[str, ...] = GRADIENT_ORDER
    supplied: frozenset[str] = SUPPLIED
    fused: Any = None  # None: FUSED (the lecture's)
    exercises: tuple[str, ...] = EXERCISES

    @classmethod
    def of(cls, problem_spec: Any = None) -> "NotebookNames":
        """The lecture's names (``problem_spec`` None or the lecture's), or another problem's (``--backprop-problem``)."""
        if problem_spec is None or tuple(problem_spec.order) == GRADIENT_ORDER:
            return LECTURE_NAMES
        supplied = frozenset({*problem_spec.order, *problem_spec.leaves, *problem_spec.constants, problem_spec.loss,
                              *problem_spec.sizes, "torch", "F", "cmp"})
        return cls(tuple(problem_spec.order), supplied, {}, ("ex1",))

    @property
    def fused_exercises(self) -> dict[str, tuple[str, frozenset[str]]]:
        return FUSED if self.fused is None else self.fused


LECTURE_NAMES = NotebookNames()


#: What a fused exercise's cell may write besides its target without being Exercise 1's too: a bridging
#: line for the upstream gradient, and the parameter gradients the lecture's Exercise 3 cell computes.
FUSED_COMPANIONS: dict[str, frozenset[str]] = {
    "ex2": frozenset({"logits"}),
    "ex3": frozenset({"hprebn", "hpreact", "bngain", "bnbias"}),
}


def strip_magics(source: str) -> str:
    """The Python an IPython cell runs, line numbers kept: shell/magic/help lines become ``pass``,
    ``%%time``-like cell magics keep their body, other cell magics give an empty cell, and a cell
    indented as a whole is dedented.

    Example::

        strip_magics("!wget x\\nn = 1")   # 'pass  # wget x\\nn = 1'
        strip_magics("%%time\\ndh = dlogits @ W2.T")   # 'pass  # %time\\ndh = dlogits @ W2.T'
    """
    lines = source.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if first.lstrip().startswith("%%"):
        magic = first.lstrip()[2:].split()[0] if first.lstrip()[2:].split() else ""
        if magic in FOREIGN_CELL_MAGICS:
            return ""
        lines = [("pass  # " + ln.lstrip()[1:]) if ln is first else ln for ln in lines]
    out = []
    for line in lines:
        if _LINE_MAGIC.match(line) and not line.lstrip().startswith("pass  #"):
            line = _LINE_MAGIC.sub(r"\1pass  # ", line, count=1)
        elif _HELP.match(line):
            line = _HELP.sub(r"\1pass  # \2", line)
        out.append(line)
    return "\n".join(_leading_indent(out))


def _leading_indent(lines: list[str]) -> list[str]:
    """IPython's ``leading_indent``: when a cell's first line is indented, that indentation is removed
    from every line that starts with it (a cell pasted with one leading space runs)."""
    first = next((ln for ln in lines if ln.strip()), "")
    indent = first[:len(first) - len(first.lstrip())]
    if not indent:
        return lines
    return [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines]


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
    return any(isinstance(n, ast.With) and "no_grad" in ast.unparse(n.items[0].context_expr) for n in tree.body)


@dataclass
class Cell:
    """One code cell: its 1-based position in the notebook, the Python it runs, and what it binds and reads."""

    index: int
    source: str
    tags: frozenset[str] = frozenset()
    tree: ast.Module | None = None
    syntax_error: SyntaxError | None = None
    stores: set[str] = field(default_factory=set)
    loads: set[str] = field(default_factory=set)
    cmp_tensors: set[str] = field(default_factory=set)
    training: bool = False
    origin: str | None = None  # for a script split by ``# %%`` markers: its path
    offset: int = 0  # line of the script before the cell's first line

    @property
    def name(self) -> str:
        """How messages name the cell: ``cell 4``, or ``the cell at student.py:12`` in a script."""
        return f"cell {self.index}" if self.origin is None else f"the cell at {self.origin}:{self.offset + 1}"

    @property
    def filename(self) -> str:
        return f"<backprop notebook cell {self.index}>"

    def span(self, path: Path) -> SourceSpan:
        """Where the cell's lines are: ``cell N`` of the notebook, or lines of the script."""
        if self.origin is None:
            return SourceSpan(self.source, display_path(path), self.index)
        return SourceSpan(self.source, display_path(path), None, self.offset + 1)

    def tagged(self, exercise: str) -> bool:
        return TAG_PREFIX + exercise in self.tags


_BACKPROP_MAGIC = re.compile(r"^\s*%%backprop\b(.*)$")


def magic_tags(raw: str) -> frozenset[str]:
    """The tags a ``%%backprop ex2`` first line stands for (the magic's exercise, as a ``backprop:ex2``
    tag would), so that the saved notebook is checked as the magic checked it.

    Example::

        magic_tags("%%backprop ex3\ndhprebn = ...")   # frozenset({'backprop:ex3'})
    """
    first = next((ln for ln in raw.splitlines() if ln.strip()), "")
    match = _BACKPROP_MAGIC.match(first)
    if match is None:
        return frozenset()
    return frozenset(TAG_PREFIX + w for w in match.group(1).split() if w in EXERCISES)


def parse_cell(index: int, raw: str, tags: frozenset[str], tensors: tuple[str, ...] = GRADIENT_ORDER) -> Cell:
    """Parse one code cell and record what it binds, reads and passes to ``cmp``.

    Example::

        parse_cell(3, "dh = dlogits @ W2.T\\ndW2 = h.T @ dlogits", frozenset()).stores   # {'dh', 'dW2'}
    """
    cell = Cell(index, strip_magics(raw), tags | magic_tags(raw))
    try:
        cell.tree = ast.parse(cell.source)
    except (SyntaxError, ValueError) as exc:
        cell.syntax_error = exc if isinstance(exc, SyntaxError) else SyntaxError(str(exc))
        cell.stores = set(_ASSIGN_TEXT.findall(cell.source))
        cell.cmp_tensors = {t for t in tensors if re.search(rf"cmp\([^)]*\b{t}\s*\)", cell.source)}
        return cell
    for node in ast.walk(cell.tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                cell.stores.update(bound_names(t))
        elif isinstance(node, (ast.For, ast.comprehension)):
            cell.stores.update(bound_names(node.target))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            cell.stores.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            cell.loads.add(node.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_"):
            cell.stores.update(bound_names(node.func.value))
    cell.cmp_tensors = set(cmp_names(cell.tree, tensors).values()) | {
        n.args[2].id for n in ast.walk(cell.tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        and n.func.id == "cmp" and len(n.args) >= 3 and isinstance(n.args[2], ast.Name) and n.args[2].id in tensors}
    cell.training = _is_training(cell.tree)
    return cell


@dataclass
class Detection:
    """What :func:`classify` found: each exercise's cells, the support cells it also runs, and why an
    exercise has no cell."""

    cells: dict[str, list[Cell]]
    support: dict[str, list[Cell]]
    reasons: dict[str, str]


def _gradient_vars(cells: list[Cell], tensors: tuple[str, ...] = GRADIENT_ORDER) -> dict[str, str]:
    names = {"d" + t: t for t in tensors}
    for cell in cells:
        if cell.tree is not None:
            names.update(cmp_names(cell.tree, tensors))
    return names


def classify(cells: list[Cell], *, where: str = "the notebook", names: NotebookNames | None = None) -> Detection:
    """Which cells belong to which exercise (tags first, then the rule of the module docstring).

    Example::

        classify(cells).cells["ex2"]   # [the cell computing dlogits with F.softmax]
    """
    names = names or LECTURE_NAMES
    fused_exercises = names.fused_exercises
    variables = _gradient_vars(cells, names.tensors)
    usable = [c for c in cells if TAG_PREFIX + "skip" not in c.tags and (c.source.strip() or c.syntax_error)]

    def grads(names: set[str]) -> set[str]:
        return {variables[v] for v in names if v in variables}

    def fused(cell: Cell) -> str | None:
        written, read = grads(cell.stores), grads(cell.loads)
        for exercise, (target, chain) in fused_exercises.items():
            if target in written and not (written | read) & chain:
                return exercise
        return None

    untagged = [c for c in usable if not any(t.startswith(TAG_PREFIX) for t in c.tags) and not c.training]
    found: dict[str, list[Cell]] = {ex: [] for ex in names.exercises}
    for cell in untagged:
        if grads(cell.stores) or cell.cmp_tensors:
            exercise = fused(cell)
            found[exercise or "ex1"].append(cell)
            if exercise is not None and grads(cell.stores) - FUSED_COMPANIONS[exercise]:
                found["ex1"].append(cell)  # the fused formula, and the rest of the backward from it: Exercise 1 too
    chosen = {ex: [c for c in usable if c.tagged(ex)] or found[ex] for ex in names.exercises}
    taken = {c.index for cs in chosen.values() for c in cs}
    support: dict[str, list[Cell]] = {}
    for exercise, mine in chosen.items():
        support[exercise] = _support_cells(mine, [c for c in untagged if c.index not in taken], variables,
                                           names.supplied)
    reasons = {ex: (f"no Exercise {ex[2:]} cell found in {where}: tag the cell `{TAG_PREFIX}{ex}` "
                    "(cell tags), or write it as the lecture does" + (f" (it assigns `d{fused_exercises[ex][0]}`)"
                                                                     if ex in fused_exercises else ""))
               for ex in names.exercises if not chosen[ex]}
    return Detection(chosen, support, reasons)


_BUILTINS = frozenset(dir(__import__("builtins")))


def _support_cells(exercise_cells: list[Cell], others: list[Cell], variables: dict[str, str],
                   supplied: frozenset[str] = SUPPLIED) -> list[Cell]:
    """Cells that define names the exercise's cells read (and that write nothing the kit supplies)."""
    if not exercise_cells:
        return []
    candidates = [c for c in others if c.tree is not None and not (c.stores & supplied)
                  and not (c.stores & set(variables))]
    own = set().union(*(c.stores for c in exercise_cells))
    chosen: dict[int, Cell] = {}
    pending = [(c.index, c.loads - own) for c in exercise_cells]
    while pending:
        before, needed = pending.pop()
        for name in needed - supplied - _BUILTINS:
            provider = [c for c in candidates if name in c.stores and c.index < before]
            if provider and provider[-1].index not in chosen:
                chosen[provider[-1].index] = provider[-1]
                pending.append((provider[-1].index, provider[-1].loads))
    return sorted(chosen.values(), key=lambda c: c.index)


# --- constants and definitions of earlier cells ---------------------------------------------------

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


def earlier_definitions(cells: list[Cell], before: int, supplied: dict[str, Any]) -> tuple[dict[str, Any], list[ast.Module]]:
    """Simple constants of cells before ``before`` (never overriding ``supplied``), and their ``def``
    statements and imports of common modules (as small modules to run).

    Example::

        constants, defs = earlier_definitions(cells, 9, namespace)
        constants   # {'BATCH_SIZE': 32}
    """
    constants: dict[str, Any] = {}
    known = dict(supplied)
    defs: list[ast.Module] = []
    for cell in cells:
        if cell.index >= before or cell.tree is None or TAG_PREFIX + "skip" in cell.tags:
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
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and _display_import(node):
                for alias in node.names:
                    constants[(alias.asname or alias.name).split(".")[0]] = Inert()
            elif isinstance(node, ast.Import) and all(a.name in SAFE_IMPORTS for a in node.names):
                keep.append(node)
            elif isinstance(node, ast.ImportFrom) and node.module in SAFE_IMPORTS and node.level == 0:
                keep.append(node)
        if keep:
            defs.append(ast.Module(body=keep, type_ignores=[]))
    return constants, defs


class Inert:
    """Stands for a plotting or display module in the kit's runs: every attribute and call gives itself
    back, so ``plt.figure(figsize=(8, 8)); plt.imshow(dlogits.detach())`` does nothing.

    Example::

        plt = Inert()
        plt.imshow(x, cmap="gray").set_title("dlogits")   # no effect
    """

    def __getattr__(self, name: str) -> "Inert":
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> "Inert":
        return self

    def __iter__(self):  # `fig, ax = plt.subplots()`
        return iter((self, self))

    def __repr__(self) -> str:
        return "<a plotting module: ignored while the kit grades>"


def _display_import(node: ast.Import | ast.ImportFrom) -> bool:
    modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
    return all(m.split(".")[0] in DISPLAY_MODULES for m in modules)


def defining_cells(cells: list[Cell], name: str) -> list[Cell]:
    """Cells that bind ``name`` (assignment, def, import, loop target), in notebook order.

    Example::

        [c.index for c in defining_cells(cells, "W2_t")]   # [8]
    """
    return [c for c in cells if name in c.stores or (c.tree is not None and any(
        isinstance(n, (ast.Import, ast.ImportFrom)) and name in {(a.asname or a.name).split(".")[0] for a in n.names}
        for n in ast.walk(c.tree)))]


# --- the implementation ----------------------------------------------------------------------------

class NotebookImplementation(Implementation):
    """A ``.ipynb`` notebook (or a ``# %%`` script): each exercise runs its own cells in a fresh namespace."""

    supports_plans = True
    names: NotebookNames = LECTURE_NAMES

    def __init__(self, path: Path, problem_spec: Any = None):
        self.names = NotebookNames.of(problem_spec)
        try:
            import nbformat  # noqa: PLC0415 -- only needed for notebooks
        except ImportError as exc:  # pragma: no cover
            raise LoadError("reading notebooks needs nbformat: pip install nbformat") from exc
        self.path = path
        self.description = f"notebook {display_path(path)}"
        try:
            nb = nbformat.read(str(path), as_version=4)
        except Exception as exc:  # noqa: BLE001 -- nbformat raises many kinds for a broken file
            raise LoadError(f"cannot read notebook {path}: {exc}") from exc
        self._setup([parse_cell(i, c.get("source", ""), frozenset(c.get("metadata", {}).get("tags", [])),
                                self.names.tensors)
                     for i, c in enumerate(nb.cells, start=1) if c.get("cell_type") == "code"])

    def _setup(self, cells: list[Cell]) -> None:
        self.cells = cells
        self.detection = classify(cells, where=display_path(self.path), names=self.names)
        self._by_file = {c.filename: c for c in self.cells}
        self._programs: dict[str, Program] = {}
        #: the student's renamed gradient variables, from the cmp calls of every cell
        self._renamed = {v: t for v, t in _gradient_vars(cells, self.names.tensors).items() if v != "d" + t}

    @classmethod
    def from_cells(cls, sources: list[str], name: str = "notebook", *,
                   tags: list[frozenset[str]] | None = None, problem_spec: Any = None) -> "NotebookImplementation":
        """A notebook given as the sources of its code cells, in order (e.g. a kernel's input history):
        cell N is ``sources[N - 1]``.

        Example::

            impl = NotebookImplementation.from_cells(["dlogprobs = torch.zeros_like(logprobs)", "x = 1"])
            impl.cells_of("ex1")   # [1]
        """
        self = cls.__new__(cls)
        self.names = NotebookNames.of(problem_spec)
        self.path = Path(name)
        self.description = f"notebook {name}"
        tags = tags or [frozenset()] * len(sources)
        self._setup([parse_cell(i, source, t, self.names.tensors)
                     for i, (source, t) in enumerate(zip(sources, tags), start=1)])
        return self

    @classmethod
    def from_script(cls, path: Path, problem_spec: Any = None) -> "NotebookImplementation":
        """A ``.py`` script split into cells by ``# %%`` markers (VS Code, Jupytext's percent format);
        a marker line may carry tags: ``# %% [backprop:ex2]``. Locations are ``file:line``.

        Example::

            impl = NotebookImplementation.from_script(Path("ninja.py"))
        """
        self = cls.__new__(cls)
        self.names = NotebookNames.of(problem_spec)
        self.path = path
        self.description = f"script {display_path(path)} (cells)"
        try:
            text = path.read_text()
        except OSError as exc:
            raise LoadError(f"cannot load {path}: {exc}") from exc
        cells, start, tags, index = [], 0, frozenset(), 1
        lines = text.splitlines()
        for i, line in enumerate([*lines, "# %%"]):
            if CELL_MARKER.match(line):
                if i > start and "".join(lines[start:i]).strip():
                    cell = parse_cell(index, "\n".join(lines[start:i]), tags, self.names.tensors)
                    cell.origin, cell.offset = display_path(path), start
                    cells.append(cell)
                    index += 1
                start, tags = i + 1, frozenset(re.findall(r"backprop:\w+", line))
        self._setup(cells)
        return self

    @property
    def by_exercise(self) -> dict[str, list[Cell]]:
        return self.detection.cells

    def gradients_of(self, index: int) -> set[str]:
        """The tensors whose gradients cell ``index`` writes (renamed answers included), e.g. ``{'probs'}``."""
        names = {"d" + t: t for t in GRADIENT_ORDER} | self._renamed
        cell = next((c for c in self.cells if c.index == index), None)
        return set() if cell is None else {names[v] for v in cell.stores if v in names}

    def cells_of(self, exercise: str) -> list[int]:
        """The notebook positions (1-based) of the cells that run for ``exercise`` (support cells included)."""
        cells = self.detection.cells.get(exercise, []) + self.detection.support.get(exercise, [])
        return sorted(c.index for c in cells)

    def exercises(self) -> tuple[str, ...]:
        return tuple(ex for ex in self.names.exercises if self.detection.cells[ex])

    def missing_reason(self, exercise: str) -> str | None:
        """Why ``exercise`` has no cell (None when it has)."""
        return self.detection.reasons.get(exercise)

    def source_spans(self, exercise: str | None = None) -> list[SourceSpan]:
        running = set(self.cells_of(exercise)) if exercise is not None else None
        return [c.span(self.path) for c in self.cells if running is None or c.index in running]

    def program(self, exercise: str) -> Program:
        """The exercise's cells (support cells included) as one program, analysed and compiled once."""
        if exercise not in self._programs:
            cells = sorted(self.detection.cells[exercise] + self.detection.support[exercise], key=lambda c: c.index)
            units = [UnitSource(c.source, c.span(self.path), c.filename, syntax_error=self._syntax_error(c),
                                assigned_text=frozenset(c.stores) if c.syntax_error else frozenset()) for c in cells]
            self._programs[exercise] = Program(units, self.names.tensors, extra_names=self._renamed)
        return self._programs[exercise]

    def _syntax_error(self, cell: Cell) -> UserError | None:
        se = cell.syntax_error
        if se is None:
            return None
        location = cell.span(self.path).location(se.lineno or 1)
        text = (se.text or "").rstrip("\n")
        shown = text.strip() or location.source
        if text.strip() and se.offset:
            shown += "\n    " + " " * max(se.offset - 1 - (len(text) - len(text.lstrip())), 0) + "^"
        where = f"cell {cell.index}" if cell.origin is None else location.file
        return UserError("SyntaxError", se.msg, where, location.line, shown)

    def _locate(self, exc: BaseException) -> UserError:
        def source_line(filename: str, lineno: int) -> str | None:
            lines = self._by_file[filename].source.splitlines()
            return lines[lineno - 1] if 0 < lineno <= len(lines) else None

        def shown(filename: str, lineno: int) -> tuple[str, int]:
            cell = self._by_file[filename]
            return (f"cell {cell.index}", lineno) if cell.origin is None else (cell.origin, cell.offset + lineno)

        error = locate(exc, lambda f: f in self._by_file, source_line, shown)
        if isinstance(exc, NameError) and getattr(exc, "name", None):
            error = _explain_name(error, exc.name, self.cells)
        return error

    def run(self, exercise: str, problem: Problem, timeout: float | None, *, plan: Plan | None = None) -> RunResult:
        if not self.detection.cells.get(exercise):
            error = UserError("NoCells", self.missing_reason(exercise) or f"no {exercise} cells")
            return RunResult({}, error)
        program = self.program(exercise)
        namespace, handed_out, recorder = namespace_for(problem)
        target = EXERCISE_TARGET[exercise]
        if target is not None:  # the true upstream gradients, also under the student's own names
            upstream = set(EXERCISE_UPSTREAM[exercise])
            namespace.update({"d" + k: problem.grads[k].detach().clone() for k in upstream})
            namespace.update({var: problem.grads[t].detach().clone() for var, t in program.gradient_vars.items()
                              if t in upstream})
        first = min(self.cells_of(exercise))
        constants, defs = earlier_definitions(self.cells, first, namespace)
        namespace.update(constants)
        for module in defs:  # defs and imports only: nothing else of those cells runs
            call_user(lambda m=module: exec(compile(m, "<backprop earlier definitions>", "exec"), namespace), timeout)
        plan = with_truths(plan, program, problem.grads)
        outcome = program.run(namespace, plan, timeout=timeout, locate=self._locate)
        tensors = self.names.tensors if target is None else (target,)
        result = collect(program, outcome, namespace, handed_out, recorder.recorded, tensors=tensors)
        result.warnings += rebinding_warnings(program, namespace, handed_out, problem.truth.values)
        by_name = {c.name: c for c in self.cells}
        trace_autograd(result, [(c.source, c.name) for c in self.detection.cells[exercise]],
                       where=lambda f, l: _cell_location(by_name[f], l))
        return result


def _cell_location(cell: Cell, lineno: int) -> str:
    return f"cell {cell.index}, line {lineno}" if cell.origin is None else f"{cell.origin}:{cell.offset + lineno}"


def _explain_name(error: UserError, name: str, cells: list[Cell]) -> UserError:
    here = next((c for c in cells if error.filename in (f"cell {c.index}", c.origin)), None)
    before = [c for c in defining_cells(cells, name) if here is None or c.index < here.index]
    where = before or defining_cells(cells, name)
    if where:
        cell = where[-1]
        why = ("a training cell" if cell.training else "a set-up cell (the kit hands out its own forward values)"
               if cell.stores & SUPPLIED else "a cell the kit does not run")
        hint = (f"`{name}` is defined in {cell.name}, {why}: only the exercise's cells (and cells defining names "
                "they use) run, with the forward values, the lecture's globals and simple constants of earlier cells; "
                f"define `{name}` in the exercise's cell (or tag {cell.name} `{TAG_PREFIX}ex1`)")
    else:
        hint = f"`{name}` is not defined anywhere in the notebook"
    return UserError(error.type, f"{error.message}: {hint}", error.filename, error.lineno, error.source_line,
                     error.timeout, error.code)
