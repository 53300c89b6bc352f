"""``--backprop-isolate``: run the user's code in a spawned child process, tensors sent back.

Threat model. By default user code runs in the pytest process (fast, and tracebacks point into the
user's file). That is **not a sandbox**: code in the same process can kill it (a signal,
``from os import _exit``), crash the interpreter (a segfault), exhaust memory, or monkeypatch what
the kit uses to judge (``torch.allclose``, ``torch.testing.assert_close``, ``torch.equal``). The
in-process runner defends only against accidents: ``SystemExit`` is caught, ``os._exit`` raises
``SystemExit`` while user code runs (:func:`pytest_backprop.usercode.guard_exit`), a time limit stops
endless loops (POSIX, main thread), every run gets fresh copies of the values, and patched attributes of ``torch``,
``torch.testing``, ``torch.nn.functional`` and ``torch.Tensor`` are restored after each run
(:func:`pytest_backprop.usercode.guard_torch`).

With ``--backprop-isolate`` each run (one exercise, or the per-line answers) happens in a fresh
child Python process (spawned: a new interpreter, nothing inherited but ``sys.path``): the child loads the implementation, rebuilds the
problem from the parameters and batch it is sent, runs the user's code and sends back only the
answers (tensors, detached). Comparison and verdicts happen in the parent, so nothing the user's
code does to its own process (exit, crash, monkeypatching, an endless loop in C code that ignores
signals: the parent kills the child after the time limit) can end pytest or change a verdict. It
is still not a security boundary against hostile code: the child runs with the user's
permissions, can read and write files and use the network. Grade untrusted submissions inside a
container or VM (Gradescope's autograder is one).

Each run costs a process start (~1-3 s: importing torch). Example::

    pytest --backprop --backprop-impl=student.ipynb --backprop-isolate
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reference_model.model import LINES

from ..problems.instance import Problem
from .base import Implementation, LoadError, RunResult, SourceSpan
from .run import UserError

#: Seconds the child may take on top of ``--backprop-timeout`` (process start, imports, truth).
STARTUP_GRACE = 60.0


@dataclass(frozen=True)
class Opaque:
    """Stands for an answer that could not be sent back from the child (not picklable)."""

    description: str

    def __repr__(self) -> str:
        return f"<{self.description}, not picklable>"


def _portable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    try:
        pickle.dumps(value)
        return value
    except Exception:  # noqa: BLE001 -- anything the user returns
        return Opaque(f"a {type(value).__module__}.{type(value).__qualname__}")


def _child(spec: str, rootdir: str, task: str, exercise: str | None, payload: Any, timeout: float | None) -> tuple[str, Any]:
    """The child's work: load, run, and return ``(status, data)`` for the parent."""
    from ..problems.instance import problem_from_batch
    from .loaders import load_implementation

    try:
        impl = load_implementation(spec, Path(rootdir))
    except LoadError as exc:
        return "load_error", str(exc)
    if task == "describe":
        return "ok", (impl.exercises(), impl.description)
    config, params, Xb, Yb, dtype = payload
    problem = problem_from_batch(config, params, Xb, Yb, dtype=dtype)
    if task == "lines":
        answers = impl.line_answers(problem, timeout)
        return "ok", {k: ({n: _portable(v) for n, v in a.items()} if a is not None else None, e)
                      for k, (a, e) in answers.items()}
    result = impl.run(exercise, problem, timeout)
    result.grads = {k: _portable(v) for k, v in result.grads.items()}
    return "ok", result


def child_main() -> None:
    """Entry point of ``python -c``: read the pickled task on stdin, write the pickled answer on the
    original stdout (the user's prints go to stderr).

    Example::

        python -c "from pytest_backprop.usercode.isolate import child_main; child_main()" < task.pickle
    """
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    args = pickle.load(sys.stdin.buffer)
    sys.path[:] = args.pop("sys_path")
    try:
        answer = _child(**args)
    except BaseException:  # noqa: BLE001 -- report anything to the parent
        answer = ("crash", traceback.format_exc())
    try:
        data = pickle.dumps(answer)
    except Exception:  # noqa: BLE001
        data = pickle.dumps(("crash", traceback.format_exc()))
    out.write(data)
    out.flush()
    os._exit(0)  # skip interpreter teardown: user code may have left threads or handlers behind


