"""Reading a forward function's source (with :mod:`ast`, nothing executed) into its assignments.

Straight-line code only: one ``name = <expression>`` per line, each name assigned once, ending in
``return <loss>``. Anything else -- a loop, an if, ``a = b = ...``, ``a, b = ...``, ``x += ...``,
two statements on one line, an in-place ``.add_()``, a name read before it is assigned or defined
nowhere, a line nobody reads -- is a :class:`~pytest_backprop.problems.errors.ProblemError` naming
the file, the line and its source.

Example::

    parsed = parse_forward(forward)
    [s.output for s in parsed.statements][:3]   # ['emb', 'embcat', 'hprebn']
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
from types import CodeType
from typing import Any, Callable, NamedTuple

from .errors import ProblemError, display_path

#: The output name of a ``return <expr>`` line.
RETURN_NAME = "loss"


class Statement(NamedTuple):
    """One assignment of a parsed forward, before the names it reads are classified."""

    output: str
    source: str
    expression: ast.expr
    reads: tuple[str, ...]  # local names (arguments, earlier outputs) it reads, in order
    location: str
    code: CodeType


class ParsedForward(NamedTuple):
    """A forward function read by :func:`parse_forward`: arguments, assignments, the loss's name."""

    function: Callable
    arguments: tuple[str, ...]
    statements: tuple[Statement, ...]
    loss: str
    location: str  # of the ``def`` line
    signature: str  # the ``def`` line's text
    return_location: str
    return_source: str
    env: dict[str, Any]


_LOOPS = (ast.For, ast.AsyncFor, ast.While)
_SCOPES = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda)
_STRAIGHT = ("the kit needs straight-line code, one `name = <expression>` per line, "
             "ending in `return <scalar loss>`")


def _statement_problem(node: ast.stmt) -> str:
    """Why a statement that is not ``name = <expr>`` or the final return cannot be derived from."""
    if isinstance(node, _LOOPS):
        return f"a loop: write one line per step ({_STRAIGHT})"
    if isinstance(node, ast.If):
        return f"an if: the table must be the same for every input ({_STRAIGHT})"
    if isinstance(node, ast.AugAssign):
        return ("augmented assignment: it reassigns a name the table already has; "
                "write a new name (`x2 = x + ...`)")
    if isinstance(node, (ast.With, ast.AsyncWith, ast.Try, getattr(ast, "Match", ast.Try))):
        return f"a {type(node).__name__.lower()} block ({_STRAIGHT})"
    if isinstance(node, ast.Expr):
        return f"an expression whose value is not assigned ({_STRAIGHT})"
    return f"a `{type(node).__name__}` statement ({_STRAIGHT})"


def _expression_problem(expr: ast.expr) -> str | None:
    """Why an expression cannot be one line of the table, or None."""
    for node in ast.walk(expr):
        if isinstance(node, _SCOPES):
            return "a loop inside an expression (comprehension or lambda): write one line per step"
        if isinstance(node, ast.IfExp):
            return "an if inside an expression (`a if c else b`): the table must be the same for every input"
        if isinstance(node, ast.NamedExpr):
            return "an assignment inside an expression (`:=`): write it as its own line"
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)):
            return f"`{type(node).__name__.lower()}` in a forward pass"
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr.endswith("_") and not node.func.attr.startswith("_")):
            return (f"an in-place operation `.{node.func.attr}()`: it changes a tensor the table already has; "
                    f"write `.{node.func.attr[:-1]}()` into a new name")
    return None


def _names_read(expr: ast.expr) -> list[str]:
    """Every name the expression reads, in source order (first appearance)."""
    found = sorted((n for n in ast.walk(expr) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)),
                   key=lambda n: (n.lineno, n.col_offset))
    return list(dict.fromkeys(n.id for n in found))


