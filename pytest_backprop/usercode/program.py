"""User code as a program of top-level statements: analysed once, compiled once, run under a plan.

A script, the cells of a notebook and the body of a module's ``backward(cache)`` are all straight-line
code. Each becomes a :class:`Program`: its *units* (the script, each cell, the function) hold top-level
:class:`Statement` records that say what each statement binds (``stores``), reads (``loads``) and where
it is (a :class:`~pytest_backprop.verdict.Location`). The program knows which variables hold which
gradient (``dprobs`` -> ``probs``, and renamed ones through the student's own ``cmp(s, dt, t)`` calls).

Every statement is compiled once, wrapped so that a run can be steered by a :class:`Plan`:

- ``substitute``: after the last statement that writes a gradient's variable (or instead of a statement
  that raised), the variable is set to a fresh copy of the true gradient. The kit re-runs the code this
  way to grade every later gradient as if the earlier ones were right (independent grading);
- ``continue_past``: statements whose exception no longer stops their unit (their gradients are
  substituted, the rest of the unit runs);
- ``inject``: true gradients put in the namespace before the run, for gradient variables the code reads
  but never writes (not attempted yet): later lines that use them run as if they were right.

An exception stops the rest of its unit, as in Python and in a notebook's cell (the next cell still
runs, as "run all, ignoring errors" would). A ``cmp(...)`` call on a gradient that is not written yet
(a NameError) is "not attempted", not an error. A placeholder (``dlogits = None``) never replaces an
answer already computed. Statements that only drive autograd (``loss.backward()``,
``t.retain_grad()``, ``p.grad = None``) are skipped: the kit hands out tensors without a graph.

Example::

    program = Program.from_source(source, SourceSpan(source, "student.py"), filename="/abs/student.py")
    outcome = program.run(namespace, Plan(), timeout=60, locate=impl._locate)
    outcome.completed, outcome.failures
"""

from __future__ import annotations

import ast
import copy
import functools
import sys
import textwrap
import time
from dataclasses import dataclass, field
from types import CodeType
from typing import Any, Callable, Iterable, Mapping

from ..verdict import Diagnosis, Location
from .base import GradientError, RunResult, SourceSpan
from .run import RUNS, UserCodeTimeout, UserError, call_user

HOOK = "__backprop_hook__"
#: Methods whose call only drives autograd (skipped: the kit's tensors have no graph).
AUTOGRAD_CALLS = frozenset({"backward", "retain_grad", "zero_grad", "requires_grad_"})
#: Attributes whose assignment only drives autograd (``p.grad = None``, ``p.requires_grad = True``).
AUTOGRAD_ATTRS = frozenset({"grad", "requires_grad"})


@dataclass(frozen=True)
class Statement:
    """One top-level statement of the user's code."""

    index: int  # position in the whole program
    unit: int  # the unit (cell, script, function) it belongs to
    lineno: int  # first line, within the unit's text
    location: Location
    source: str  # the whole statement's text
    stores: frozenset[str]  # names it binds or modifies (``dC[ix] += ...`` modifies dC)
    loads: frozenset[str]
    kind: str = "code"  # code | placeholder (``dX = None``) | cmp (a call of cmp) | autograd (skipped)
    augmented: bool = False  # ``+=`` and friends: it accumulates into what is there

    def describe(self) -> str:
        """``cell 4, line 2`` / ``student.py:12``."""
        return self.location.describe()


@dataclass
class Unit:
    """A piece of code run as a whole: a script, one notebook cell, or one function's body."""

    span: SourceSpan
    filename: str  # the name the code is compiled under (tracebacks are located by it)
    tree: ast.Module | None
    statements: list[Statement] = field(default_factory=list)
    syntax_error: UserError | None = None
    code: CodeType | None = None
    function: str | None = None  # a function unit: the name of the function whose body it is
    assigned_text: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Plan:
    """How to steer a run: true gradients to substitute, statements to continue past, gradients to inject.

    Example::

        Plan(substitute={"probs": true_dprobs}, continue_past=frozenset({7}))
    """

    substitute: Mapping[str, Any] = field(default_factory=dict)
    continue_past: frozenset[int] = frozenset()
    inject: Mapping[str, Any] = field(default_factory=dict)

    def with_(self, *, substitute: Mapping[str, Any] | None = None, continue_past: Iterable[int] = ()) -> "Plan":
        """A plan that also substitutes ``substitute`` and continues past ``continue_past``."""
        return Plan({**self.substitute, **(substitute or {})}, self.continue_past | frozenset(continue_past),
                    self.inject)


