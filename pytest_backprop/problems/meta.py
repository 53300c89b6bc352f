"""What reports say of the lecture's problem without importing it (so without torch): xdist's
controller writes the JSON report's ``"problem"`` field but runs no check.

Example::

    from pytest_backprop.problems.meta import lecture_meta
    lecture_meta()   # {'name': 'makemore MLP (the lecture)', 'origin': 'reference_model.model'}
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

#: The module that is the lecture's problem (``--backprop-problem``'s default).
LECTURE_MODULE = "reference_model.model"


def lecture_meta() -> dict[str, str]:
    """The lecture problem's ``{"name", "origin"}`` as :class:`~pytest_backprop.problems.spec.ProblemSpec`
    has them, read from the ``NAME = "..."`` of its file rather than by importing it."""
    spec = importlib.util.find_spec(LECTURE_MODULE)
    tree = ast.parse(Path(spec.origin).read_text()) if spec and spec.origin else ast.Module([], [])
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id == "NAME" for t in node.targets)):
            return {"name": str(node.value.value), "origin": LECTURE_MODULE}
    return {"name": LECTURE_MODULE, "origin": LECTURE_MODULE}
