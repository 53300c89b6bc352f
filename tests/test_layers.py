"""The package's layers: every import (module level or inside a function) points down the stack or
stays in its own layer, and no two modules import each other in a circle (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_backprop"

#: Bottom to top. A module may import its own layer's modules and any layer below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("verdict", "options", "markers"),  # records and settings: no torch
    ("problems",),
    ("usercode",),
    ("judge",),
    ("report",),
    ("checks",),
    ("properties",),
    ("grading",),
    ("items",),
    ("plugin", "fixtures", "__init__", "strategies", "problem", "gradescope", "magics"),  # the faces
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def layer_of(module: str) -> str:
    return module.split(".")[0]


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports (relative or absolute, at any depth), docstrings excluded."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "pytest_backprop":
                target = node.module.split(".")[1:]
            else:
                continue
            if not target:  # `from . import options`
                found.update(alias.name for alias in node.names)
                continue
            dotted = ".".join(target)
            submodules = [f"{dotted}.{a.name}" for a in node.names if (PACKAGE / dotted.replace(".", "/") / f"{a.name}.py").exists()]
            found.update(submodules or [dotted])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("pytest_backprop."))
    return found


def all_modules() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    unknown = sorted({layer_of(m) for m in all_modules()} - set(RANK))
    assert not unknown, f"modules outside every layer: {unknown} (add them to LAYERS and docs/architecture.md)"


def test_imports_point_down():
    upward = [f"{m} imports {t}" for m, targets in all_modules().items() for t in targets
              if RANK.get(layer_of(t), -1) > RANK[layer_of(m)]]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = all_modules()
    circles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            circles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            if target != node and target in graph:
                visit(target, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [], done)
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))


def test_the_checker_sees_a_violation(tmp_path):
    """Check of the checker: an upward import and a circle are found."""
    global PACKAGE
    saved = PACKAGE
    fake = tmp_path / "pytest_backprop"
    (fake / "problems").mkdir(parents=True)
    (fake / "judge").mkdir()
    (fake / "problems" / "a.py").write_text("def f():\n    from ..judge import b\n")
    (fake / "judge" / "b.py").write_text("from ..problems import a\n")
    PACKAGE = fake
    try:
        graph = all_modules()
        assert "judge.b" in graph["problems.a"] and "problems.a" in graph["judge.b"]
        upward = [t for m, ts in graph.items() for t in ts if RANK[layer_of(t)] > RANK[layer_of(m)]]
        assert upward == ["judge.b"]
    finally:
        PACKAGE = saved


def kit_imports(source: str) -> list[str]:
    """The ``pytest_backprop`` imports that run when ``source`` is imported (not those inside functions)."""
    found = []
    pending = list(ast.parse(source).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pytest_backprop":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "pytest_backprop"]
        pending.extend(ast.iter_child_nodes(node))
    return found


def test_reference_model_never_imports_the_kit():
    """reference_model is the lecture's code (and its problem file): the kit reads it, never the other
    way round at import time (its training CLI may still plot with the kit, inside a function)."""
    model = PACKAGE.parent / "reference_model"
    found = {p.name: kit_imports(p.read_text()) for p in sorted(model.glob("*.py"))}
    assert "model.py" in found and not any(found.values()), found
    assert kit_imports("if True:\n    from pytest_backprop.problems import lecture\n") == ["pytest_backprop.problems"]
    assert kit_imports("def f():\n    import pytest_backprop.report\n") == []
