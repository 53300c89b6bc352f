"""Implementations: turn a user's script or module into gradients, one fresh run at a time.

Forms (``--backprop-impl``):

- a **script** (``.py`` of straight-line code using the lecture's names): run in a fresh namespace
  holding copies of the forward tensors; the kit reads back ``d<name>`` variables and the student's
  own ``cmp(name, dt, t)`` calls;
- a **module** (a dotted name, or a ``.py`` file that defines ``backward``): ``backward(cache)``
  returns ``{name: gradient}``; optional ``cross_entropy_backward(...)`` (Exercise 2) and
  ``batchnorm_backward(...)`` (Exercise 3) get their arguments injected by parameter name;
- a **per-line module** (defines ``backward_<output>`` functions and no ``backward``): each line is
  checked on its own (exercise ``lines``) and the chained full backward is Exercise 1 (see
  :mod:`pytest_backprop.usercode.perline`);
- a **notebook** (``.ipynb``), or a script split into cells by ``# %%`` markers: each exercise runs
  only its own cells, see :mod:`pytest_backprop.usercode.notebook`.

Every run gets a fresh namespace and fresh copies of the forward values (detached, without
``.grad``), so one run cannot affect another or the kit's truth. Answers copied from autograd
(``dhpreact = hpreact.grad``) are traced in the user's source and get the ``reads_autograd``
verdict. This is not a sandbox: see :mod:`pytest_backprop.usercode.isolate` (``--backprop-isolate``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from ..problems.lecture import LECTURE
from ..problems.spec import ProblemSpec
from .base import EXERCISE_FUNCTIONS, Implementation, LoadError, SourceSpan, display_path
from .modules import ModuleImplementation, ScriptImplementation


def defines_functions(path: Path) -> bool:
    """Whether a .py file is a module of backward functions rather than a straight-line script.

    Example::

        defines_functions(Path("lines.py"))   # True when it defines backward_h(...)
    """
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError:
        return False
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return "backward" in names or any(n in names for n in EXERCISE_FUNCTIONS.values()) or any(
        n.startswith("backward_") for n in names)


def find_file(spec: str, rootdir: Path) -> Path | None:
    """The file ``--backprop-impl`` names (tried in the current directory, then the rootdir); None
    for a dotted module name. A path-like spec that exists nowhere is a :class:`LoadError`."""
    folders = list(dict.fromkeys([Path.cwd().resolve(), Path(rootdir).resolve()]))
    path = next((p for p in (Path(spec), *(f / spec for f in folders)) if p.is_file()), None)
    if path is None and (spec.endswith((".py", ".ipynb")) or "/" in spec):
        raise LoadError(f"--backprop-impl: no such file: {spec} (looked in {' and '.join(map(str, folders))})")
    return path


def load_implementation(spec: str, rootdir: Path, problem_spec: "ProblemSpec | None" = None) -> Implementation:
    """Resolve ``--backprop-impl``: a file path (script, module or notebook) or a dotted module name.

    Relative paths are tried against the current directory, then the rootdir. ``problem_spec`` is
    the problem it answers (``--backprop-problem``; default the lecture's): its gradient names are
    the ``d<name>`` variables and ``backward_<output>`` functions looked for.

    Example::

        impl = load_implementation("ninja.ipynb", Path.cwd())
        impl.exercises()   # ('ex1', 'ex2', 'ex3')
    """
    path = find_file(spec, rootdir)
    if path is None:
        if str(rootdir) not in sys.path:
            sys.path.insert(0, str(rootdir))
        return module_implementation(spec, problem_spec=problem_spec)
    path = path.resolve()
    if path.suffix == ".ipynb":
        from .notebook import NotebookImplementation  # noqa: PLC0415 -- optional form, loaded when used

        return NotebookImplementation(path, problem_spec)
    if defines_functions(path):
        return module_implementation(spec, path, problem_spec=problem_spec)
    script = ScriptImplementation(path, problem_spec or LECTURE)
    if any(line.startswith(("# %%", "#%%")) for line in script.source.splitlines()):
        from .notebook import NotebookImplementation  # noqa: PLC0415

        return NotebookImplementation.from_script(path, problem_spec)  # cells: Exercises 2 and 3 found like a notebook's
    return script



def module_implementation(spec: str, path: Path | None = None, *,
                          problem_spec: "ProblemSpec | None" = None) -> "ModuleImplementation":
    """A module's implementation: per-line when it has ``backward_<output>`` functions and no ``backward``.

    Example::

        module_implementation("reference_model.backward_lines").exercises()   # ('ex1', 'lines')
    """
    problem_spec = problem_spec or LECTURE
    impl = ModuleImplementation(spec, path, problem_spec)
    from .perline import line_functions  # noqa: PLC0415 -- perline imports this module

    if not hasattr(impl.module, "backward") and line_functions(impl.module, problem_spec):
        from .perline import LinesImplementation  # noqa: PLC0415

        return LinesImplementation(impl, problem_spec)
    return impl


def static_source_spans(spec: str, rootdir: Path) -> list[SourceSpan]:
    """The source spans of an implementation, read without running any of its code (empty when it
    cannot be read).

    Example::

        [span.cell for span in static_source_spans("ninja.ipynb", Path.cwd())]   # [3, 5, 9, ...]
    """
    import importlib.util

    try:
        path = find_file(spec, rootdir)
        if path is None:
            found = importlib.util.find_spec(spec)
            path = Path(found.origin) if found is not None and found.origin else None
        if path is None:
            return []
        if path.suffix == ".ipynb":
            from .notebook import NotebookImplementation

            return NotebookImplementation(path).source_spans()
        text = path.read_text()
    except (LoadError, OSError, ImportError, ValueError):
        return []
    if any(line.startswith(("# %%", "#%%")) for line in text.splitlines()):
        from .notebook import NotebookImplementation

        return NotebookImplementation.from_script(path).source_spans()
    return [SourceSpan(text, display_path(path))]


def static_program(spec: str, rootdir: Path, exercise: str, problem_spec: "ProblemSpec | None" = None
                   ) -> "Program | None":
    """The program an implementation runs for ``exercise``, built from its source without running any
    of it (a module is not imported): what the grader's process knows of code it runs in a child.
    None for forms without statements (per-line modules) or when the source cannot be read.

    Example::

        static_program("ninja.ipynb", Path.cwd(), "ex1").read_not_written()   # e.g. ['counts_sum_inv']
    """
    import importlib.util

    from .modules import backward_program
    from .notebook import NotebookImplementation

    try:
        path = find_file(spec, rootdir)
        if path is None:
            found = importlib.util.find_spec(spec)
            path = Path(found.origin) if found is not None and found.origin else None
        if path is None:
            return None
        if path.suffix == ".ipynb":
            notebook = NotebookImplementation(path, problem_spec)
            return notebook.program(exercise) if exercise in notebook.exercises() else None
        text = path.read_text()
        if any(line.startswith(("# %%", "#%%")) for line in text.splitlines()):
            notebook = NotebookImplementation.from_script(path, problem_spec)
            return notebook.program(exercise) if exercise in notebook.exercises() else None
        if exercise != "ex1":
            return None
        if defines_functions(path):
            return backward_program(text, str(path), problem_spec=problem_spec or LECTURE)
        return ScriptImplementation(path, problem_spec or LECTURE).program
    except (LoadError, OSError, ImportError, ValueError, SyntaxError):
        return None
