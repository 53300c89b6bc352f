"""Sphinx configuration: MyST markdown pages, and directives that render tables and docstrings
straight from the code, so that the reference cannot drift from it.

Build (CI runs exactly this; warnings are errors)::

    python -m sphinx -W -b html docs docs/_build/html

Directives (used in reference.md):

- ``{backprop-options}``: every ``Option`` of :mod:`pytest_backprop.options` (flag, ini, default, help);
- ``{backprop-fixtures}``: every fixture of :mod:`pytest_backprop.fixtures` with its docstring;
- ``{backprop-api} module name name ...``: signature and docstring of each object;
- ``{backprop-docstring} module``: a module's docstring (e.g. the tolerance rule).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

project = "pytest-backprop"
author = "the pytest-backprop authors"
copyright = "2026, the pytest-backprop authors"  # noqa: A001 -- Sphinx's name
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "alabaster"
html_title = "pytest-backprop"


# --- docstrings (reStructuredText-ish) to MyST markdown ----------------------------------------

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


def _inline(text: str) -> str:
    text = _ROLE.sub(lambda m: f"`{m.group(1).split('.')[-1] if m.group(0).count('~') else m.group(1)}`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _fence_language(code: str) -> str:
    try:
        ast.parse(code)
    except SyntaxError:
        return "text"
    return "python"


def docstring_to_markdown(doc: str | None) -> str:
    """A docstring as MyST markdown: ``Example::`` blocks become fenced code, roles become code."""
    lines = inspect.cleandoc(doc or "").splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            head = line.rstrip()[:-2].rstrip()
            if head:
                out.append(_inline(head) + ":")
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            code = inspect.cleandoc("\n".join(block))
            out += ["", f"```{_fence_language(code)}", code, "```", ""]
            continue
        out.append(_inline(line))
        i += 1
    return "\n".join(out)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


class _Markdown(Directive):
    """Base: render generated markdown in place."""

    has_content = False
    optional_arguments = 20

    def markdown(self) -> str:  # pragma: no cover
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        text = self.markdown()
        self.state.nested_parse(StringList(text.splitlines(), source="(generated from the code)"),
                                self.content_offset, container)
        return container.children


class OptionsDirective(_Markdown):
    """The options table, from ``pytest_backprop.options.OPTIONS``."""

    def markdown(self) -> str:
        from pytest_backprop.options import OPTIONS

        rows = ["| command line | ini setting | default | what it does |", "|---|---|---|---|"]
        for opt in OPTIONS:
            flag = f"`{opt.flag}`" + (f" `{opt.metavar}`" if opt.metavar else "")
            if opt.kind == "choice":
                flag += " (" + ", ".join(f"`{c}`" for c in opt.choices) + ")"
            default = "off" if opt.kind == "bool" and not opt.default else ("" if opt.default is None else f"`{opt.default}`")
            rows.append(f"| {flag} | `{opt.ini}` | {default} | {_cell(opt.help)} |")
        return "\n".join(rows)


class FixturesDirective(_Markdown):
    """Every fixture of ``pytest_backprop.fixtures``, with its docstring."""

    def markdown(self) -> str:
        from pytest_backprop import fixtures

        parts = []
        for name, scope, doc in fixture_table(fixtures):
            parts += [f"`{name}` (scope: {scope})", f": {docstring_to_markdown(doc).splitlines()[0]}", ""]
            rest = "\n".join(docstring_to_markdown(doc).splitlines()[1:]).strip()
            if rest:
                parts += ["  " + line if line else "" for line in rest.splitlines()] + [""]
        return "\n".join(parts)


def fixture_table(module) -> list[tuple[str, str, str]]:
    """(name, scope, docstring) of every pytest fixture defined in ``module``."""
    out = []
    for name, obj in vars(module).items():
        definition = getattr(obj, "_fixture_function_marker", None) or getattr(obj, "_pytestfixturefunction", None)
        if definition is None:
            continue
        func = getattr(obj, "_get_wrapped_function", None)
        func = func() if callable(func) else getattr(obj, "__wrapped__", obj)
        out.append((name, getattr(definition, "scope", "function") or "function", inspect.getdoc(func) or inspect.getdoc(obj) or ""))
    return out


class ApiDirective(_Markdown):
    """``{backprop-api} module name ...``: each object's signature and docstring."""

    required_arguments = 1

    def markdown(self) -> str:
        module = importlib.import_module(self.arguments[0])
        parts = []
        for name in self.arguments[1:]:
            obj = getattr(module, name)
            try:
                signature = f"{name}{inspect.signature(obj)}"
            except (TypeError, ValueError):
                signature = name
            kind = "class " if inspect.isclass(obj) else ""
            parts += [f"```text\n{kind}{self.arguments[0]}.{signature}\n```", "",
                      docstring_to_markdown(inspect.getdoc(obj)), ""]
        return "\n".join(parts)


class DocstringDirective(_Markdown):
    """``{backprop-docstring} module``: the module's docstring."""

    required_arguments = 1

    def markdown(self) -> str:
        return docstring_to_markdown(importlib.import_module(self.arguments[0]).__doc__)


def setup(app):  # noqa: ANN001 -- Sphinx's hook
    app.add_directive("backprop-options", OptionsDirective)
    app.add_directive("backprop-fixtures", FixturesDirective)
    app.add_directive("backprop-api", ApiDirective)
    app.add_directive("backprop-docstring", DocstringDirective)
    return {"parallel_read_safe": True}
