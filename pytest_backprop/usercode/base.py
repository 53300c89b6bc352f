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

from reference_model.model import CONSTANTS, GRADIENT_ORDER

from ..problems.instance import Problem
from ..verdict import Diagnosis, Location
from .run import UserError, call_user, locate

EXERCISE_FUNCTIONS = {"ex2": "cross_entropy_backward", "ex3": "batchnorm_backward"}
#: What each exercise's answer is the gradient of, and which true upstream gradients it may use.
EXERCISE_TARGET = {"ex1": None, "ex2": "logits", "ex3": "hprebn"}
#: True gradients handed to Exercises 2 and 3 (only those upstream of the part to derive in one go).
EXERCISE_UPSTREAM = {"ex2": (), "ex3": GRADIENT_ORDER[:GRADIENT_ORDER.index("hpreact") + 1]}


class LoadError(Exception):
    """The implementation cannot be found or loaded at all (bad path, syntax or import error)."""


@dataclass
class RunResult:
    """What one run of user code produced: gradients by tensor name, an error, warnings."""

    grads: dict[str, Any]
    error: UserError | None = None
    warnings: list[Diagnosis] = field(default_factory=list)
    #: Verdict overrides by tensor name (e.g. ``reads_autograd``): the answer fails with this hint.
    overrides: dict[str, Diagnosis] = field(default_factory=dict)


class CmpRecorder:
    """The namespace's ``cmp(name, dt, t)``: records which forward tensor each answer is for.

    ``t`` is recognised by identity among the tensors the kit handed out, so renamed gradients
    (``cmp('logprobs', dL_dlogprobs, logprobs)``) are checked through the student's own calls.
    """

    def __init__(self, handed_out: Mapping[str, Any]):
        self._by_id = {id(v): k for k, v in handed_out.items() if isinstance(v, torch.Tensor)}
        self.recorded: dict[str, Any] = {}

    def __call__(self, s: str, dt: Any, t: Any = None) -> None:
        name = self._by_id.get(id(t)) or (s.strip() if isinstance(s, str) else None)
        if name in GRADIENT_ORDER:
            self.recorded[name] = dt


def forward_watch(handed_out: Mapping[str, Any], namespace: Mapping[str, Any], originals: Mapping[str, Any]) -> list[Diagnosis]:
    """Warnings about the user's code changing what it was given: rebinding names, in-place edits.

    Example::

        warnings = forward_watch(handed_out, namespace, problem.truth.values)
        [w.code for w in warnings]   # e.g. ['reassigned_name'] after `for n in range(3)`
    """
    warnings: list[Diagnosis] = []
    for name, given in handed_out.items():
        if name in namespace and namespace[name] is not given and name in (*CONSTANTS, *GRADIENT_ORDER):
            warnings.append(Diagnosis("reassigned_name",
                                      f"your code rebinds `{name}` (e.g. `for {name} in range(...)`); later lines that "
                                      f"use `{name}` see your value, not the forward pass's"))
        if isinstance(given, torch.Tensor) and not torch.equal(given, originals[name]):
            warnings.append(Diagnosis("mutated_input",
                                      f"your code modified `{name}` in place; the kit's own copy is unaffected, but "
                                      "lines of yours that read it afterwards saw the modified values"))
    return warnings


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
    """
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


class Implementation:
    """Base class: a named source of gradients. Subclasses implement :meth:`run`."""

    description: str = "?"

    def source_spans(self) -> list[SourceSpan]:
        """The user's source this implementation runs, for hints that quote it (never executed)."""
        return []

    def exercises(self) -> tuple[str, ...]:
        """The exercises this implementation answers, e.g. ``("ex1", "ex2", "ex3")``."""
        return ("ex1",)

    def run(self, exercise: str, problem: Problem, timeout: float | None) -> RunResult:  # pragma: no cover
        raise NotImplementedError

    def _is_user_file(self, filename: str) -> bool:
        return False

    def _locate(self, exc: BaseException) -> UserError:
        return locate(exc, self._is_user_file, lambda f, l: linecache.getline(f, l) or None)


def namespace_for(problem: Problem) -> tuple[dict[str, Any], dict[str, Any], CmpRecorder]:
    """A fresh namespace for user code: copies of the forward values, constants, globals, ``cmp``.

    Example::

        namespace, handed_out, recorder = namespace_for(problem)
        exec("dlogprobs = -probs", namespace)
    """
    handed_out = problem.cache()
    recorder = CmpRecorder(handed_out)
    namespace: dict[str, Any] = {"__name__": "__backprop__", "torch": torch, "F": F, "cmp": recorder}
    namespace.update(problem.globals())
    namespace.update(handed_out)
    return namespace, handed_out, recorder


def run_code(code: Any, problem: Problem, timeout: float | None, locate_error: Callable[[BaseException], UserError]) -> RunResult:
    """Execute compiled user code in a fresh namespace and collect its gradients.

    Example::

        run = run_code(compile(src, "student.py", "exec"), problem, 60, impl._locate)
        run.grads["logprobs"]
    """
    namespace, handed_out, recorder = namespace_for(problem)
    _, exc = call_user(lambda: exec(code, namespace), timeout)
    grads = {name: namespace["d" + name] for name in GRADIENT_ORDER if "d" + name in namespace}
    grads.update(recorder.recorded)
    warnings = forward_watch(handed_out, namespace, problem.truth.values)
    return RunResult(grads, locate_error(exc) if exc else None, warnings)