@dataclass(frozen=True)
class Failure:
    """A statement that raised: the exception located in the user's code."""

    statement: Statement
    error: UserError


@dataclass
class Outcome:
    """What a run did, statement by statement."""

    completed: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)  # placeholders kept out, autograd-only statements
    failures: dict[int, Failure] = field(default_factory=dict)
    unwritten_cmp: set[int] = field(default_factory=set)  # cmp(...) of a gradient not written yet
    timed_out: Failure | None = None
    substituted: set[str] = field(default_factory=set)  # tensors whose truth was put in place
    injected: dict[str, int] = field(default_factory=dict)  # variable -> id() of the truth injected for it
    frame_locals: dict[str, Any] = field(default_factory=dict)  # a function unit's variables when it raised

    def ran(self, index: int) -> bool:
        return index in self.completed or index in self.skipped


class Hook:
    """The object instrumented code calls (``__backprop_hook__``): records and steers one run."""

    def __init__(self, program: "Program", plan: Plan, namespace: dict[str, Any] | None,
                 locate: Callable[[BaseException], UserError]):
        self.program, self.plan, self.namespace, self.locate = program, plan, namespace, locate
        self.outcome = Outcome()

    def run(self, index: int) -> bool:
        """Whether statement ``index`` runs (placeholders over an answer and autograd calls do not)."""
        st = self.program.statements[index]
        if st.kind == "autograd":
            self.outcome.skipped.add(index)
            return False
        if st.kind == "placeholder" and self.namespace is not None and any(
                self.namespace.get(v) is not None for v in st.stores):
            self.outcome.skipped.add(index)
            return False
        return True

    def done(self, index: int) -> None:
        self.outcome.completed.add(index)

    def failed(self, index: int, exc: BaseException) -> None:
        """Record the exception of statement ``index``; re-raise it unless the plan continues past."""
        st = self.program.statements[index]
        if isinstance(exc, (KeyboardInterrupt, UserCodeTimeout)):
            self.outcome.timed_out = Failure(st, self.locate(exc)) if isinstance(exc, UserCodeTimeout) else None
            raise exc
        if st.kind == "cmp" and isinstance(exc, NameError) and getattr(exc, "name", None) in self.program.gradient_vars:
            self.outcome.unwritten_cmp.add(index)  # the lecture's cmp line of a gradient not written yet
            return
        self.outcome.failures[index] = Failure(st, self.locate(exc))
        if index not in self.plan.continue_past or isinstance(exc, SystemExit):
            if self.namespace is None:  # a function's body: keep what it had computed (it returns nothing now)
                self.outcome.frame_locals = dict(sys._getframe(1).f_locals)
            raise exc

    def sub(self, tensor: str) -> bool:
        return tensor in self.plan.substitute

    def truth(self, tensor: str) -> Any:
        self.outcome.substituted.add(tensor)
        return _fresh(self.plan.substitute[tensor])


def _fresh(value: Any) -> Any:
    clone = getattr(value, "clone", None)
    return value.detach().clone() if callable(clone) and hasattr(value, "detach") else value


# --- analysis ---------------------------------------------------------------------------------

def bound_names(target: ast.AST) -> list[str]:
    """The variable names an assignment target binds or modifies (``x``, ``x[i]``, ``x.y``, ``a, b``).

    Example::

        bound_names(ast.parse("dC[ix] += 1").body[0].target)   # ['dC']
    """
    while isinstance(target, (ast.Subscript, ast.Attribute, ast.Starred)):
        target = target.value
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in bound_names(elt)]
    return []


