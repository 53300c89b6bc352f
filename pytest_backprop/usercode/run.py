"""Running user code safely enough: fresh namespaces, a time limit, and where an exception happened."""

from __future__ import annotations

import operator
import os
import signal
import threading
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Callable, Iterator


class UserCodeTimeout(BaseException):
    """Raised inside user code when it runs past ``--backprop-timeout`` (BaseException: user code
    that catches ``Exception`` cannot swallow it)."""


@dataclass(frozen=True)
class UserError:
    """An exception raised by user code, located in the user's own file or cell."""

    type: str
    message: str
    filename: str | None = None
    lineno: int | None = None
    source_line: str | None = None
    timeout: bool = False
    code: str | None = None  # a diagnosis code that overrides exception/timeout (e.g. reads_autograd)

    @property
    def location(self) -> str:
        """``file.py:12`` (or ``cell 4, line 2`` for notebooks), or ``<unknown>``."""
        if self.filename is None:
            return "<unknown>"
        return f"{self.filename}:{self.lineno}" if not self.filename.startswith("cell ") else f"{self.filename}, line {self.lineno}"

    def describe(self) -> str:
        """One paragraph: what was raised, where, and the source line."""
        head = f"{self.type}: {self.message}" if self.message else self.type
        where = f" at {self.location}" if self.filename else ""
        src = f"\n    {self.source_line}" if self.source_line else ""
        return f"your code raised {head}{where}{src}"


def locate(exc: BaseException, is_user_file: Callable[[str], bool], source_lines: Callable[[str, int], str | None],
           display_name: Callable[[str, int], tuple[str, int]] = lambda f, l: (f, l)) -> UserError:
    """A :class:`UserError` for ``exc`` pointing at the innermost frame in user code.

    Example::

        error = locate(exc, lambda f: f == "student.py", lambda f, l: linecache.getline(f, l))
        error.location   # 'student.py:12'
    """
    frame_file, frame_line = None, None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if is_user_file(frame.f_code.co_filename):
            frame_file, frame_line = frame.f_code.co_filename, lineno
    if isinstance(exc, UserCodeTimeout):
        kind, message, timeout = "Timeout", str(exc), True
    else:
        kind, message, timeout = type(exc).__name__, str(exc), False
    if frame_file is None:
        return UserError(kind, message, timeout=timeout)
    src = source_lines(frame_file, frame_line)
    shown_file, shown_line = display_name(frame_file, frame_line)
    return UserError(kind, message, shown_file, shown_line, src.strip() if src else None, timeout)


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`UserCodeTimeout` in the running code after ``seconds`` (main thread, POSIX).

    Elsewhere (a worker thread, Windows) no limit is applied; ``--backprop-isolate`` is the robust
    alternative there.

    Example::

        with time_limit(1.0):
            exec(user_code, namespace)   # UserCodeTimeout after 1 s
    """
    usable = (seconds and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise UserCodeTimeout(f"still running after {seconds:.3g} s (--backprop-timeout): an endless loop?")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, float(seconds))
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:  # someone else's timer (pytest-timeout's signal method): re-arm what is left of it
            left = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)


def _guarded() -> list[Any]:
    import torch  # noqa: PLC0415 -- user code only runs when torch is in use anyway
    import torch.nn.functional
    import torch.testing

    return [torch, torch.testing, torch.nn.functional, torch.Tensor]


@contextmanager
def guard_torch() -> Iterator[None]:
    """Restore attributes of ``torch``, ``torch.testing``, ``torch.nn.functional`` and ``torch.Tensor``
    that user code replaced (``torch.allclose = lambda *a, **k: True``), and the default dtype.

    A guard against accidents, not a sandbox (see :mod:`pytest_backprop.usercode.isolate`).

    Example::

        with guard_torch():
            exec(user_code, namespace)
    """
    import torch  # noqa: PLC0415

    targets = _guarded()
    saved = [(tuple(vars(t)), tuple(vars(t).values())) for t in targets]
    dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        for target, (keys, values) in zip(targets, saved):
            now = vars(target)  # attributes added to modules stay: lazily imported submodules land there
            if isinstance(target, type) and now.keys() != set(keys):  # torch.Tensor.sum = ... shadows TensorBase's
                for key in now.keys() - set(keys):
                    try:
                        delattr(target, key)
                    except (AttributeError, TypeError):
                        pass
            # compared in C (thousands of attributes, twice per run); restored one by one only if any changed
            if not any(map(operator.is_not, map(now.get, keys, repeat(_MISSING)), values)):
                continue
            for key, value in zip(keys, values):
                if now.get(key, _MISSING) is not value:
                    try:
                        setattr(target, key, value)
                    except (AttributeError, TypeError):
                        pass
        torch.set_default_dtype(dtype)


_MISSING = object()


@contextmanager
def guard_exit() -> Iterator[None]:
    """While user code runs, ``os._exit(code)`` raises ``SystemExit`` instead of killing the process,
    so the gradients computed before it are still checked (``sys.exit`` already raises).

    Example::

        with guard_exit():
            exec("os._exit(3)", {"os": os})   # SystemExit: os._exit(3) called by your code
    """
    real_exit = os._exit
    here = os.getpid()

    def exit_instead(code: int = 0) -> None:
        if os.getpid() != here:  # a process the user's code forked: let it end for real
            real_exit(code)
        raise SystemExit(f"os._exit({code}) called by your code")

    os._exit = exit_instead
    try:
        yield
    finally:
        os._exit = real_exit


#: How many times user code was run in this process, by kind ("program", "backward", "line"):
#: read by ``benchmarks/startup.py`` to show that the checks run it only as often as they need.
RUNS: Counter[str] = Counter()


def call_user(fn: Callable[[], Any], seconds: float | None) -> tuple[Any, BaseException | None]:
    """Call ``fn`` under the time limit; return (result, None) or (None, exception).

    ``SystemExit`` from user code is caught too (a student's ``exit()`` must not end the pytest
    session), and torch attributes the code replaced are restored (:func:`guard_torch`).

    Example::

        result, exc = call_user(lambda: fn(cache), 60)
    """
    try:
        with guard_torch(), guard_exit(), time_limit(seconds):
            return fn(), None
    except (Exception, SystemExit, UserCodeTimeout) as exc:  # noqa: BLE001 -- any user failure is a verdict
        return None, exc

def describe_type(value: Any) -> str:
    """A short description of what the user returned, for messages."""
    if value is None:
        return "None"
    import torch  # noqa: PLC0415

    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{'an' if dtype[0] in 'aeiou' else 'a'} {dtype} tensor of shape {tuple(value.shape)}"
    shape = getattr(value, "shape", None)
    module = type(value).__module__.split(".")[0]
    kind = type(value).__qualname__ if module == "builtins" else f"{module}.{type(value).__qualname__}"
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{article} {kind}" + (f" of shape {tuple(shape)}" if shape is not None else "")
