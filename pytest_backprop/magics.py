"""Check inside the notebook: the IPython extension ``%load_ext pytest_backprop`` and its magics.

- ``%%backprop [exN]`` (cell magic): runs the cell in your namespace as usual, then checks the
  gradients the cell assigned, with the kit's own seeded forward values (never your ``.grad``): the
  same notebook model and grading as ``pytest --backprop --backprop-impl=notebook.ipynb``, built from
  the cells this kernel has run so far (``In``), so constants and ``def`` statements of earlier
  cells count as the notebook loader counts them. The exercise is detected as the notebook loader
  detects it, or given: ``%%backprop ex3``.
- ``%backprop [options]`` (line magic): checks everything defined so far, as ``pytest --backprop``
  does: it writes the cells run so far to a temporary notebook and runs the plugin's own session on
  it in this process (the gradients, then the property checks and Exercise 4, which print progress),
  so its verdicts, codes and hints are the command line's.

Both return a :class:`BackpropReport`: a table in Jupyter (verdict colours, the hint and your own
line under each failing row), plain text elsewhere. Cells are numbered by execution count: ``cell 7``
is the cell shown as ``[7]``.

Example (in a notebook)::

    %load_ext pytest_backprop
    ...
    %%backprop
    dlogits = F.softmax(logits, 1)
    dlogits[range(n), Yb] -= 1
    dlogits /= n
    ...
    %backprop --examples 20 --steps 0
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import html
import io
import json
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import options
from .verdict import Diagnosis, Verdict

#: Options of ``pytest --backprop`` that the line magic takes as ``--<name>`` (the others name files or
#: grading set-ups that mean nothing in a notebook).
LINE_OPTIONS = ("names", "seed", "dtype", "timeout", "examples", "broadcast", "steps", "plots", "device", "isolate")
#: Options of the cell magic (it checks gradients only).
CELL_OPTIONS = ("names", "seed", "dtype", "timeout")
_EXERCISES = ("ex1", "ex2", "ex3")
_COLOURS = {"pass": "#d4edda", "fail": "#f8d7da", "error": "#f5c6cb", "skip": "#e2e3e5"}


class MagicUsageError(Exception):
    """A bad magic line (shown as IPython's usage error, never a traceback)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would sys.exit: in a kernel, that is a crash
        raise MagicUsageError(f"{self.prog}: {message}\n{self.format_usage()}")


#: Where a magic's meaning differs from the command line's.
_HELP = {"names": "names file in the lecture's format (default: names.txt in the working directory if present, "
                  "else the embedded census names)"}


def _add_kit_options(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    for name in names:
        opt = options.BY_NAME[name]
        help_text = _HELP.get(name, opt.help)
        if opt.kind == "bool":
            parser.add_argument(f"--{name}", action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(f"--{name}", metavar=opt.metavar or opt.name.upper(), default=None, help=help_text,
                                choices=opt.choices or None)


def line_parser() -> argparse.ArgumentParser:
    """The options of ``%backprop``: the command line's ``--backprop-<name>`` as ``--<name>``, and switches.

    Example::

        line_parser().parse_args(["--examples", "20", "--steps", "0"]).steps   # '0'
    """
    p = _Parser(prog="%backprop", description="Check every exercise the notebook has answered so far, as "
                "pytest --backprop does.", add_help=False)
    _add_kit_options(p, LINE_OPTIONS)
    p.add_argument("--no-properties", action="store_true", help="no property checks (same as --examples 0)")
    p.add_argument("--no-ex4", action="store_true", help="no Exercise 4 check (same as --steps 0)")
    p.add_argument("--quick", action="store_true", help="gradients only: --no-properties --no-ex4")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", metavar="PATH", help="also write the JSON report (--backprop-json's) to PATH")
    p.add_argument("-h", "--help", action="store_true", help="show this help")
    return p


def cell_parser() -> argparse.ArgumentParser:
    """The options of ``%%backprop``: an exercise (``ex1``, ``ex2``, ``ex3``) and the problem's settings.

    Example::

        cell_parser().parse_args(["ex3"]).exercise   # 'ex3'
    """
    p = _Parser(prog="%%backprop", description="Run the cell, then check the gradients it assigned.",
                add_help=False)
    p.add_argument("exercise", nargs="?", choices=_EXERCISES, help="the cell's exercise (default: detected)")
    _add_kit_options(p, CELL_OPTIONS)
    p.add_argument("-h", "--help", action="store_true", help="show this help")
    return p


# --- the report ------------------------------------------------------------------------------------

@dataclass
class BackpropReport:
    """What a magic found: the verdicts (those of ``pytest --backprop``), run warnings and notes.

    Shown as a table in Jupyter (``_repr_html_``) and as text elsewhere (``repr``). ``ok`` says whether
    nothing failed; ``to_json()`` is the ``checks`` list of ``--backprop-json``.

    Example::

        report = BackpropReport("Exercise 2 (cell 5)", [verdict])
        report.ok, report.failing   # (False, [verdict])
    """

    title: str
    verdicts: list[Verdict]
    warnings: list[Diagnosis] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def failing(self) -> list[Verdict]:
        """The rows that fail or raised."""
        return [v for v in self.verdicts if v.status in ("fail", "error")]

    @property
    def ok(self) -> bool:
        """True when no row fails (skipped rows, such as exercises not answered yet, do not count)."""
        return not self.failing

    def to_json(self) -> list[dict[str, Any]]:
        """The verdicts as the JSON report's ``checks`` entries."""
        return [v.to_json() for v in self.verdicts]

    def __repr__(self) -> str:
        from .report.text import label, render_table, render_verdict, skipped_exercises

        lines = [f"backprop: {self.title}", *render_table(self.verdicts)]
        own = [v for v in self.failing if v.diagnosis.code != "inherited"]
        for v in own:
            lines += ["", render_verdict(v)]
        inherited = len(self.failing) - len(own)
        if inherited:
            lines += ["", f"{inherited} more fail only because an earlier gradient is wrong [inherited]: fix "
                      + (f"{label(own[0])} first" if own else "the first wrong gradient first")]
        skipped = skipped_exercises(self.verdicts)
        if skipped:
            lines += ["", *skipped]
        lines += [f"warning [{w.code}]: {w.message}" for w in self.warnings]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        from .report.text import SYMBOL, fmt_bool, label, skipped_exercises, your_line

        e = html.escape
        counts = {s: sum(v.status == s for v in self.verdicts) for s in SYMBOL}
        head = (f"<b>backprop: {e(self.title)}</b> &mdash; {counts['pass']} ok, {counts['fail']} fail, "
                f"{counts['error']} error, {counts['skip']} skipped")
        rows = []
        for v in self.verdicts:
            code = "" if v.diagnosis.code in ("ok", "missing") else f" [{v.diagnosis.code}]"
            maxdiff = "-" if v.maxdiff is None else f"{v.maxdiff:.1e}"
            cells = [v.exercise, label(v), fmt_bool(v.exact), fmt_bool(v.approximate), maxdiff,
                     f"<b>{SYMBOL[v.status]}</b>{e(code)}"]
            rows.append(f'<tr style="background:{_COLOURS[v.status]}">'
                        + "".join(f"<td>{c if i == 5 else e(str(c))}</td>" for i, c in enumerate(cells)) + "</tr>")
            if v.status in ("fail", "error"):
                hint = [f"{e(v.diagnosis.message)}"]
                mine = your_line(v)
                if mine and v.diagnosis.code != "inherited":
                    hint.append(f"your line: <code>{e(mine)}</code>")
                if v.line and v.diagnosis.code != "inherited":
                    hint.append(f"backprop through: <code>{e(v.line)}</code>")
                style = "text-align:left" + (";color:#6c757d;font-size:smaller" if v.diagnosis.code == "inherited" else "")
                rows.append(f'<tr><td></td><td colspan="5" style="{style}">{"<br>".join(hint)}</td></tr>')
        table = ('<table><thead><tr><th>exercise</th><th>gradient</th><th>exact</th><th>approximate</th>'
                 f'<th>maxdiff</th><th>verdict</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
        extra = [e(s) for s in skipped_exercises(self.verdicts)]
        extra += [f"warning [{e(w.code)}]: {e(w.message)}" for w in self.warnings]
        extra += [e(n) for n in self.notes]
        return f"<div>{head}{table}" + "".join(f"<p>{x}</p>" for x in extra) + "</div>"


# --- the notebook so far ---------------------------------------------------------------------------

def history_sources(shell: Any) -> list[str]:
    """The sources of the cells this kernel has run, in order: cell N is ``In [N]`` (magics included, as typed).

    Example::

        history_sources(get_ipython())   # ['import torch', ..., '%%backprop\\ndlogits = ...']
    """
    raw = list(shell.history_manager.input_hist_raw)
    return [str(s) for s in raw[1:]]


def _words_path(names: str | None) -> str | None:
    """--names, else names.txt of the working directory when present (the embedded names otherwise)."""
    if names is None:
        return str(Path("names.txt").resolve()) if Path("names.txt").is_file() else None
    if not Path(names).is_file():
        raise MagicUsageError(f"--names: no such file: {names}")
    return str(Path(names).resolve())


_PROBLEMS: dict[tuple[Any, ...], Any] = {}


def kit_problem(names: str | None, seed: int, dtype: str) -> Any:
    """The lecture's problem at these settings (built once per kernel), as ``pytest --backprop`` builds it."""
    key = (names, seed, dtype)
    if key not in _PROBLEMS:
        import torch

        from reference_model.model import Config

        from .problems.device import single_thread
        from .problems.instance import build_problem, resolve_words

        with single_thread():
            _PROBLEMS[key] = build_problem(resolve_words(names), Config(seed=seed), dtype=getattr(torch, dtype))
    return _PROBLEMS[key]


def _setting(args: argparse.Namespace, name: str) -> Any:
    raw = getattr(args, name.replace("-", "_"), None)
    opt = options.BY_NAME[name]
    if raw is None:
        return opt.default
    try:
        return {"int": int, "float": float}.get(opt.kind, lambda x: x)(raw)
    except ValueError:
        raise MagicUsageError(f"--{name}: expected a number, got {raw!r}") from None


# --- %%backprop ------------------------------------------------------------------------------------

def check_cell(sources: list[str], exercise: str | None = None, *, names: str | None = None,
               seed: int = options.BY_NAME["seed"].default, dtype: str = "float32",
               timeout: float = options.BY_NAME["timeout"].default, raised: str | None = None) -> BackpropReport:
    """Check the last of ``sources`` (the cells run so far) as ``%%backprop`` does.

    The notebook model is the notebook loader's (:meth:`NotebookImplementation.from_cells`); each of the
    cell's exercises is graded as ``pytest --backprop`` grades it (:func:`~pytest_backprop.checks.independent.grade_exercise`),
    and the rows shown are the gradients the cell assigns (all of the exercise's when it assigns none).

    Example::

        check_cell(["dlogits = F.softmax(logits, 1)\\ndlogits[range(n), Yb] -= 1\\ndlogits /= n"]).ok   # True
    """
    from .checks.independent import grade_exercise
    from .problems.device import single_thread
    from .usercode.notebook import TAG_PREFIX, NotebookImplementation

    index = len(sources)
    tags = [frozenset()] * (index - 1) + [frozenset({TAG_PREFIX + exercise} if exercise else ())]
    impl = NotebookImplementation.from_cells(sources, "this notebook", tags=tags)
    exercises = [ex for ex in _EXERCISES if any(c.index == index for c in impl.detection.cells[ex])]
    notes = [f"your cell raised when it ran: {raised}"] if raised else []
    if not exercises:
        notes.append(f"cell {index} assigns no gradient of the forward pass (d<name>, or a variable passed to cmp): "
                     "nothing to check; give the exercise to check it anyway: %%backprop ex1 (ex2, ex3)")
        return BackpropReport(f"cell {index}", [], notes=notes)
    problem = kit_problem(names, seed, dtype)
    written = impl.gradients_of(index)
    cell = next(c for c in impl.cells if c.index == index)
    shown = written | set(cell.cmp_tensors)
    verdicts: list[Verdict] = []
    warnings: list[Diagnosis] = []
    for ex in exercises:
        with single_thread():
            graded = grade_exercise(impl, ex, problem, timeout)
        rows = [v for v in graded.verdicts if v.tensor in shown] or graded.verdicts
        verdicts += rows
        warnings += graded.warnings
    title = f"{' and '.join(_TITLES[ex] for ex in exercises)} (cell {index})"
    return BackpropReport(title, verdicts, warnings, notes, {"cell": index, "exercises": exercises})


_TITLES = {"ex1": "Exercise 1", "ex2": "Exercise 2", "ex3": "Exercise 3"}


# --- %backprop -------------------------------------------------------------------------------------

class _Progress:
    """A pytest plugin that prints a line when the slow checks start and end (properties, Exercise 4)."""

    def __init__(self, stream: Any, enabled: bool):
        self.stream, self.enabled, self.started = stream, enabled, set()

    def say(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            with contextlib.suppress(Exception):
                self.stream.flush()

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        part = nodeid.split("::")[1] if nodeid.count("::") >= 1 else nodeid
        if part in ("ex1", "ex2", "ex3") and "gradients" not in self.started:
            self.started.add("gradients")
            self.say("backprop: checking the gradients ...")
        elif part == "properties":
            if "properties" not in self.started:
                self.started.add("properties")
                self.say("backprop: property checks (hypothesis; --no-properties turns them off) ...")
            self.say(f"  {nodeid} ...")
        elif part == "ex4":
            self.say("backprop: Exercise 4: SGD steps with your gradients beside autograd's (--no-ex4 turns it off) ...")

    def pytest_runtest_logreport(self, report: Any) -> None:
        part = report.nodeid.split("::")[1] if report.nodeid.count("::") >= 1 else ""
        if report.when == "call" and part in ("properties", "ex4"):
            self.say(f"  {report.nodeid}: {report.outcome} ({report.duration:.1f} s)")


def check_notebook(sources: list[str], argv: list[str] | None = None, *, progress: Any = None) -> BackpropReport:
    """Check every exercise of the cells run so far as ``%backprop`` does: the cells are written to a
    temporary notebook, and ``pytest --backprop`` runs on it in this process (its JSON report is read back).

    ``argv`` are the magic's options (``["--examples", "20", "--steps", "0"]``); ``progress`` is where
    progress lines go (default ``sys.stdout``).

    Example::

        report = check_notebook(history_sources(get_ipython()), ["--quick"])
        [v.key for v in report.failing]   # ['ex1::probs']
    """
    import nbformat
    import pytest
    from nbformat.v4 import new_code_cell, new_notebook

    args = line_parser().parse_args(argv or [])
    names = _words_path(args.names)
    steps = 0 if (args.no_ex4 or args.quick) else _setting(args, "steps")
    examples = 0 if (args.no_properties or args.quick) else _setting(args, "examples")
    with tempfile.TemporaryDirectory(prefix="backprop-magic-") as tmp:
        folder = Path(tmp)
        nb = new_notebook()
        nb.cells = [new_code_cell(s) for s in sources]
        notebook = folder / "notebook.ipynb"
        nbformat.write(nb, str(notebook))
        (folder / "pytest.ini").write_text("[pytest]\n")
        report_path = folder / "report.json"
        cmd = [str(folder), "-c", str(folder / "pytest.ini"), "--rootdir", str(folder), "-p", "no:cacheprovider",
               "-p", "no:terminal", "--capture=sys", "--backprop", f"--backprop-impl={notebook}",
               f"--backprop-json={report_path}", f"--backprop-steps={steps}", f"--backprop-examples={examples}"]
        for name in ("seed", "dtype", "timeout", "device", "plots"):
            value = getattr(args, name)
            if value is not None:
                cmd.append(f"--backprop-{name}={value}")
        if names:
            cmd.append(f"--backprop-names={names}")
        for name in ("broadcast", "isolate"):
            if getattr(args, name):
                cmd.append(f"--backprop-{name}")
        stream = progress or sys.stdout
        errors = io.StringIO()
        frozen = gc.get_freeze_count()
        with contextlib.redirect_stderr(errors):
            code = pytest.main(cmd, plugins=[_Progress(stream, not args.quiet)])
        if not frozen:  # the plugin froze what was alive (pytest's session too): the kernel lives on
            gc.unfreeze()
        if not report_path.is_file():
            raise MagicUsageError(f"pytest --backprop did not run (exit code {int(code)}): "
                                  + (errors.getvalue().strip() or "no report"))
        # the temporary file is "this notebook", as in %%backprop's messages
        data = json.loads(report_path.read_text().replace(str(notebook), "this notebook"))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    verdicts = [Verdict.from_json(c) for c in data["checks"]]
    warnings = [Diagnosis(**w) for w in data["warnings"]]
    dataset = data.get("dataset", {})
    title = (f"the {len(sources)} cells run so far (dataset {dataset.get('source', '?')}, seed {data.get('seed')}, "
             f"{data.get('dtype')})")
    return BackpropReport(title, verdicts, warnings, meta=data)


# --- the IPython extension -------------------------------------------------------------------------

def _magics_class() -> type:
    from IPython.core.error import UsageError
    from IPython.core.magic import Magics, line_cell_magic, magics_class

    @magics_class
    class BackpropMagics(Magics):
        """``%backprop`` (check everything so far) and ``%%backprop`` (run the cell, check its gradients)."""

        @line_cell_magic
        def backprop(self, line: str, cell: str | None = None) -> BackpropReport | None:
            """%backprop [--examples N] [--steps N] [--no-properties] [--no-ex4] [--quick] [--quiet] [...]:
            check every exercise answered so far, as pytest --backprop does.

            %%backprop [ex1|ex2|ex3] [--seed N] [--dtype D] [--timeout S] [--names PATH]: run the cell,
            then check the gradients it assigned with the kit's own forward values.
            Options: %backprop --help, %%backprop --help.
            """
            try:
                argv = shlex.split(line.strip().rstrip(";"))  # `%backprop;` hides the report, as for any line
            except ValueError as exc:
                raise UsageError(f"%backprop: {exc}") from None
            try:
                if cell is None:
                    if "-h" in argv or "--help" in argv:
                        print(line_parser().format_help())
                        return None
                    return check_notebook(history_sources(self.shell), argv)
                args = cell_parser().parse_args(argv)
                if args.help:
                    print(cell_parser().format_help())
                    return None
                outer = getattr(self.shell.displayhook, "exec_result", None)
                try:
                    result = self.shell.run_cell(cell, store_history=False)
                finally:  # the nested run resets it: without this, this cell's result (the report) is lost
                    self.shell.displayhook.exec_result = outer
                raised = None if result.error_in_exec is None else (
                    f"{type(result.error_in_exec).__name__}: {result.error_in_exec}")
                return check_cell(history_sources(self.shell), args.exercise, names=_words_path(args.names),
                                  seed=_setting(args, "seed"), dtype=_setting(args, "dtype") or "float32",
                                  timeout=_setting(args, "timeout"), raised=raised)
            except MagicUsageError as exc:
                raise UsageError(str(exc)) from None

    return BackpropMagics


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext pytest_backprop``: register ``%backprop`` and ``%%backprop``.

    Example::

        get_ipython().run_line_magic("load_ext", "pytest_backprop")
    """
    ipython.register_magics(_magics_class())
