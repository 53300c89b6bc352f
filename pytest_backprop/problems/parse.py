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
from typing import Any, Callable, Mapping, NamedTuple

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


class _Source:
    """The forward's source lines, for the sites and exact texts of its nodes."""

    def __init__(self, forward: Callable) -> None:
        name = getattr(forward, "__name__", repr(forward))
        forward = inspect.unwrap(forward)  # a decorated forward: its own file (the decorator is an error)
        try:
            self.lines, first = inspect.getsourcelines(forward)
            filename = inspect.getsourcefile(forward) or inspect.getfile(forward)
        except (OSError, TypeError) as exc:
            raise ProblemError(f"the kit reads forward's source, but {name} has none it can read ({exc}); "
                               "define forward with `def` in a .py file") from None
        self.shown, self.offset = display_path(filename), first - 1
        text = textwrap.dedent("".join(self.lines))
        try:
            self.tree = ast.parse(text)
        except SyntaxError:  # a lambda inside an expression: its lines alone do not parse
            raise ProblemError("forward must be a function defined with `def` (not a lambda)",
                               where=f"{self.shown}:{first}", source=self.lines[0].strip()) from None
        self.encoded = [line.encode() for line in text.splitlines(keepends=True)]

    def where(self, node: ast.AST) -> str:
        return f"{self.shown}:{node.lineno + self.offset}"

    def line(self, node: ast.AST) -> str:
        """The text of the node's first line."""
        return self.lines[node.lineno - 1].strip()

    def segment(self, node: ast.AST) -> str:
        """The node's exact source text (``ast.get_source_segment``, without re-splitting the text)."""
        start, end = node.lineno - 1, node.end_lineno - 1  # type: ignore[attr-defined]
        if start == end:
            return self.encoded[start][node.col_offset:node.end_col_offset].decode().strip()  # type: ignore[attr-defined]
        parts = [self.encoded[start][node.col_offset:], *self.encoded[start + 1:end],
                 self.encoded[end][:node.end_col_offset]]  # type: ignore[attr-defined]
        return b"".join(parts).decode().strip()

    def error(self, message: str, node: ast.AST, *, whole: bool = True) -> ProblemError:
        return ProblemError(message, where=self.where(node), source=self.segment(node) if whole else self.line(node))


def _signature(src: _Source, fdef: ast.AST) -> tuple[str, ...]:
    """The forward's arguments; it must be a plain ``def`` whose arguments are all inputs."""
    if not isinstance(fdef, ast.FunctionDef):
        raise src.error("forward must be a function defined with `def` (not a lambda or an async def)", fdef,
                        whole=False)
    if fdef.decorator_list:
        raise src.error("forward must not be decorated: the kit runs its lines itself", fdef.decorator_list[0],
                        whole=False)
    a = fdef.args
    if a.vararg or a.kwarg:
        raise src.error("forward takes *args or **kwargs; name every input (the keys make_inputs returns)", fdef,
                        whole=False)
    if a.defaults or any(d is not None for d in a.kw_defaults):
        raise src.error("forward's arguments have defaults; every argument is an input that make_inputs returns "
                        "(a fixed number can be a constant of the module)", fdef, whole=False)
    return tuple(arg.arg for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs))


def _assignment(src: _Source, node: ast.stmt) -> tuple[str, ast.expr]:
    """``(name, expression)`` of a statement ``name = expression``; anything else is an error."""
    if isinstance(node, ast.Assign):
        if len(node.targets) != 1:
            raise src.error("two assignments in one line (`a = b = ...`): give each name its own line", node)
        target, value = node.targets[0], node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        target, value = node.target, node.value
    else:
        raise src.error(_statement_problem(node), node, whole=False)
    if isinstance(target, (ast.Tuple, ast.List, ast.Starred)):
        raise src.error("a tuple target (`a, b = ...`): one name per line, so that each gets its own gradient", node)
    if not isinstance(target, ast.Name):
        raise src.error(f"assigns into `{src.segment(target)}` in place: write the result into a new name", node)
    problem = _expression_problem(value)
    if problem:
        raise src.error(problem, node)
    return target.id, value


