"""The implementation interface every form of user code offers, and what one run of it produces.

An :class:`Implementation` answers exercises: ``run(exercise, problem, timeout)`` executes the
user's code on fresh copies of the problem's forward values and returns a :class:`RunResult`
(gradients by tensor name, an error, warnings). Judging those gradients is the judge layer's job.
"""

from __future__ import annotations

import inspect
import linecache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..problems.lecture import GRADIENT_ORDER

from ..problems.instance import Problem
from ..verdict import Diagnosis, Location
from .run import UserError, locate

EXERCISE_FUNCTIONS = {"ex2": "cross_entropy_backward", "ex3": "batchnorm_backward"}
#: What each exercise's answer is the gradient of, and which true upstream gradients it may use.
EXERCISE_TARGET = {"ex1": None, "ex2": "logits", "ex3": "hprebn"}
#: True gradients handed to Exercises 2 and 3 (only those upstream of the part to derive in one go).
EXERCISE_UPSTREAM = {"ex2": (), "ex3": GRADIENT_ORDER[:GRADIENT_ORDER.index("hpreact") + 1]}


class LoadError(Exception):
    """The implementation cannot be found or loaded at all (bad path, syntax or import error)."""


@dataclass(frozen=True)
class GradientError:
    """Why a gradient has no complete answer: its own statement raised, or did not run.

    ``kind``: ``raised`` (its statement raised ``error``), ``incomplete`` (an earlier statement assigned
    it, a later one -- ``statement`` -- did not run because ``error`` stopped the code before it),
    ``not_reached`` (none of its statements ran), ``timeout``.
    """

    kind: str
    error: UserError
    statement: Location | None = None


@dataclass
class RunResult:
    """What one run of user code produced: gradients by tensor name, errors, warnings, locations."""

    grads: dict[str, Any]
    error: UserError | None = None  # the first exception of the run (or the time limit)
    warnings: list[Diagnosis] = field(default_factory=list)
    #: Verdict overrides by tensor name (e.g. ``reads_autograd``): the answer fails with this hint.
    overrides: dict[str, Diagnosis] = field(default_factory=dict)
    #: Gradients whose own statement raised or did not run (see :class:`GradientError`).
    gradient_errors: dict[str, GradientError] = field(default_factory=dict)
    #: The user's statements that write each gradient, in order (the student's own lines).
    locations: dict[str, tuple[Location, ...]] = field(default_factory=dict)
    #: Statements (program indices) that raised: a re-run may continue past them.
    failed_statements: tuple[int, ...] = ()
    #: Gradients whose true value the run put in place of the user's (independent grading).
    substituted: frozenset[str] = frozenset()


class CmpRecorder:
    """The namespace's ``cmp(name, dt, t)``: records which forward tensor each answer is for.

    ``t`` is recognised by identity among the tensors the kit handed out, so renamed gradients
    (``cmp('logprobs', dL_dlogprobs, logprobs)``) are checked through the student's own calls.
    """

    def __init__(self, handed_out: Mapping[str, Any], tensors: tuple[str, ...] = GRADIENT_ORDER):
        self.tensors = tensors
        self._by_id = {id(v): k for k, v in handed_out.items() if isinstance(v, torch.Tensor)}
        self.recorded: dict[str, Any] = {}

    def __call__(self, s: str, dt: Any, t: Any = None) -> None:
        name = self._by_id.get(id(t)) or (s.strip() if isinstance(s, str) else None)
        if name in self.tensors:
            self.recorded[name] = dt


def inject(fn: Callable[..., Any], available: Mapping[str, Any]) -> Any:
    """Call ``fn`` with arguments taken by parameter name from ``available`` (like pytest fixtures).

    Example::

        inject(lambda logits, Yb: logits.shape, {"logits": logits, "Yb": Yb, "n": 32})   # (32, 27)
    """
    kwargs = {}
    for pname, param in inspect.signature(fn).parameters.items():
        if pname in available:
            kwargs[pname] = available[pname]
        elif param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{fn.__name__}() asks for `{pname}`, which the kit cannot supply; "
                            f"available: {', '.join(sorted(k for k in available if not k.startswith('_')))}")
    return fn(**kwargs)


