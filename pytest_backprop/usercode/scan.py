"""Static scans of the user's source, for hints that quote it: numbers written into the code, calls
that create float32 tensors, bare ``.squeeze()`` calls.

The source is parsed, never executed: only numeric constants of the syntax tree count (not text in
comments or strings), also inside tuples (``torch.zeros((32, 27))``) and behind a minus sign.
Notebook-only lines (``%time``, ``!ls``, ``torch.all??``) are blanked before parsing; a span that
still does not parse is left out (no hint is better than a wrong one).

Example::

    spans = implementation.source_spans()
    [f.location.describe() for f in find_numbers(spans, {32})]   # ['student.py:8']
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass, fields
from typing import Any, Callable, Collection, Iterable, Iterator

from reference_model.model import Config

from ..problems.lecture import CONSTANTS, GRADIENT_ORDER
from ..verdict import Location
from .base import SourceSpan, display_path

_NOTEBOOK_ONLY = re.compile(r"^\s*[!%]|\?\s*$")
#: Names the kit puts into every namespace (n, Xb, Yb, the forward tensors, ``batch_size``, ...): an
#: earlier cell's ``batch_size = 32`` never reaches the user's code, so it is no hard-coded size.
SUPPLIED = frozenset({*CONSTANTS, *GRADIENT_ORDER, *(f.name for f in fields(Config))})
#: torch functions that create a tensor in the default dtype (float32) unless given ``dtype=``.
FLOAT_FACTORIES = frozenset({"zeros", "ones", "empty", "full", "rand", "randn", "eye", "linspace", "tensor"})


@dataclass(frozen=True)
class Found:
    """One hit of a scan: what was found (a number, a call) and where, with the line's text.

    Example::

        Found(32, Location("student.py", 8, None, "dlogprobs[range(n), Yb] = -1.0 / 32")).describe()
        # '`dlogprobs[range(n), Yb] = -1.0 / 32` (student.py:8)'
    """

    value: object
    location: Location

    def describe(self) -> str:
        """The line's text in backticks and its location."""
        return f"`{self.location.source}` ({self.location.describe()})"


def spans_for(implementation: Any, exercise: str) -> tuple[list[SourceSpan], list[SourceSpan]]:
    """The user's source that runs for ``exercise``, and the rest (a notebook's other cells, where
    only constant definitions such as ``BATCH = 32`` can matter). Empty when the source is unknown.

    Example::

        running, rest = spans_for(NotebookImplementation(Path("ninja.ipynb")), "ex1")
        [s.cell for s in running]   # the Exercise 1 cells
    """
    try:
        spans = list(implementation.source_spans())
        running = list(implementation.source_spans(exercise))
    except Exception:  # noqa: BLE001 -- a hint's source lookup must never fail a check
        return [], []
    return running, [s for s in spans if s not in running]


def function_span(fn: Callable[..., Any]) -> list[SourceSpan]:
    """The source of one function as a span (empty when Python cannot find it).

    Example::

        function_span(backward_lines.backward_probs)[0].first_line   # its ``def`` line in the file
    """
    try:
        lines, first = inspect.getsourcelines(fn)
        file = inspect.getsourcefile(fn)
    except (OSError, TypeError):
        return []
    return [SourceSpan(textwrap.dedent("".join(lines)), display_path(file) if file else None, None, max(first, 1))]


def parse_span(span: SourceSpan) -> ast.Module | None:
    """The syntax tree of a span (notebook-only lines blanked), or None when it does not parse.

    Example::

        parse_span(SourceSpan("%matplotlib inline\nx = 1", file=None, cell=3)).body[0].lineno   # 2
    """
    try:
        return ast.parse(span.text)
    except (SyntaxError, ValueError):
        pass
    blanked = "\n".join("" if _NOTEBOOK_ONLY.search(line) else line for line in span.text.splitlines())
    try:  # blank lines keep every other line's number
        return ast.parse(blanked)
    except (SyntaxError, ValueError):
        return None


def _trees(spans: Iterable[SourceSpan]) -> Iterator[tuple[SourceSpan, ast.Module]]:
    for span in spans:
        tree = parse_span(span)
        if tree is not None:
            yield span, tree


def _number(node: ast.AST) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    return None


def _ordered(found: list[Found]) -> list[Found]:
    return sorted(found, key=lambda f: (f.location.cell or 0, f.location.line or 0))


