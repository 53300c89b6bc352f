"""Answers copied from autograd: ``.grad``, ``.backward()``, ``retain_grad`` and ``torch.autograd`` in user source.

The source is scanned (never run); answers that come from autograd get the ``reads_autograd`` verdict.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from typing import Any, Callable, Iterable

from ..problems.lecture import GRADIENT_ORDER

from ..verdict import Diagnosis
from .base import RunResult
from .program import bound_names

_AUTOGRAD_ATTRS = {"grad", "backward", "retain_grad", "retain_grads", "autograd"}
_AUTOGRAD_TEXT = re.compile(r"\.(grad|backward|retain_grad|retain_grads)\b|\bautograd\b")


def _reads_autograd(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in _AUTOGRAD_ATTRS for n in ast.walk(node)) or any(
        isinstance(n, ast.Name) and n.id == "autograd" for n in ast.walk(node))


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
                    for name in bound_names(t):
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
                   where: Callable[[str, int], str] = lambda f, l: f"{f}:{l}", *,
                   tensors: Iterable[str] = GRADIENT_ORDER) -> None:
    """Mark answers (and an exception) that come from ``.grad``/``.backward()`` with ``reads_autograd``.

    ``sources`` is [(source text, display name)]; ``where(name, lineno)`` formats a location;
    ``tensors`` are the problem's gradient names (the lecture's by default).

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

        for tensor in tensors:
            lineno = use.assigned.get("d" + tensor) or use.cmp_direct.get(tensor) or next(
                (use.assigned[v] for v, t in use.cmp_vars.items() if t == tensor and v in use.assigned), None)
            if lineno is not None and tensor not in run.overrides:
                run.overrides[tensor] = Diagnosis("reads_autograd", _autograd_message(tensor, *at(lineno)))
        run.error = _explain(run.error, use, at)
        run.gradient_errors = {t: dc_replace(e, error=_explain(e.error, use, at)) for t, e in run.gradient_errors.items()}


def _explain(err: Any, use: AutogradUse, at: Callable[[int], tuple[str, str | None]]) -> Any:
    """An exception caused by reading autograd (a copied ``.grad`` is None here) gets ``reads_autograd``."""
    if err is None or err.code is not None or not err.source_line:
        return err
    copied = [v for v in use.assigned if re.search(rf"\b{re.escape(v)}\b", err.source_line)]
    if copied and "NoneType" in err.message:
        line = use.assigned[copied[0]]
        return dc_replace(err, code="reads_autograd", message=(
            f"{err.message} (`{copied[0]}` is None: it is copied from autograd at {at(line)[0]}, but the kit hands "
            "your code tensors without .grad and checks your own derivation: compute it by the chain rule)"))
    if _AUTOGRAD_TEXT.search(err.source_line):
        return dc_replace(err, code="reads_autograd", message=(
            f"{err.message} (this line reads autograd: .grad / .backward(); the kit hands your code tensors "
            "without .grad and no graph, and checks your own derivation: compute the gradient by the chain rule)"))
    return err