def _stores_and_loads(node: ast.stmt) -> tuple[set[str], set[str]]:
    stores: set[str] = set()
    loads: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for t in (sub.targets if isinstance(sub, ast.Assign) else [sub.target]):
                stores.update(bound_names(t))
        elif isinstance(sub, (ast.For, ast.AsyncFor, ast.comprehension)):
            stores.update(bound_names(sub.target))
        elif isinstance(sub, ast.withitem) and sub.optional_vars is not None:
            stores.update(bound_names(sub.optional_vars))
        elif isinstance(sub, ast.NamedExpr):
            stores.update(bound_names(sub.target))
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stores.add(sub.name)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            stores.update((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr.endswith("_") \
                and not sub.func.attr.startswith("_"):
            stores.update(bound_names(sub.func.value))  # in-place methods: dC.index_add_(...), x.mul_(2)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
            loads.add(sub.id)
    return stores, loads


def _is_autograd_only(node: ast.stmt) -> bool:
    """``loss.backward()``, ``t.retain_grad()``, ``p.grad = None``, or a loop of only those."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute):
        return node.value.func.attr in AUTOGRAD_CALLS
    if isinstance(node, ast.Assign):
        return all(isinstance(t, ast.Attribute) and t.attr in AUTOGRAD_ATTRS for t in node.targets)
    if isinstance(node, ast.For) and not node.orelse:  # `for p in parameters: p.grad = None`
        calls = [s for s in node.body if not isinstance(s, ast.Pass)]
        return bool(calls) and all(_is_autograd_only(s) for s in calls)
    return False


def _kind(node: ast.stmt, gradient_vars: Callable[[str], bool]) -> str:
    if _is_autograd_only(node):
        return "autograd"
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value is None and all(
            isinstance(t, ast.Name) and gradient_vars(t.id) for t in node.targets):
        return "placeholder"
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) \
            and node.value.func.id == "cmp":
        return "cmp"
    return "code"


def cmp_names(tree: ast.AST, tensors: Iterable[str]) -> dict[str, str]:
    """``{variable: tensor}`` from the student's ``cmp(s, dt, t)`` calls (``t`` names the tensor).

    Example::

        cmp_names(ast.parse("cmp('logprobs', dL_dlp, logprobs)"), ["logprobs"])   # {'dL_dlp': 'logprobs'}
    """
    known = set(tensors)
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cmp" \
                and len(node.args) >= 3 and isinstance(node.args[1], ast.Name):
            t, s = node.args[2], node.args[0]
            tensor = t.id if isinstance(t, ast.Name) and t.id in known else (
                s.value.strip() if isinstance(s, ast.Constant) and isinstance(s.value, str) else None)
            if tensor in known:
                out[node.args[1].id] = tensor
    return out


# --- instrumentation -----------------------------------------------------------------------------

def _hook_call(method: str, *args: ast.expr) -> ast.Call:
    return ast.Call(ast.Attribute(ast.Name(HOOK, ast.Load()), method, ast.Load()), list(args), [])


def _substitutions(variables: Iterable[tuple[str, str]]) -> list[ast.stmt]:
    """``if hook.sub('X'): v = hook.truth('X')`` for each (variable, tensor)."""
    out: list[ast.stmt] = []
    for var, tensor in variables:
        assign = ast.Assign([ast.Name(var, ast.Store())], _hook_call("truth", ast.Constant(tensor)))
        out.append(ast.If(_hook_call("sub", ast.Constant(tensor)), [assign], []))
    return out


def _wrap(node: ast.stmt, index: int, after: list[tuple[str, str]], on_failure: list[tuple[str, str]]) -> ast.stmt:
    """``if hook.run(i): try: <node> except BaseException as e: hook.failed(i, e); <subs> else: hook.done(i); <subs>``."""
    exc = "__backprop_exc__"
    handler = ast.ExceptHandler(ast.Name("BaseException", ast.Load()), exc, [
        ast.Expr(_hook_call("failed", ast.Constant(index), ast.Name(exc, ast.Load()))), *_substitutions(on_failure)])
    body = ast.Try([node], [handler], [ast.Expr(_hook_call("done", ast.Constant(index))), *_substitutions(after)], [])
    # the wrapper's nodes take the statement's first line (fix_missing_locations copies it down to them)
    return ast.copy_location(ast.If(_hook_call("run", ast.Constant(index)), [body], []), node)


# --- the program -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitSource:
    """The source of one unit before analysis: its text, where it is, and how to compile it."""

    text: str
    span: SourceSpan
    filename: str
    function: str | None = None  # instrument this function's body (a module's backward) instead of the top level
    syntax_error: UserError | None = None
    assigned_text: frozenset[str] = frozenset()  # for a unit that does not parse: the names it seems to assign


class Program:
    """Units of user code, analysed and instrumented once (see the module docstring)."""

    def __init__(self, units: list[UnitSource], tensors: Iterable[str], *, extra_names: Mapping[str, str] | None = None):
        self.tensors = tuple(tensors)
        self._writes: dict[str, tuple[Statement, ...]] = {}
        self._variables: dict[str, tuple[str, ...]] = {}
        self.units: list[Unit] = []
        self.statements: list[Statement] = []
        trees = [(u, _parse(u)) for u in units]
        names = {"d" + t: t for t in self.tensors}
        #: variables the student's own cmp calls (or a module's returned dict) name: they win over ``d<name>``
        self.named: dict[str, str] = dict(extra_names or {})
        for _, tree in trees:
            if tree is not None:
                self.named.update(cmp_names(tree, self.tensors))
        names.update(self.named)
        #: gradient variable -> tensor (``dprobs`` -> ``probs``; renamed ones from cmp calls)
        self.gradient_vars: dict[str, str] = names
        for source, tree in trees:
            self._add_unit(source, tree)
        self._instrument()

    @classmethod
    def from_source(cls, text: str, span: SourceSpan, *, filename: str, tensors: Iterable[str]) -> "Program":
        """A one-unit program (a script)."""
        return cls([UnitSource(text, span, filename)], tensors)

    # analysis
    def _add_unit(self, source: UnitSource, tree: ast.Module | None) -> None:
        unit = Unit(source.span, source.filename, tree, syntax_error=source.syntax_error, function=source.function,
                    assigned_text=source.assigned_text)
        if tree is None and unit.syntax_error is None:
            unit.syntax_error = _syntax_error(source)
        self.units.append(unit)
        if tree is None:
            return
        body = _function_body(tree, source.function) if source.function else tree.body
        if body is None:
            return
        lines = source.text.splitlines()
        for node in body:
            if isinstance(node, (ast.Global, ast.Nonlocal)):
                continue
            stores, loads = _stores_and_loads(node)
            text = "\n".join(lines[node.lineno - 1:(node.end_lineno or node.lineno)])
            st = Statement(len(self.statements), len(self.units) - 1, node.lineno, source.span.location(node.lineno),
                           textwrap.dedent(text),
                           frozenset(stores), frozenset(loads), _kind(node, self.gradient_vars.__contains__),
                           isinstance(node, ast.AugAssign))
            self.statements.append(st)
            unit.statements.append(st)

    def writes_of(self, var: str) -> list[Statement]:
        """The statements that bind or modify ``var``, in program order (placeholders excluded)."""
        if var not in self._writes:  # asked for every gradient after every run: the program never changes
            self._writes[var] = tuple(s for s in self.statements if var in s.stores
                                      and s.kind not in ("placeholder", "autograd"))
        return list(self._writes[var])

    def variables_of(self, tensor: str) -> list[str]:
        """The variables that hold ``tensor``'s gradient: those the student's cmp calls name first, then ``d<name>``."""
        if tensor not in self._variables:
            named = [v for v, t in self.named.items() if t == tensor]
            self._variables[tensor] = tuple(named + [v for v, t in self.gradient_vars.items()
                                                     if t == tensor and v not in named])
        return list(self._variables[tensor])

    def read_not_written(self) -> list[str]:
        """Gradients the code reads (a later line uses them) but never writes under any of their
        variables: not attempted yet. (One written under another name, ``x = dprobs`` with
        ``cmp('probs', x, probs)``, is the code's own answer and never gets the truth.)"""
        written = {v for s in self.statements if s.kind == "code" for v in s.stores}
        read = {v for s in self.statements if s.kind == "code" for v in s.loads}
        return [t for t in self.tensors if not any(v in written for v in self.variables_of(t))
                and any(v in read for v in self.variables_of(t))]

    # instrumentation
    def _instrument(self) -> None:
        last_write: dict[str, int] = {}
        for s in self.statements:
            if s.kind in ("placeholder", "autograd"):
                continue
            for v in s.stores:
                if v in self.gradient_vars:
                    last_write[v] = s.index
        for unit in self.units:
            if unit.tree is None:
                continue
            by_line = {s.lineno: s for s in unit.statements}

            def wrap_body(body: list[ast.stmt]) -> list[ast.stmt]:
                out = []
                for node in body:
                    st = by_line.get(node.lineno)
                    if st is None or isinstance(node, (ast.Global, ast.Nonlocal)):
                        out.append(node)
                        continue
                    mine = [(v, self.gradient_vars[v]) for v in sorted(st.stores) if v in self.gradient_vars]
                    after = [(v, t) for v, t in mine if last_write.get(v) == st.index]
                    out.append(_wrap(node, st.index, after, mine))
                return out

            tree = copy.deepcopy(unit.tree)  # the analysed tree stays as the user wrote it
            if unit.function:
                fn = _function_node(tree, unit.function)
                if fn is None:
                    continue
                fn.body = wrap_body(fn.body)
                module = ast.Module([fn], [])
            else:
                module = ast.Module(wrap_body(tree.body), [])
            ast.fix_missing_locations(module)
            unit.code = compile(module, unit.filename, "exec")

    # running
    def run(self, namespace: dict[str, Any], plan: Plan, *, timeout: float | None,
            locate: Callable[[BaseException], UserError]) -> Outcome:
        """Run the top-level units in ``namespace`` under ``plan``; function units are only defined
        (see :meth:`function`). Returns what ran and what failed."""
        RUNS["program"] += 1
        hook = Hook(self, plan, namespace, locate)
        namespace[HOOK] = hook
        for tensor, value in plan.inject.items():
            for var in self.variables_of(tensor):
                if var not in namespace:
                    namespace[var] = _fresh(value)
                    hook.outcome.injected[var] = id(namespace[var])
        deadline = time.monotonic() + timeout if timeout else None
        try:
            for number, unit in enumerate(self.units):
                if unit.code is None or unit.function:
                    continue
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
                _, exc = call_user(lambda: exec(unit.code, namespace), remaining)
                if isinstance(exc, UserCodeTimeout):
                    if hook.outcome.timed_out is None and unit.statements:
                        hook.outcome.timed_out = Failure(unit.statements[0], locate(exc))
                    break
                recorded = any(f.statement.unit == number for f in hook.outcome.failures.values())
                if exc is not None and not recorded and unit.statements:
                    # raised between statements (the kit's wrapper itself): keep it visible on the unit
                    hook.outcome.failures[unit.statements[-1].index] = Failure(unit.statements[-1], locate(exc))
        finally:
            namespace.pop(HOOK, None)
        return hook.outcome

    def function(self, globals_: Mapping[str, Any], plan: Plan, locate: Callable[[BaseException], UserError]
                 ) -> tuple[Callable[..., Any], Hook]:
        """The instrumented function of the (single) function unit, bound to a copy of ``globals_``."""
        unit = next(u for u in self.units if u.function)
        namespace = dict(globals_)
        hook = Hook(self, plan, None, locate)
        namespace[HOOK] = hook
        exec(unit.code, namespace)
        return namespace[unit.function], hook


def _parse(source: UnitSource) -> ast.Module | None:
    if source.syntax_error is not None:
        return None
    try:
        return ast.parse(source.text, source.filename)
    except (SyntaxError, ValueError):
        return None


def _syntax_error(source: UnitSource) -> UserError:
    """The syntax error of a unit that does not parse, with the offending line and a caret under it."""
    try:
        ast.parse(source.text, source.filename)
    except SyntaxError as exc:
        location = source.span.location(exc.lineno or 1)
        text = (exc.text or "").rstrip("\n")
        shown = text.strip() or location.source
        if text.strip() and exc.offset:
            indent = len(text) - len(text.lstrip())
            shown += "\n    " + " " * max(exc.offset - 1 - indent, 0) + "^"
        where = f"cell {location.cell}" if location.cell is not None else location.file
        return UserError("SyntaxError", exc.msg, where, location.line, shown)
    except ValueError as exc:  # e.g. null bytes
        return UserError("SyntaxError", str(exc), source.span.file)
    return UserError("SyntaxError", "cannot parse", source.span.file)


def _function_node(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def _function_body(tree: ast.Module, name: str) -> list[ast.stmt] | None:
    fn = _function_node(tree, name)
    return fn.body if fn is not None else None


def with_truths(plan: Plan | None, program: Program, truths: Mapping[str, Any]) -> Plan:
    """``plan`` (or an empty one) that also injects the truth of every gradient the code reads but never
    writes (not attempted yet), so the lines that use it run as if it were right.

    Example::

        plan = with_truths(None, program, problem.grads)
        plan.inject.keys()   # e.g. {'counts_sum_inv'} when dcounts_sum_inv is used but never written
    """
    plan = plan or Plan()
    inject = {t: truths[t] for t in program.read_not_written() if t in truths and t not in plan.inject}
    return Plan(plan.substitute, plan.continue_past, {**plan.inject, **inject}) if inject else plan


# --- from an outcome to a RunResult ------------------------------------------------------------------

def collect(program: Program, outcome: Outcome, namespace: Mapping[str, Any], handed_out: Mapping[str, Any],
            recorded: Mapping[str, Any] | None = None, *, tensors: Iterable[str] | None = None) -> RunResult:
    """The :class:`~pytest_backprop.usercode.base.RunResult` of a run: each gradient's final value (from
    the variable written last; truths the kit injected are not answers), the gradients whose own
    statement raised or did not run, warnings for other statements that raised, and the locations.

    ``tensors`` limits the gradients read back (an exercise's own); ``recorded`` holds what the
    namespace's ``cmp`` recorded (answers passed as expressions).
    """
    wanted = tuple(tensors) if tensors is not None else program.tensors
    grads: dict[str, Any] = {}
    for tensor in wanted:
        present = [v for v in program.variables_of(tensor) if v in namespace and v not in handed_out]
        present = [v for v in present if outcome.injected.get(v) != id(namespace[v])]
        named = [v for v in present if v in program.named]  # the student's cmp call says which is the answer
        if named or present:
            candidates = named or present
            last = max(candidates, key=lambda v: max((s.index for s in program.writes_of(v)), default=-1))
            grads[tensor] = namespace[last]
        elif recorded and tensor in recorded and not any(id(recorded[tensor]) == i for i in outcome.injected.values()):
            grads[tensor] = recorded[tensor]
    errors = gradient_errors(program, outcome, wanted)
    errors.update({t: e for t, e in syntax_errors(program, outcome, wanted).items() if t not in errors})
    warnings = statement_warnings(program, outcome)
    firsts = [(f.statement.unit, f.statement.index, f.error) for f in outcome.failures.values()]
    firsts += [(i, -1, u.syntax_error) for i, u in enumerate(program.units) if u.syntax_error is not None]
    first = outcome.timed_out.error if outcome.timed_out else (min(firsts, key=lambda x: x[:2])[2] if firsts else None)
    locations = {t: tuple(s.location for s in effective_writes(program, outcome, t)) for t in wanted}
    locations = {t: locs for t, locs in locations.items() if locs}
    return RunResult(grads, first, warnings, gradient_errors=errors, locations=locations,
                     failed_statements=tuple(outcome.failures), substituted=frozenset(outcome.substituted))


def effective_writes(program: Program, outcome: Outcome, tensor: str) -> list[Statement]:
    """The statements that make ``tensor``'s answer: from the last plain assignment that ran on (a
    later complete assignment starts the answer afresh, as a pasted solution below an attempt does)."""
    variables = program.variables_of(tensor)
    writes = sorted({s.index: s for v in variables for s in program.writes_of(v)}.values(), key=lambda s: s.index)
    fresh = [i for i, s in enumerate(writes) if s.index in outcome.completed and not s.augmented
             and not _modifies(s, variables)]
    return writes[fresh[-1]:] if fresh else writes


def gradient_errors(program: Program, outcome: Outcome, tensors: Iterable[str]) -> dict[str, GradientError]:
    """For each gradient: its statement raised, it is incomplete (a later ``+=`` did not run), or
    none of its statements ran. Gradients whose statements all ran are not listed."""
    out: dict[str, GradientError] = {}
    for tensor in tensors:
        writes = effective_writes(program, outcome, tensor)
        if not writes:
            continue
        if outcome.timed_out is not None and outcome.timed_out.statement is not None and any(
                s.index == outcome.timed_out.statement.index for s in writes):
            out[tensor] = GradientError("timeout", outcome.timed_out.error, outcome.timed_out.statement.location)
            continue
        raised = next((outcome.failures[s.index] for s in writes if s.index in outcome.failures), None)
        if raised is not None:
            out[tensor] = GradientError("raised", raised.error, raised.statement.location)
            continue
        missed = [s for s in writes if not outcome.ran(s.index)]
        if not missed:
            continue
        stopper = _stopper(program, outcome, missed[0])
        if stopper is None:
            continue  # not run for a reason that is no error (a unit that was never run)
        kind = "timeout" if stopper is outcome.timed_out else ("incomplete" if len(missed) < len(writes) else "not_reached")
        out[tensor] = GradientError(kind, stopper.error, missed[0].location)
    return out


def syntax_errors(program: Program, outcome: Outcome, tensors: Iterable[str]) -> dict[str, GradientError]:
    """Gradients a unit that does not parse seems to assign (and no later unit completes): the syntax error."""
    out: dict[str, GradientError] = {}
    for number, unit in enumerate(program.units):
        if unit.syntax_error is None:
            continue
        for tensor in tensors:
            if not any(v in unit.assigned_text for v in program.variables_of(tensor)):
                continue
            later = [s for v in program.variables_of(tensor) for s in program.writes_of(v)
                     if s.unit > number and s.index in outcome.completed]
            if not later:
                err = unit.syntax_error
                out[tensor] = GradientError("raised", err, Location(unit.span.file, err.lineno, unit.span.cell,
                                                                    err.source_line))
    return out


def _stopper(program: Program, outcome: Outcome, statement: Statement) -> Failure | None:
    """The failure that kept ``statement`` from running: an earlier one in its unit, or the time limit."""
    if outcome.timed_out is not None:
        t = outcome.timed_out.statement
        if t is None or t.index <= statement.index:
            return outcome.timed_out
    earlier = [f for f in outcome.failures.values() if f.statement.unit == statement.unit
               and f.statement.index < statement.index]
    return max(earlier, key=lambda f: f.statement.index) if earlier else None


def _modifies(statement: Statement, variables: list[str]) -> bool:
    """Whether the statement changes an existing value (``dC[ix] += ...``, ``dx.add_(...)``) rather than binding it."""
    return _source_modifies(statement.source, frozenset(variables))


@functools.lru_cache(maxsize=4096)  # asked for every gradient of every run: parse each statement once
def _source_modifies(source: str, variables: frozenset[str]) -> bool:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return True
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id in variables for t in node.targets):
                return False
            if any(isinstance(t, (ast.Subscript, ast.Attribute)) and bound_names(t)[:1] and bound_names(t)[0] in variables
                   for t in node.targets):
                return True
    return True


def statement_warnings(program: Program, outcome: Outcome) -> list[Diagnosis]:
    """Warnings for statements that raised but assign no gradient (a scratch line, a print)."""
    out = []
    for index in sorted(outcome.failures):
        failure = outcome.failures[index]
        if any(v in program.gradient_vars for v in failure.statement.stores):
            continue
        err = failure.error
        head = f"{err.type}: {err.message}" if err.message else err.type
        out.append(Diagnosis("statement_error", f"your code raised {head} at {failure.statement.describe()} "
                                                f"(`{_first_line(failure.statement.source)}`); that statement "
                                                "assigns no gradient, so the rest of its "
                                                + ("cell" if failure.statement.location.cell is not None else "code")
                                                + " did not run, and the kit graded the later gradients as if it had"))
    timed = outcome.timed_out
    if timed is not None and timed.statement is not None and not any(
            v in program.gradient_vars for v in timed.statement.stores):
        out.append(Diagnosis("timeout", f"{timed.error.describe()} (`{_first_line(timed.statement.source)}`: a "
                                        "statement that assigns no gradient)"))
    return out


def _first_line(source: str) -> str:
    first = source.strip().splitlines()[0] if source.strip() else ""
    return first + (" ..." if "\n" in source.strip() else "")