def parse_forward(forward: Callable) -> ParsedForward:
    """Read ``forward``'s source into its assignments; raise :class:`ProblemError` naming the line
    for anything that is not straight-line code.

    Example::

        parsed = parse_forward(forward)
        [s.output for s in parsed.statements][:3]   # ['emb', 'embcat', 'hprebn']
    """
    name = getattr(forward, "__name__", repr(forward))
    try:
        lines, first = inspect.getsourcelines(forward)
        filename = inspect.getsourcefile(forward) or inspect.getfile(forward)
    except (OSError, TypeError) as exc:
        raise ProblemError(f"the kit reads forward's source, but {name} has none it can read ({exc}); "
                           "define forward with `def` in a .py file") from None
    text = textwrap.dedent("".join(lines))
    tree = ast.parse(text)
    fdef = tree.body[0]
    shown = display_path(filename)
    offset = first - 1
    encoded = [line.encode() for line in text.splitlines(keepends=True)]

    def where(node: ast.AST) -> str:
        return f"{shown}:{node.lineno + offset}"

    def segment(node: ast.AST) -> str:
        """The node's exact source text (``ast.get_source_segment``, without re-splitting the text)."""
        start, end = node.lineno - 1, node.end_lineno - 1  # type: ignore[attr-defined]
        if start == end:
            return encoded[start][node.col_offset:node.end_col_offset].decode().strip()  # type: ignore[attr-defined]
        parts = [encoded[start][node.col_offset:], *encoded[start + 1:end],
                 encoded[end][:node.end_col_offset]]  # type: ignore[attr-defined]
        return b"".join(parts).decode().strip()

    if not isinstance(fdef, ast.FunctionDef):
        raise ProblemError("forward must be a function defined with `def` (not a lambda or an async def)",
                           where=f"{shown}:{first}", source=lines[0].strip())
    def_source = lines[fdef.lineno - 1].strip()
    location = where(fdef)
    if fdef.decorator_list:
        raise ProblemError("forward must not be decorated: the kit runs its lines itself",
                           where=where(fdef.decorator_list[0]), source=segment(fdef.decorator_list[0]))
    a = fdef.args
    if a.vararg or a.kwarg:
        raise ProblemError("forward takes *args or **kwargs; name every input (the keys make_inputs returns)",
                           where=location, source=def_source)
    if a.defaults or any(d is not None for d in a.kw_defaults):
        raise ProblemError("forward's arguments have defaults; every argument is an input that make_inputs "
                           "returns (a fixed number can be a constant of the module)", where=location, source=def_source)
    arguments = tuple(arg.arg for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs))
    env = forward.__globals__
    body = list(fdef.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    if not body or not isinstance(body[-1], ast.Return):
        last = body[-1] if body else fdef
        raise ProblemError("forward must end in `return <scalar loss>`", where=where(last),
                           source=segment(last) if body else def_source)

    assigned: dict[str, str] = {arg: location for arg in arguments}
    pending: list[tuple[str, ast.expr, ast.AST]] = []
    seen_lines: dict[int, ast.stmt] = {}
    for node in body:
        if node.lineno in seen_lines:
            raise ProblemError(f"two statements on one line ({_STRAIGHT})", where=where(node),
                               source=lines[node.lineno - 1].strip() if node.lineno - 1 < len(lines) else segment(node))
        seen_lines[node.lineno] = node
        if isinstance(node, ast.Return):
            if node is not body[-1]:
                raise ProblemError("a return before the end of forward: the loss is the last line",
                                   where=where(node), source=segment(node))
            continue
        if isinstance(node, ast.Assign):
            if len(node.targets) != 1:
                raise ProblemError("two assignments in one line (`a = b = ...`): give each name its own line",
                                   where=where(node), source=segment(node))
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            raise ProblemError(_statement_problem(node), where=where(node), source=lines[node.lineno - 1].strip())
        if isinstance(target, (ast.Tuple, ast.List, ast.Starred)):
            raise ProblemError("a tuple target (`a, b = ...`): one name per line, so that each gets its own gradient",
                               where=where(node), source=segment(node))
        if not isinstance(target, ast.Name):
            raise ProblemError(f"assigns into `{segment(target)}` in place: write the result into a new name",
                               where=where(node), source=segment(node))
        problem = _expression_problem(value)
        if problem:
            raise ProblemError(problem, where=where(node), source=segment(node))
        out = target.id
        if out in assigned:
            first_site = assigned[out]
            what = "an argument of forward" if first_site == location else f"already assigned on {first_site}"
            raise ProblemError(f"`{out}` is {what}: a name is assigned once, so that it has one gradient",
                               where=where(node), source=segment(node))
        assigned[out] = where(node)
        pending.append((out, value, node))

    ret = body[-1]
    assert isinstance(ret, ast.Return)
    return_location = where(ret)
    if ret.value is None or isinstance(ret.value, (ast.Tuple, ast.List, ast.Dict, ast.Set)):
        raise ProblemError("forward must return the scalar loss (one tensor), not "
                           + ("nothing" if ret.value is None else "a collection"), where=return_location,
                           source=segment(ret))
    if isinstance(ret.value, ast.Name):
        loss = ret.value.id
        if loss in arguments:
            raise ProblemError(f"forward returns its argument `{loss}`: the loss must be computed by its lines",
                               where=return_location, source=segment(ret))
        if loss not in assigned:
            raise ProblemError(f"returns `{loss}`, which no line of forward assigns", where=return_location,
                               source=segment(ret))
    else:
        problem = _expression_problem(ret.value)
        if problem:
            raise ProblemError(problem, where=return_location, source=segment(ret))
        if RETURN_NAME in assigned:
            raise ProblemError(f"returns an expression, but a line already assigns `{RETURN_NAME}`: "
                               f"write `return {RETURN_NAME}` or name the expression", where=return_location,
                               source=segment(ret))
        loss = RETURN_NAME
        pending.append((loss, ret.value, ret))

    statements: list[Statement] = []
    defined = set(arguments)
    for out, value, node in pending:
        site = where(node)
        source = f"{out} = {segment(value)}" if node is ret else segment(node)
        reads = []
        for read in _names_read(value):
            if read in defined:
                reads.append(read)
            elif read in assigned:
                raise ProblemError(f"reads `{read}` before the line that assigns it ({assigned[read]})",
                                   where=site, source=segment(node))
            elif read not in env and not hasattr(builtins, read):
                raise ProblemError(f"reads `{read}`, which is not an argument of forward, an earlier line's output "
                                   "or a global of its module", where=site, source=segment(node))
        defined.add(out)
        code = compile(source, f"<forward {site}: {source}>", "exec")
        statements.append(Statement(out, source, value, tuple(reads), site, code))

    read_later = {r for s in statements for r in s.reads}
    for s in statements:
        if s.output != loss and s.output not in read_later:
            raise ProblemError(f"computes `{s.output}`, which no later line reads and which is not the loss: "
                               "remove the line (or return it)", where=s.location, source=s.source)
    return ParsedForward(forward, arguments, tuple(statements), loss, location, def_source, return_location,
                         segment(ret), env)
