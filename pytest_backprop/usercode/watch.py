"""Warnings about user code changing what the kit handed it: rebinding a forward name, editing in place.

Example::

    warnings = rebinding_warnings(program, namespace, handed_out, problem.truth.values)
    [w.code for w in warnings]   # ['reassigned_name'] after `for n in range(3): ...`
"""

from __future__ import annotations

import ast
from typing import Any, Mapping

import torch

from ..verdict import Diagnosis
from .program import Program, Statement, bound_names


def _loop_bound(statement: Statement) -> set[str]:
    """Names a statement binds as a loop or comprehension target (``for n in range(...)``)."""
    try:
        tree = ast.parse(statement.source)
    except SyntaxError:
        return set()
    return {name for node in ast.walk(tree) if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension))
            for name in bound_names(node.target)}


def _differs(value: Any, given: Any) -> bool:
    if value is given:
        return False
    if isinstance(value, torch.Tensor) and isinstance(given, torch.Tensor):
        return value.shape != given.shape or value.dtype != given.dtype or not torch.equal(value, given)
    try:
        return bool(value != given)
    except Exception:  # noqa: BLE001 -- an odd object the user bound: it is not what was given
        return True


def mutation_warnings(handed_out: Mapping[str, Any], originals: Mapping[str, Any]) -> list[Diagnosis]:
    """``mutated_input`` for every forward tensor the code modified in place."""
    return [Diagnosis("mutated_input", f"your code modified `{name}` in place; the kit's own copy is unaffected, but "
                                       "lines of yours that read it afterwards saw the modified values")
            for name, given in handed_out.items()
            if isinstance(given, torch.Tensor) and name in originals and not torch.equal(given, originals[name])]


def rebinding_warnings(program: Program, namespace: Mapping[str, Any], handed_out: Mapping[str, Any],
                       originals: Mapping[str, Any]) -> list[Diagnosis]:
    """``reassigned_name`` for each statement that rebinds a name the kit handed out, when that changes
    what later lines see (a loop variable always does; ``n = 32`` does not), quoting the statement and
    naming the gradients whose lines read the name afterwards; plus :func:`mutation_warnings`.

    Example::

        rebinding_warnings(program, namespace, handed_out, originals)[0].message
        # "your code rebinds `n` at cell 12, line 3 (`for n in range(Xb.shape[0]):`); ... dlogits (cell 14, line 2)"
    """
    warnings: list[Diagnosis] = []
    for st in program.statements:
        for name in sorted(st.stores & set(handed_out)):
            looped = name in _loop_bound(st)
            if not looped and not _differs(namespace.get(name, handed_out[name]), handed_out[name]):
                continue
            readers = [(t, s) for s in program.statements[st.index + 1:] if name in s.loads
                       for t in {program.gradient_vars[v] for v in s.stores if v in program.gradient_vars}]
            seen = dict.fromkeys(f"d{t} ({s.describe()})" for t, s in readers)
            later = (f"; lines after it that use `{name}`: {', '.join(list(seen)[:6])}"
                     + (" ..." if len(seen) > 6 else "") if seen else "")
            how = "loops over it" if looped else "assigns it"
            first = st.source.strip().splitlines()[0]
            warnings.append(Diagnosis("reassigned_name", f"your code rebinds `{name}` at {st.describe()} (`{first}`: "
                                                         f"it {how}), so later lines see your value of `{name}`, not "
                                                         f"the forward pass's{later}"))
    return warnings + mutation_warnings(handed_out, originals)


def forward_watch(handed_out: Mapping[str, Any], namespace: Mapping[str, Any], originals: Mapping[str, Any]) -> list[Diagnosis]:
    """The warnings for code run without statement records (a module's function): names of the
    namespace bound to something else than what was handed out, and in-place edits.

    Example::

        forward_watch(handed_out, handed_out, problem.truth.values)   # [] when nothing was modified
    """
    warnings = [Diagnosis("reassigned_name", f"your code rebinds `{name}`; later lines that use `{name}` see your "
                                             "value, not the forward pass's")
                for name, given in handed_out.items() if name in namespace and _differs(namespace[name], given)]
    return warnings + mutation_warnings(handed_out, originals)
