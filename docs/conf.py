"""Sphinx configuration: MyST markdown pages, and directives that render tables and docstrings
straight from the code, so that the reference cannot drift from it.

Build (CI runs exactly this; warnings are errors)::

    python -m sphinx -W -b html docs docs/_build/html

Directives (used in reference.md):

- ``{backprop-options}``: every ``Option`` of :mod:`pytest_backprop.options` (flag, ini, default, help);
- ``{backprop-fixtures}``: every fixture of :mod:`pytest_backprop.fixtures` with its docstring;
- ``{backprop-api} module name name ...``: signature and docstring of each object (``*``: every
  name in the module's ``__all__``);
- ``{backprop-docstring} module``: a module's docstring (e.g. the tolerance rule);
- ``{backprop-lines}``: the forward pass's 26 gradients, the line of each and the lines reading it.
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


def _pipes(code: str) -> str:
    """Code for a code span in a table cell: only pipes need escaping there."""
    return code.replace("|", "\\|")


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
        names = self.arguments[1:]
        if names == ["*"]:  # everything the module exports, so that nothing new goes undocumented
            names = list(module.__all__)
        parts = []
        for name in names:
            obj = getattr(module, name)
            if not callable(obj):
                parts += [f"```text\n{self.arguments[0]}.{name} = {obj!r}\n```", ""]
                continue
            signature = name + _signature(obj)
            if inspect.isclass(obj):
                signature = signature.removesuffix(" -> None")
            kind = "class " if inspect.isclass(obj) else ""
            parts += [f"```text\n{kind}{self.arguments[0]}.{signature}\n```", "",
                      docstring_to_markdown(inspect.getdoc(obj)), ""]
        return "\n".join(parts)


def _signature(obj: object) -> str:
    """``(actual, expected, *, name=None)`` with annotations as written (no quotes)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = []
    for p in sig.parameters.values():
        ann = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        text = p.name if p.annotation is inspect.Parameter.empty else f"{p.name}: {ann}"
        if p.kind is p.VAR_POSITIONAL:
            text = "*" + text
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + text
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}"
        params.append((p.kind, text))
    out, star = [], False
    for kind, text in params:
        if kind is inspect.Parameter.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        star = star or kind is inspect.Parameter.VAR_POSITIONAL
        out.append(text)
    ret = sig.return_annotation
    ret = "" if ret is inspect.Signature.empty else f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return f"({', '.join(out)}){ret}"


class LinesDirective(_Markdown):
    """The expanded forward pass, as the kit derives it from ``reference_model.model.forward``: each gradient, the line that
    produced its tensor, and the lines that read it (whose contributions its gradient sums)."""

    def markdown(self) -> str:
        from pytest_backprop.problems.lecture import GRADIENT_ORDER, LINE_OF, consumers

        rows = ["| gradient | produced by | read by (contributions to sum) |", "|---|---|---|"]
        for name in GRADIENT_ORDER:
            made = f"`{_pipes(LINE_OF[name].source)}`" if name in LINE_OF else "(a parameter)"
            used = "; ".join(f"`{_pipes(line.source)}`" for line in consumers(name))
            rows.append(f"| `d{name}` | {made} | {used} |")
        return "\n".join(rows)


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
    app.add_directive("backprop-lines", LinesDirective)
    return {"parallel_read_safe": True}