def find_numbers(spans: Iterable[SourceSpan], values: Collection[float], *,
                 context: Iterable[SourceSpan] = ()) -> list[Found]:
    """Every numeric literal equal to one of ``values`` (``32`` and ``32.0`` alike) in ``spans``, one
    per line and value, in source order; and in ``context`` (code that does not run, e.g. a
    notebook's other cells) the assignments ``NAME = <value>`` of names that ``spans`` read (not
    the names the kit supplies itself, :data:`SUPPLIED`).

    Example::

        find_numbers([SourceSpan("x = torch.zeros((32, 27))  # 64", "s.py")], {27, 64})
        # [Found(27, Location('s.py', 1, None, 'x = torch.zeros((32, 27))  # 64'))]
    """
    spans = list(spans)
    wanted = {float(v) for v in values}
    found: list[Found] = []
    for span, tree in _trees(spans):
        seen: set[tuple[int, float]] = set()
        for node in ast.walk(tree):
            value = _number(node)
            if value is None or float(value) not in wanted or (node.lineno, float(value)) in seen:
                continue
            seen.add((node.lineno, float(value)))
            found.append(Found(value, span.location(node.lineno)))
    read = names_read(spans) - SUPPLIED
    for span, tree in _trees(context):
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                value = _number(node.value)
                if value is not None and float(value) in wanted and node.targets[0].id in read:
                    found.append(Found(value, span.location(node.lineno)))
    return _ordered(found)


def _torch_call(node: ast.AST) -> str | None:
    """``zeros`` for ``torch.zeros(...)``; None for anything else."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
        if node.func.value.id == "torch":
            return node.func.attr
    return None


def _python_scalar(node: ast.AST) -> bool:
    """A number, or arithmetic on numbers and ``n`` (``-1.0 / n``): a Python scalar, not a tensor."""
    if _number(node) is not None:
        return True
    if isinstance(node, ast.Name):
        return node.id == "n"
    if isinstance(node, ast.UnaryOp):
        return _python_scalar(node.operand)
    if isinstance(node, ast.BinOp):
        return _python_scalar(node.left) and _python_scalar(node.right)
    return False


def float32_makers(spans: Iterable[SourceSpan]) -> list[Found]:
    """Calls that create a float32 tensor whatever the inputs' dtype: a torch factory without
    ``dtype=`` (``torch.zeros((32, 27))``, ``torch.tensor(1.0 / n)``), ``torch.where`` with two
    Python numbers, ``.float()``, ``dtype=torch.float32``.

    Example::

        [f.value for f in float32_makers([SourceSpan("d = torch.where(m, -1.0 / n, 0.0)", "s.py")])]
        # ['torch.where']
    """
    found: list[Found] = []
    for span, tree in _trees(spans):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _torch_call(node)
            keywords = {k.arg: k.value for k in node.keywords}
            what = None
            if name in FLOAT_FACTORIES and "dtype" not in keywords:
                what = f"torch.{name}"
            elif name == "where" and len(node.args) == 3 and all(_python_scalar(a) for a in node.args[1:]):
                what = "torch.where"
            elif isinstance(node.func, ast.Attribute) and node.func.attr == "float" and not node.args:
                what = ".float()"
            elif isinstance(keywords.get("dtype"), ast.Attribute) and keywords["dtype"].attr in ("float32", "float"):
                what = "dtype=torch.float32"
            if what is not None:
                found.append(Found(what, span.location(node.lineno)))
    return _ordered(found)


def bare_squeezes(spans: Iterable[SourceSpan]) -> list[Found]:
    """``.squeeze()`` calls without a dimension (they drop *every* size-1 dimension).

    Example::

        [f.location.line for f in bare_squeezes([SourceSpan("a = 1\\nb = x.sum(0).squeeze()", "s.py")])]   # [2]
    """
    found: list[Found] = []
    for span, tree in _trees(spans):
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "squeeze"
                    and not node.args and not node.keywords):
                found.append(Found(".squeeze()", span.location(node.lineno)))
    return _ordered(found)


def names_read(spans: Iterable[SourceSpan]) -> set[str]:
    """Every name the spans read (``Name`` nodes in load context).

    Example::

        names_read([SourceSpan("y = BATCH * x", "s.py")])   # {'BATCH', 'x'}
    """
    return {node.id for _, tree in _trees(spans) for node in ast.walk(tree)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


__all__ = ["FLOAT_FACTORIES", "Found", "bare_squeezes", "find_numbers", "float32_makers", "function_span", "names_read",
           "parse_span", "spans_for"]