def _loss(src: _Source, ret: ast.Return, arguments: tuple[str, ...], assigned: Mapping[str, str]) -> str | None:
    """The returned name, or None for ``return <expr>`` (the line ``loss = <expr>``)."""
    if ret.value is None or isinstance(ret.value, (ast.Tuple, ast.List, ast.Dict, ast.Set)):
        raise src.error("forward must return the scalar loss (one tensor), not "
                        + ("nothing" if ret.value is None else "a collection"), ret)
    if isinstance(ret.value, ast.Name):
        loss = ret.value.id
        if loss in arguments:
            raise src.error(f"forward returns its argument `{loss}`: the loss must be computed by its lines", ret)
        if loss not in assigned:
            raise src.error(f"returns `{loss}`, which no line of forward assigns", ret)
        return loss
    problem = _expression_problem(ret.value)
    if problem:
        raise src.error(problem, ret)
    if RETURN_NAME in assigned:
        raise src.error(f"returns an expression, but a line already assigns `{RETURN_NAME}`: "
                        f"write `return {RETURN_NAME}` or name the expression", ret)
    return None


def parse_forward(forward: Callable) -> ParsedForward:
    """Read ``forward``'s source into its assignments; raise :class:`ProblemError` naming the line
    for anything that is not straight-line code.

    Example::

        parsed = parse_forward(forward)
        [s.output for s in parsed.statements][:3]   # ['emb', 'embcat', 'hprebn']
    """
    src = _Source(forward)
    fdef = src.tree.body[0]
    arguments = _signature(src, fdef)
    assert isinstance(fdef, ast.FunctionDef)
    location, signature = src.where(fdef), src.line(fdef)
    env = forward.__globals__
    body = list(fdef.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    if not body or not isinstance(body[-1], ast.Return):
        raise src.error("forward must end in `return <scalar loss>`", body[-1] if body else fdef, whole=bool(body))

    assigned: dict[str, str] = {arg: location for arg in arguments}
    pending: list[tuple[str, ast.expr, ast.AST]] = []
    lines_seen: set[int] = set()
    for node in body:
        if node.lineno in lines_seen:
            raise src.error(f"two statements on one line ({_STRAIGHT})", node, whole=False)
        lines_seen.add(node.lineno)
        if isinstance(node, ast.Return):
            if node is not body[-1]:
                raise src.error("a return before the end of forward: the loss is the last line", node)
            continue
        out, value = _assignment(src, node)
        if out in assigned:
            what = "an argument of forward" if assigned[out] == location else f"already assigned on {assigned[out]}"
            raise src.error(f"`{out}` is {what}: a name is assigned once, so that it has one gradient", node)
        assigned[out] = src.where(node)
        pending.append((out, value, node))
    ret = body[-1]
    assert isinstance(ret, ast.Return)
    loss = _loss(src, ret, arguments, assigned)
    if loss is None:
        loss = RETURN_NAME
        pending.append((loss, ret.value, ret))  # type: ignore[arg-type]

    statements: list[Statement] = []
    defined = set(arguments)
    for out, value, node in pending:
        site = src.where(node)
        source = f"{out} = {src.segment(value)}" if node is ret else src.segment(node)
        reads = []
        for read in _names_read(value):
            if read in defined:
                reads.append(read)
            elif read in assigned:
                raise src.error(f"reads `{read}` before the line that assigns it ({assigned[read]})", node)
            elif read not in env and not hasattr(builtins, read):
                raise src.error(f"reads `{read}`, which is not an argument of forward, an earlier line's output "
                                "or a global of its module", node)
        defined.add(out)
        code = compile(source, f"<forward {site}: {source}>", "exec")
        statements.append(Statement(out, source, value, tuple(reads), site, code))

    read_later = {r for s in statements for r in s.reads}
    for s in statements:
        if s.output != loss and s.output not in read_later:
            raise ProblemError(f"computes `{s.output}`, which no later line reads and which is not the loss: "
                               "remove the line (or return it)", where=s.location, source=s.source)
    return ParsedForward(forward, arguments, tuple(statements), loss, location, signature, src.where(ret),
                         src.segment(ret), env)