@dataclass(frozen=True)
class SourceSpan:
    """A piece of the user's source and where its lines are: a file, or a notebook cell.

    Example::

        span = SourceSpan("dprobs = 1.0 / probs", file="ninja.ipynb", cell=4)
        span.location(1).describe()   # 'cell 4, line 1'
    """

    text: str
    file: str | None
    cell: int | None = None
    first_line: int = 1  # the file's line number of ``text``'s first line (a ``# %%`` cell of a script)

    def location(self, lineno: int) -> Location:
        """The :class:`~pytest_backprop.verdict.Location` of line ``lineno`` (1-based) of ``text``."""
        lines = self.text.splitlines()
        source = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else None
        if self.cell is not None:
            return Location(self.file, lineno, self.cell, source)
        return Location(self.file, self.first_line + lineno - 1, None, source)


def display_path(path: Path | str) -> str:
    """How reports name a user's file: relative to the working directory when it is inside it.

    Example::

        display_path(Path.cwd() / "homework.py")   # 'homework.py'
        display_path(Path.cwd().parent / "ex1.py")  # '../ex1.py' (absolute when further away)
    """
    import os

    path = Path(path)
    try:
        relative = os.path.relpath(path.resolve(), Path.cwd().resolve())
    except (ValueError, OSError):  # another drive (Windows), a vanished working directory
        return str(path)
    return relative if relative.count("..") <= 1 else str(path)


class Implementation:
    """Base class: a named source of gradients. Subclasses implement :meth:`run`."""

    description: str = "?"
    #: Whether :meth:`run` takes a ``plan`` (re-runs with true gradients substituted: independent grading).
    supports_plans: bool = False

    def source_spans(self, exercise: str | None = None) -> list[SourceSpan]:
        """The user's source, for hints that quote it (never executed): all of it, or what runs for
        ``exercise`` (a notebook's own cells for that exercise)."""
        return []

    def exercises(self) -> tuple[str, ...]:
        """The exercises this implementation answers, e.g. ``("ex1", "ex2", "ex3")``."""
        return ("ex1",)

    def run(self, exercise: str, problem: Problem, timeout: float | None, *, plan: Any = None) -> RunResult:
        """Run the user's code for ``exercise`` on fresh copies of ``problem``'s values.

        ``plan`` (a :class:`~pytest_backprop.usercode.program.Plan`) steers a re-run: true gradients
        substituted where the code assigns them, statements to continue past (independent grading).
        """
        raise NotImplementedError  # pragma: no cover

    def missing_reason(self, exercise: str) -> str | None:
        """Why this implementation has no answer for ``exercise`` (None when it has one)."""
        if exercise in self.exercises():
            return None
        function = EXERCISE_FUNCTIONS.get(exercise)
        where = (f"a notebook cell, a `# %%` cell of a script, or a module function `{function}(...)`" if function
                 else "a script, notebook or module `backward(cache)`")
        return f"not in {self.description}: write Exercise {exercise[2:]} as {where}"

    def _is_user_file(self, filename: str) -> bool:
        return False

    def _locate(self, exc: BaseException) -> UserError:
        return locate(exc, self._is_user_file, lambda f, l: linecache.getline(f, l) or None,
                      lambda f, l: (display_path(f), l))


def namespace_for(problem: Problem) -> tuple[dict[str, Any], dict[str, Any], CmpRecorder]:
    """A fresh namespace for user code: copies of the forward values, constants, globals, ``cmp``.

    Example::

        namespace, handed_out, recorder = namespace_for(problem)
        exec("dlogprobs = -probs", namespace)
    """
    handed_out = problem.cache()
    recorder = CmpRecorder(handed_out, problem.spec.order)
    namespace: dict[str, Any] = {"__name__": "__backprop__", "torch": torch, "F": F, "cmp": recorder}
    namespace.update(problem.globals())
    namespace.update(handed_out)
    return namespace, handed_out, recorder