def run_in_child(spec: str, rootdir: Path, task: str, exercise: str | None = None, payload: Any = None,
                 timeout: float | None = None) -> tuple[str, Any]:
    """Run one task in a fresh Python process; ``("ok", data)``, ``("load_error", msg)``, ``("crash", tb)``
    or ``("died", msg)``.

    The child is a new interpreter (like multiprocessing's ``spawn``) started with
    ``python -c`` rather than multiprocessing, so that the parent's ``__main__`` is never re-imported.

    Example::

        status, run = run_in_child("student.py", Path.cwd(), "run", "ex1", payload, timeout=60)
    """
    args = dict(spec=spec, rootdir=str(rootdir), task=task, exercise=exercise, payload=payload, timeout=timeout,
                sys_path=list(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", "from pytest_backprop.usercode.isolate import child_main; child_main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(rootdir))
    limit = (timeout + STARTUP_GRACE) if timeout else None
    start = time.monotonic()
    try:
        out, err = proc.communicate(pickle.dumps(args), timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return "died", (f"still running after {time.monotonic() - start:.0f} s (--backprop-timeout {timeout:g} s "
                        "plus start-up); the child process was killed")
    try:
        return pickle.loads(out)
    except Exception:  # noqa: BLE001 -- no (complete) answer: the process ended early
        code = proc.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return "died", (f"the process running your code {how} before returning any gradient "
                        "(os._exit, a crash, or running out of memory)" + (": " + " / ".join(tail) if tail else ""))


def static_description(spec: str, rootdir: Path) -> tuple[tuple[str, ...], str] | None:
    """Exercises and description of a file implementation, found without running any of its code
    (None for a dotted module name). Raises LoadError for a missing file or a syntax error.

    Example::

        static_description("ninja.ipynb", Path.cwd())   # (('ex1', 'ex2', 'ex3'), 'notebook ninja.ipynb')
    """
    import ast

    from .base import EXERCISE_FUNCTIONS
    from .loaders import find_file
    from .modules import ScriptImplementation

    path = find_file(spec, rootdir)
    if path is None:
        return None
    if path.suffix == ".ipynb":
        from .notebook import NotebookImplementation

        impl = NotebookImplementation(path)
        return impl.exercises(), impl.description
    script = ScriptImplementation(path)  # compiles only; raises LoadError on a syntax error
    if any(line.startswith(("# %%", "#%%")) for line in script.source.splitlines()):
        from .notebook import NotebookImplementation

        impl = NotebookImplementation.from_script(path)
        return impl.exercises(), impl.description
    body = ast.parse(script.source).body
    if any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in body):
        return None  # `from x import *` may bring functions in: ask a child
    names = {n.name for n in body if isinstance(n, ast.FunctionDef)}
    lines = any(n.startswith("backward_") for n in names) and "backward" not in names
    if not lines and not ({"backward", *EXERCISE_FUNCTIONS.values()} & names):
        return ("ex1",), script.description
    found = ("ex1",) if "backward" in names or lines else ()
    found += tuple(ex for ex, fn in EXERCISE_FUNCTIONS.items() if fn in names)
    return (found or ("ex1",)) + (("lines",) if lines else ()), f"module {path}"


class IsolatedImplementation(Implementation):
    """Any implementation form, run in a spawned child process for every run (see the module docstring).

    Example::

        impl = IsolatedImplementation("student.py", Path.cwd())
        impl.run("ex1", problem, timeout=60).grads["probs"]
    """

    def __init__(self, spec: str, rootdir: Path, timeout: float | None = None):
        local = Path(spec)
        self.spec = str(local.resolve()) if local.is_file() else spec  # the child's cwd is the rootdir
        self.rootdir = rootdir
        data = static_description(self.spec, rootdir)
        if data is None:  # a module given by name: only importing it tells (in a child, of course)
            status, data = run_in_child(self.spec, rootdir, "describe", timeout=timeout)
            if status != "ok":
                raise LoadError(data if status != "crash" else f"cannot load {spec} in a child process:\n{data}")
        self._exercises, inner = data
        self.description = f"{inner} (isolated)"

    def exercises(self) -> tuple[str, ...]:
        return tuple(self._exercises)

    def source_spans(self, exercise: str | None = None) -> list[SourceSpan]:
        """Read statically in this process (nothing of the user's code runs here)."""
        from .loaders import static_source_spans

        return static_source_spans(self.spec, self.rootdir)

    @staticmethod
    def _payload(problem: Problem) -> tuple:
        return (problem.config, problem.params, problem.Xb, problem.Yb, problem.dtype)

    def _failure(self, status: str, data: Any, timeout: float | None) -> UserError:
        if status == "died":
            return UserError("Timeout" if "still running" in data else "ProcessDied", data,
                             timeout="still running" in data)
        return UserError("InternalError", f"the child process failed outside your code:\n{data}")

    def run(self, exercise: str, problem: Problem, timeout: float | None) -> RunResult:
        status, data = run_in_child(self.spec, self.rootdir, "run", exercise, self._payload(problem), timeout)
        if status == "ok":
            return data
        return RunResult({}, self._failure(status, data, timeout))

    def line_answers(self, problem: Problem, timeout: float | None) -> dict[str, tuple[Any, UserError | None]]:
        """Every line's answer to its random upstream, computed in a child (see ``LinesImplementation``)."""
        status, data = run_in_child(self.spec, self.rootdir, "lines", "lines", self._payload(problem), timeout)
        if status != "ok":
            error = self._failure(status, data, timeout)
            return {line.output: (None, error) for line in LINES}
        return data
