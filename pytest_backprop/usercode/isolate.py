"""``--backprop-isolate``: the user's code runs in one warm child process, never in the grader's.

By default user code runs in the pytest process (fast, and tracebacks point into the user's file).
That is **not a sandbox**: code in the same process can end it (a signal, a segfault), exhaust
memory, register ``atexit`` handlers, or monkeypatch what the kit judges with. The in-process runner
defends only against accidents (``SystemExit`` and ``os._exit`` become verdicts, a time limit stops
endless loops, patched ``torch`` attributes are restored after each run).

With ``--backprop-isolate`` one child Python process per submission (started once, in its own
session, kept warm) loads the implementation and serves every run: the built-in checks, the
property checks, all the steps of Exercise 4 and the instructor's tests (``backprop_student``). Each
request carries the problem (its forward values) and the time limit; the child runs the user's code
in a fresh namespace, as in-process, and sends back only the answers. Comparison and verdicts
happen in the grader, so:

- what the user's code does to its own process (exit, crash, monkeypatching the kit or torch,
  ``atexit`` handlers, an endless loop in C code that ignores signals: the grader kills the child
  after the time limit) cannot end pytest or change a verdict; a dead child is replaced for the next
  run (at most :data:`MAX_DEATHS` times);
- answers travel as plain data (tensors as bytes, numbers, strings, the kit's own records), decoded
  by an unpickler that can build no object but containers: a reply cannot run code in the grader;
- the user's prints go to a file, shown in the report of the test that ran the code (pytest's
  "Captured stdout"), never in the grader's own output;
- processes the code spawns are killed after every run (the child is their subreaper, Linux), and
  :func:`close_all` (called before results are written) kills the child with every process it
  spawned, detached ones included;
- with ``--backprop-isolate-user`` (the grader running as root, as on Gradescope) the child runs as
  that unprivileged user: it cannot write the grader's files (results.json), signal or trace the
  grader, or change the installed kit, and every process of that user is killed at the end.

How the child starts: without a user, on Linux, and from a grader that has started no thread since
it imported torch (:func:`can_fork`), the child is **forked** from the grader, which has torch
imported already: ready in milliseconds instead of a second Python importing torch for 2-3 s of CPU.
The child then resets what a fresh interpreter would have: its own session, stdout and stderr to its
log file, no other file descriptors, torch's default seed, and one thread, which it keeps
(``torch.set_num_threads`` does nothing there: an OpenMP pool that ran in the grader would hang the
child's first parallel region). Running as the grader's own user it could read the grader's files
anyway; it also inherits the grader's memory image (its modules, and truths computed before it was
forked), which is why a sandbox user never gets a forked child. With ``--backprop-isolate-user``
the child is a fresh interpreter started as that user, holding nothing of the grader's in memory;
elsewhere (macOS, where forking a process with torch loaded is unsafe) too.

It is still not a complete sandbox: the child can read what its user can read, use the network and
exhaust the machine's memory. Grade untrusted submissions inside a container or VM (Gradescope's
autograder is one). POSIX only.

Example::

    pytest --backprop --backprop-impl=student.ipynb --backprop-isolate
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import io
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch


from ..problems.instance import Problem
from ..verdict import Diagnosis, Location
from .base import GradientError, Implementation, LoadError, RunResult, SourceSpan
from .run import UserError, describe_type

#: Seconds the child may take to start (interpreter, torch, loading the implementation), on top of
#: ``--backprop-timeout``.
STARTUP_GRACE = 60.0
#: Seconds a run may take on top of ``--backprop-timeout`` (sending the problem and the answers).
RUN_GRACE = 30.0
#: How many times a child that died (os._exit, a crash, a kill) is replaced before runs stop.
MAX_DEATHS = 3
#: Characters of the user's output forwarded per run (the rest is cut).
MAX_OUTPUT = 20_000
_MAX_FRAME = 1 << 34  # a reply announcing more bytes than this is not read
_PR_SET_CHILD_SUBREAPER, _PR_SET_PDEATHSIG = 36, 1
_real_exit = os._exit  # taken at import, before any user code can replace it


@dataclass(frozen=True)
class Opaque:
    """Stands for an answer that cannot travel back from the child (not a tensor, array or plain value)."""

    description: str

    def __repr__(self) -> str:
        return f"<{self.description}, not sent back by the isolated child>"


# --- the wire: plain data only ------------------------------------------------------------------

#: Records that travel by value (a RunResult and what it holds). A record type added to RunResult
#: must be listed here to be sent back; any other object becomes an :class:`Opaque`.
WIRE_RECORDS: dict[str, type] = {cls.__name__: cls for cls in (RunResult, GradientError, UserError, Diagnosis,
                                                               Location, SourceSpan, Opaque)}
_RECORD_NAMES = {cls: name for name, cls in WIRE_RECORDS.items()}
_PLAIN = (type(None), bool, int, float, complex, str, bytes)


class WireError(ValueError):
    """A reply that is not what the kit's own child sends (only hostile code produces one)."""


def _tensor_fields(t: torch.Tensor) -> list[Any]:
    t = t.detach()
    device = str(t.device)
    if device != "cpu":
        t = t.cpu()
    try:
        raw = t.numpy().tobytes()  # C order, whatever the strides
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16, ...), a subclass, a view numpy refuses
        flat = t.as_subclass(torch.Tensor).contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return [str(t.dtype).replace("torch.", ""), list(t.shape), raw, device]


def to_plain(value: Any, depth: int = 0) -> Any:
    """``value`` as nested lists, tagged dicts and plain values (what :func:`to_wire` pickles).

    Example::

        to_plain((1, torch.zeros(2)))   # {'__tuple__': [1, {'__tensor__': ['float32', [2], b'...', 'cpu']}]}
    """
    if depth > 64:
        return {"__opaque__": "a too deeply nested value"}
    if type(value) in _PLAIN:
        return value
    if isinstance(value, torch.Tensor):
        return {"__tensor__": _tensor_fields(value)}
    if type(value) in _RECORD_NAMES:
        fields = {f.name: to_plain(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
        return {"__record__": [_RECORD_NAMES[type(value)], fields]}
    if type(value) is list:
        return [to_plain(v, depth + 1) for v in value]
    if type(value) is tuple:
        return {"__tuple__": [to_plain(v, depth + 1) for v in value]}
    if type(value) in (set, frozenset):
        return {"__set__": [to_plain(v, depth + 1) for v in value]}
    if type(value) is dict:
        return {"__dict__": [[to_plain(k, depth + 1), to_plain(v, depth + 1)] for k, v in value.items()]}
    try:
        import numpy as np

        if isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype.kind in "biufc":
            arr = np.ascontiguousarray(value)
            return {"__numpy__": [arr.dtype.str, list(arr.shape), arr.tobytes(), isinstance(value, np.generic)]}
    except ImportError:  # pragma: no cover -- numpy is a dependency
        pass
    return {"__opaque__": describe_type(value)}


_ITEMSIZE: dict[torch.dtype, int] = {}


def _tensor_from(fields: Any) -> torch.Tensor:
    dtype_name, shape, raw, device = fields
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype) or type(shape) is not list or not all(type(s) is int and s >= 0 for s in shape):
        raise WireError(f"bad tensor: {dtype_name!r} {shape!r}")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = _ITEMSIZE.get(dtype) or _ITEMSIZE.setdefault(dtype, torch.empty((), dtype=dtype).element_size())
    if type(raw) is not bytes or len(raw) != numel * itemsize:
        raise WireError("bad tensor data")
    if numel == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        t = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    if device != "cpu":
        try:
            t = t.to(device)
        except Exception:  # noqa: BLE001 -- no such device here (a CPU build raises AssertionError): judge on the CPU
            pass
    return t


def from_plain(value: Any) -> Any:
    """Inverse of :func:`to_plain`; raises :class:`WireError` on anything else.

    Example::

        from_plain(to_plain({"probs": torch.ones(2)}))   # {'probs': tensor([1., 1.])}
    """
    if type(value) in _PLAIN:
        return value
    if type(value) is list:
        return [from_plain(v) for v in value]
    if type(value) is not dict or len(value) != 1:
        raise WireError(f"unexpected {type(value).__name__}")
    (tag, body), = value.items()
    if tag == "__tensor__" and type(body) is list and len(body) == 4:
        return _tensor_from(body)
    if tag == "__tuple__" and type(body) is list:
        return tuple(from_plain(v) for v in body)
    if tag == "__set__" and type(body) is list:
        return frozenset(from_plain(v) for v in body)
    if tag == "__dict__" and type(body) is list:
        return {from_plain(k): from_plain(v) for k, v in body}
    if tag == "__opaque__" and type(body) is str:
        return Opaque(body)
    if tag == "__record__" and type(body) is list and len(body) == 2 and body[0] in WIRE_RECORDS:
        cls, fields = WIRE_RECORDS[body[0]], body[1]
        if type(fields) is not dict:
            raise WireError("bad record")
        try:
            return cls(**{str(k): from_plain(v) for k, v in fields.items()})
        except TypeError as exc:
            raise WireError(f"bad {body[0]}: {exc}") from None
    if tag == "__numpy__" and type(body) is list and len(body) == 4:
        import numpy as np

        dtype, shape, raw, scalar = body
        try:
            arr = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
        except (TypeError, ValueError) as exc:
            raise WireError(f"bad array: {exc}") from None
        return arr[()] if scalar else arr
    raise WireError(f"unexpected tag {tag!r}")


class _RequestPickler(pickle.Pickler):
    """Pickles a request for the child: tensors as raw bytes (fast; attributes and ``.grad`` stay behind)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return _tensor_from, (_tensor_fields(obj),)
        return NotImplemented


def _request_bytes(request: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    _RequestPickler(buf, protocol=5).dump(dict(request))
    return buf.getvalue()


class _DataOnly(pickle.Unpickler):
    """Builds containers and plain values only: every global (class, function) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a reply")


def to_wire(value: Any) -> bytes:
    """Serialize an answer for the grader (see :func:`from_wire`).

    Example::

        from_wire(to_wire(("ok", 3)))   # ('ok', 3)
    """
    return pickle.dumps(to_plain(value), protocol=5)


def from_wire(data: bytes) -> Any:
    """Decode a reply without trusting it: no code runs, only data is built.

    Example::

        from_wire(to_wire({"dprobs": torch.zeros(2)}))
    """
    try:
        plain = _DataOnly(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 -- anything malformed
        raise WireError(f"unreadable reply: {type(exc).__name__}: {exc}") from None
    return from_plain(plain)


def _write_frame(fd: int, data: bytes, deadline: float | None) -> None:
    view = memoryview(struct.pack(">Q", len(data)) + data)
    while view:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise TimeoutError
        view = view[os.write(fd, view[:1 << 20]):]


def _read_exact(fd: int, n: int, deadline: float | None, alive: Any = None) -> bytes | None:
    """``n`` bytes from ``fd``; None at end of file, or as soon as ``alive()`` says the writer has died
    (a process it spawned may still hold the pipe open)."""
    buf = bytearray()
    while len(buf) < n:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            wait = 0.5 if left is None else min(left, 0.5)
            if select.select([fd], [], [], wait if alive is not None else left)[0]:
                break
            if alive is not None and not alive():
                return None
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_frame(fd: int, deadline: float | None, alive: Any = None) -> bytes | None:
    head = _read_exact(fd, 8, deadline, alive)
    if head is None:
        return None
    (size,) = struct.unpack(">Q", head)
    if size > _MAX_FRAME:
        raise WireError(f"a reply of {size} bytes")
    return _read_exact(fd, size, deadline, alive)


# --- processes ---------------------------------------------------------------------------------

def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty elsewhere)."""
    out: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            out[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _children(pid: int) -> list[int] | None:
    """Direct children of ``pid`` from /proc/PID/task/*/children (cheap), None where that is unavailable."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return [] if os.path.isdir("/proc/self/task") else None
    found: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            return None  # a kernel without CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (children, their children, ...), from /proc.

    Example::

        descendants(os.getpid())   # [] when nothing was started
    """
    direct = _children(pid)
    if direct is not None:
        found, todo = [], list(direct)
        while todo:
            p = todo.pop()
            found.append(p)
            todo.extend(_children(p) or ())
        return found
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(pid: int, *, include_root: bool = True) -> set[int]:
    """Stop ``pid`` and all its descendants (so none can fork meanwhile), then kill them all; the pids.

    Example::

        kill_tree(child.pid)
    """
    stopped: set[int] = set()
    for _ in range(50):
        found = set(descendants(pid)) | ({pid} if include_root else set())
        new = found - stopped
        if not new:
            break
        for p in new:
            _signal(p, signal.SIGSTOP)
        stopped |= new
    for p in stopped:
        _signal(p, signal.SIGKILL)
    return stopped


def kill_user(user: int | str) -> None:
    """Kill every process of ``user`` (``kill(-1, SIGKILL)`` run as that user): only for a user that
    nothing but the submission runs as.

    Example::

        kill_user("backprop-student")
    """
    uid, gid = resolve_user(user)
    code = "import os, signal\nfor _ in range(3): os.kill(-1, signal.SIGKILL)\n"
    for _ in range(2):
        try:
            subprocess.run([sys.executable, "-S", "-c", code], user=uid, group=gid, extra_groups=[],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30, cwd="/", check=False)
        except (OSError, subprocess.SubprocessError):
            return


def resolve_user(user: int | str) -> tuple[int, int]:
    """``(uid, gid)`` of a user name or number (a number needs no entry in /etc/passwd).

    Example::

        resolve_user("nobody")   # (65534, 65534)
    """
    if isinstance(user, int) or str(user).isdigit():
        uid = int(user)
        try:
            import pwd

            return uid, pwd.getpwuid(uid).pw_gid
        except (ImportError, KeyError):
            return uid, uid
    import pwd

    try:
        entry = pwd.getpwnam(str(user))
    except KeyError:
        raise LoadError(f"--backprop-isolate-user: no such user: {user}") from None
    return entry.pw_uid, entry.pw_gid


# --- the child's side ----------------------------------------------------------------------------

def _become_subreaper() -> None:
    """Orphans of the user's processes are re-parented to this child, so none escapes it; and this
    child is killed when the grader dies (Linux; elsewhere nothing happens)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap(killed: set[int], *, patience: float = 2.0) -> None:
    """Collect the exit status of the processes just killed (they are this subreaper's children by now)."""
    deadline = time.monotonic() + patience
    while killed and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            killed.discard(pid)
        else:
            killed = {p for p in killed if os.path.exists(f"/proc/{p}")}
            time.sleep(0.005)


def _serve(impl: Any, request: Mapping[str, Any]) -> tuple[str, Any]:
    op = request["op"]
    if op == "run":
        return "ok", impl.run(request["exercise"], request["problem"], request["timeout"], **request["kwargs"])
    if op == "lines":
        return "ok", impl.line_answers(request["problem"], request["timeout"])
    return "crash", f"unknown request {op!r}"


def child_main(requests_fd: int, replies_fd: int) -> None:
    """The child's loop: load the implementation, then answer run requests until the grader closes
    the pipe. The user's prints go to stdout/stderr (a file the grader reads); replies to ``replies_fd``.

    Example::

        python -c "from pytest_backprop.usercode.isolate import child_main; child_main(5, 8)"
    """
    _become_subreaper()
    for fd in (requests_fd, replies_fd):
        os.set_inheritable(fd, False)  # programs the user's code starts do not get the kit's pipes
    torch.set_num_threads(1)  # tiny tensors: as in-process (pytest_backprop.problems.device.single_thread)
    gc.freeze()  # torch's objects live to the end: full collections skip them (as the plugin does in-process)

    owner = os.getpid()

    def reply(value: Any) -> None:
        if os.getpid() != owner:  # a fork of the user's code came back here (its os._exit became SystemExit)
            _real_exit(0)
        try:
            data = to_wire(value)
        except Exception:  # noqa: BLE001 -- never leave the grader waiting
            data = to_wire(("crash", traceback.format_exc()))
        _write_frame(replies_fd, data, None)

    hello = pickle.loads(_read_frame(requests_fd, None) or b"")
    sys.path[:] = hello["sys_path"]
    from .loaders import load_implementation

    try:
        impl = load_implementation(hello["spec"], Path(hello["rootdir"]), hello.get("problem"))
        reply(("ok", {"exercises": tuple(impl.exercises()), "description": impl.description}))
    except LoadError as exc:
        reply(("load_error", str(exc)))
        impl = None
    except BaseException:  # noqa: BLE001 -- a broken kit install, say: tell the grader
        reply(("crash", traceback.format_exc()))
        impl = None
    while impl is not None:
        frame = _read_frame(requests_fd, None)
        if frame is None:
            break
        try:
            answer = _serve(impl, pickle.loads(frame))
        except BaseException:  # noqa: BLE001 -- report anything to the grader
            answer = ("crash", traceback.format_exc())
        if os.getpid() != owner:  # a fork of the user's code came back here: it must not serve
            _real_exit(0)
        _reap(kill_tree(os.getpid(), include_root=False))  # what the user's code started ends with the run
        sys.stdout.flush()
        sys.stderr.flush()
        reply(answer)
    _real_exit(0)  # no interpreter teardown, no atexit handlers: the user's code may have left them behind


# --- the grader's side ---------------------------------------------------------------------------

#: Whether a child without a user may be forked from the grader (see the module docstring): Linux only.
FORK = sys.platform.startswith("linux") and hasattr(os, "fork")
_TORCH_DEFAULT_SEED = 67280421310721  # what a fresh interpreter's torch.initial_seed() is


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1 << 30  # unknown: never fork


_THREADS_AT_IMPORT = _thread_count()  # torch is imported: what it started is there already


def can_fork() -> bool:
    """Whether the next child is forked: :data:`FORK`, and no thread started since torch was
    imported. A thread pool that has run in the grader (OpenMP's, after its first large parallel
    operation) makes a forked child hang at its own first parallel region (measured: a child doing a
    2000x2000 matmul never answered), so such a grader starts a fresh interpreter instead.

    Example::

        can_fork()   # True in a fresh pytest process; False once OpenMP's threads exist
    """
    return FORK and _thread_count() <= _THREADS_AT_IMPORT


class _Forked:
    """The part of :class:`subprocess.Popen` that :class:`WarmChild` uses, for a forked child."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def _status(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere: it is gone
                self.returncode = -signal.SIGKILL
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._status(os.WNOHANG)

    def wait(self) -> int:
        code = self._status(0)
        assert code is not None
        return code


def _fork_child(requests_fd: int, replies_fd: int, log_fd: int) -> _Forked:
    """Fork the child, which becomes what ``python -c child_main(...)`` would have been: its own
    session, stdin from /dev/null, stdout and stderr to ``log_fd``, only its two pipes open."""
    pid = os.fork()
    if pid:
        return _Forked(pid)
    try:  # the child: never return into the grader's code
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        keep = sorted((requests_fd, replies_fd))
        os.closerange(3, keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, _max_fd())
        import faulthandler

        faulthandler.disable()  # pytest's handler wrote to a descriptor that is closed now
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 -- the process's own standard streams
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
        torch.manual_seed(_TORCH_DEFAULT_SEED)
        torch.set_num_threads(1)
        torch.set_num_threads = _one_thread  # an OpenMP pool inherited from the grader must never run here
        child_main(requests_fd, replies_fd)
    finally:
        _real_exit(1)
    raise AssertionError("unreachable")  # pragma: no cover


def _one_thread(count: int) -> None:
    """``torch.set_num_threads`` in a forked child: it stays on one thread (if the grader's OpenMP
    threads ever ran before the fork, a parallel region in the child would wait for them forever)."""


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 4096

_LIVE: "set[WarmChild]" = set()  # strong references: a child is never forgotten before it is closed


def close_all() -> None:
    """Kill every warm child of this process and everything they spawned (before results are written).

    Example::

        close_all()   # the plugin calls it at the end of the session
    """
    for child in list(_LIVE):
        child.close()


atexit.register(close_all)


class ChildDied(Exception):
    """The child ended (or had to be killed) before it answered."""

    def __init__(self, message: str, *, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


class WarmChild:
    """One child process serving requests for one implementation (see the module docstring).

    Example::

        child = WarmChild("student.py", Path.cwd(), startup_timeout=60)
        child.request({"op": "run", ...}, limit=90)
        child.close()
    """

    def __init__(self, spec: str, rootdir: Path, *, startup_timeout: float | None, user: int | str | None = None,
                 problem_spec: Any = None):
        self.user = user
        fd, path = tempfile.mkstemp(prefix="backprop-output-")
        os.close(fd)
        log_w = os.open(path, os.O_WRONLY | os.O_APPEND)  # the child's own offset: reading never moves it
        self.log = open(path, "rb")  # noqa: SIM115 -- kept open for the child's lifetime
        os.unlink(path)
        self._log_read = 0
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        code = f"from pytest_backprop.usercode.isolate import child_main; child_main({req_r}, {rep_w})"
        kwargs: dict[str, Any] = {}
        if user is not None:
            uid, gid = resolve_user(user)
            kwargs = {"user": uid, "group": gid, "extra_groups": [], "umask": 0o077}
        try:
            if user is None and can_fork() and min(req_r, rep_w, log_w) > 2:  # (0-2 are the child's own)
                self.proc = _fork_child(req_r, rep_w, log_w)
            else:
                self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=log_w,
                                             stderr=log_w, pass_fds=(req_r, rep_w), start_new_session=True,
                                             cwd=os.getcwd(), **kwargs)
        except (OSError, subprocess.SubprocessError) as exc:
            for fd in (self._req_w, self._rep_r):
                os.close(fd)
            raise LoadError(f"cannot start the process that runs your code: {exc}") from exc
        finally:
            for fd in (req_r, rep_w, log_w):
                os.close(fd)
        _LIVE.add(self)
        self.spec = spec
        self._startup = (time.monotonic() + startup_timeout) if startup_timeout else None
        self.exercises: tuple[str, ...] | None = None
        self.description: str | None = None
        try:  # the child loads the implementation as soon as it has started; ready() waits for it
            hello = {"spec": spec, "rootdir": str(rootdir), "sys_path": list(sys.path)}
            if problem_spec is not None:  # pickled as its origin: the child loads the problem again
                hello["problem"] = problem_spec
            _write_frame(self._req_w, _request_bytes(hello), self._startup)
        except (OSError, TimeoutError):
            pass  # it died at once: ready() says so

    def ready(self) -> None:
        """Wait until the child has loaded the implementation; raises LoadError if it could not."""
        if self.exercises is not None:
            return
        try:
            status, data = self._receive(self._startup, time.monotonic())
        except ChildDied as exc:
            raise LoadError(f"cannot load {self.spec} in a child process: {exc}") from None
        if status != "ok":
            self.close()
            raise LoadError(data if status == "load_error" else f"cannot load {self.spec} in a child process:\n{data}")
        self.exercises, self.description = tuple(data["exercises"]), data["description"]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """What the user's code printed since the last call."""
        self.log.seek(self._log_read)
        data = self.log.read()
        self._log_read += len(data)
        text = data.decode(errors="replace")
        if len(text) > MAX_OUTPUT:
            text = text[:MAX_OUTPUT] + f"\n[... {len(text) - MAX_OUTPUT} more characters of output cut]\n"
        return text

    def _tail(self) -> str:
        self.log.seek(max(0, self.log.seek(0, os.SEEK_END) - 2000))
        lines = self.log.read().decode(errors="replace").strip().splitlines()[-3:]
        return (": " + " / ".join(lines)) if lines else ""

    def request(self, request: Mapping[str, Any], *, limit: float | None) -> tuple[str, Any]:
        """Send one request and wait at most ``limit`` seconds for the answer; raises :class:`ChildDied`."""
        self.ready()
        start = time.monotonic()
        deadline = start + limit if limit else None
        try:
            _write_frame(self._req_w, _request_bytes(request), deadline)
        except TimeoutError:
            self.close()
            raise ChildDied(f"still running after {time.monotonic() - start:.0f} s; the process running your code "
                            "was killed", timeout=True) from None
        except OSError:
            pass  # it died: _receive says how
        return self._receive(deadline, start)

    def _receive(self, deadline: float | None, start: float) -> tuple[str, Any]:
        try:
            frame = _read_frame(self._rep_r, deadline, alive=lambda: self.proc.poll() is None)
        except TimeoutError:
            self.close()
            raise ChildDied(f"still running after {time.monotonic() - start:.0f} s; the process running your code "
                            "was killed", timeout=True) from None
        except (WireError, OSError):
            frame = None
        if frame is None:
            code = self.proc.wait()
            self.close()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise ChildDied(f"the process running your code {how} before returning its answers "
                            f"(os._exit, a crash, or running out of memory){self._tail()}")
        try:
            answer = from_wire(frame)
        except WireError as exc:
            self.close()
            raise ChildDied(f"the process running your code sent back something that is not an answer ({exc})")
        if not (isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], str)):
            self.close()
            raise ChildDied("the process running your code sent back something that is not an answer")
        return answer

    def close(self) -> None:
        """Kill the child, every process it spawned, and (with a user) every process of that user."""
        _LIVE.discard(self)
        for fd in (self._req_w, self._rep_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self._req_w = self._rep_r = -1
        if self.proc.returncode is None:
            kill_tree(self.proc.pid)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its session: whatever /proc did not show
            except (ProcessLookupError, PermissionError, OSError):
                pass
            self.proc.wait()
        if self.user is not None:
            kill_user(self.user)


class IsolatedImplementation(Implementation):
    """Any implementation form, run in one warm child process (see the module docstring).

    Example::

        impl = IsolatedImplementation("student.py", Path.cwd(), timeout=60)
        impl.run("ex1", problem, timeout=60).grads["probs"]
        impl.close()
    """

    supports_plans = True

    def __init__(self, spec: str, rootdir: Path, timeout: float | None = None, *, user: int | str | None = None,
                 problem_spec: Any = None):
        from .loaders import find_file

        found = find_file(spec, Path(rootdir))  # a missing file is a LoadError here: no process started
        self.spec = str(found.resolve()) if found is not None else spec
        self.rootdir = Path(rootdir)
        self.user = user
        self.problem_spec = problem_spec  # None: the lecture's
        self.deaths = 0
        self._programs: dict[str, Any] = {}  # exercise -> the program as its source says (never run here)
        self._child: WarmChild | None = self._start(timeout)
        self._exercises = self._child.exercises
        self.description = f"{self._child.description} (isolated)"

    def _start(self, timeout: float | None) -> WarmChild:
        child = _EARLY.pop((self.spec, str(self.rootdir), self.user, _problem_key(self.problem_spec)), None)
        if child is None or not child.alive:
            child = WarmChild(self.spec, self.rootdir, startup_timeout=(timeout + STARTUP_GRACE) if timeout else None,
                              user=self.user, problem_spec=self.problem_spec)
        child.ready()
        return child

    def exercises(self) -> tuple[str, ...]:
        return tuple(self._exercises)

    def source_spans(self, exercise: str | None = None) -> list[SourceSpan]:
        """Read statically in this process (nothing of the user's code runs here)."""
        from .loaders import static_source_spans

        return static_source_spans(self.spec, self.rootdir)

    @staticmethod
    def _sendable(problem: Problem, exercise: str | None = None) -> Problem:
        """What running user code reads: the forward values (with the parameters), sizes, dtype, batch,
        and the true gradients an exercise is handed (Exercise 3's upstream); not the names, the other
        true gradients, the float64 truth or the tolerances, which stay with the judge."""
        from .base import EXERCISE_UPSTREAM

        given = {k: problem.truth.grads[k] for k in EXERCISE_UPSTREAM.get(exercise or "", ()) if k in problem.truth.grads}
        truth = dataclasses.replace(problem.truth, grads=given)
        return dataclasses.replace(problem, words=None, params={}, truth=truth, truth64=truth, tolerances={})

    def _ask(self, request: dict[str, Any], timeout: float | None) -> tuple[str, Any] | UserError:
        if self._child is None or not self._child.alive:
            if self.deaths >= MAX_DEATHS:
                return UserError("ProcessDied", f"the process running your code ended {self.deaths} times; "
                                                "your code is not run again in this session")
            try:
                self._child = self._start(timeout)
            except LoadError as exc:
                return UserError("LoadError", str(exc))
        child = self._child
        try:
            answer = child.request(request, limit=(timeout + RUN_GRACE) if timeout else None)
        except ChildDied as exc:
            self.deaths += 1
            self._child = None
            return UserError("Timeout" if exc.timeout else "ProcessDied", str(exc), timeout=exc.timeout)
        finally:
            printed = child.output()
            if printed:
                sys.stdout.write(printed)  # into the running test's captured output
        return answer

    def _with_truths(self, exercise: str, problem: Problem, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The plan the child runs under, with the true gradients of those the code reads but never
        writes (found from its source, here: the child is never asked which truths it wants)."""
        from .loaders import static_program
        from .program import Plan

        if exercise not in self._programs:
            self._programs[exercise] = static_program(self.spec, self.rootdir, exercise, self.problem_spec)
        program = self._programs[exercise]
        if program is None:
            return kwargs
        plan = kwargs.get("plan") or Plan()
        wanted = {t: problem.grads[t] for t in program.read_not_written() if t in problem.grads}
        return {**kwargs, "plan": Plan(plan.substitute, plan.continue_past, {**plan.inject, **wanted})}

    def run(self, exercise: str, problem: Problem, timeout: float | None, **kwargs: Any) -> RunResult:
        """Run ``exercise`` in the child; keyword arguments go to the child's ``run`` unchanged."""
        answer = self._ask({"op": "run", "exercise": exercise, "problem": self._sendable(problem, exercise),
                            "timeout": timeout, "kwargs": self._with_truths(exercise, problem, kwargs)}, timeout)
        if isinstance(answer, UserError):
            return RunResult({}, answer)
        status, data = answer
        if status == "ok" and isinstance(data, RunResult):
            return data
        return RunResult({}, UserError("InternalError", f"the child process failed outside your code:\n{data}"))

    def line_answers(self, problem: Problem, timeout: float | None) -> dict[str, tuple[Any, UserError | None]]:
        """Every line's answer to its random upstream, computed in the child (see ``LinesImplementation``)."""
        answer = self._ask({"op": "lines", "problem": self._sendable(problem), "timeout": timeout}, timeout)
        if not isinstance(answer, UserError):
            status, data = answer
            if status == "ok" and isinstance(data, dict):
                return data
            answer = UserError("InternalError", f"the child process failed outside your code:\n{data}")
        return {line.output: (None, answer) for line in problem.spec.lines}

    def close(self) -> None:
        """End the child and everything it started (also done by :func:`close_all`)."""
        if self._child is not None:
            self._child.close()
            self._child = None


_EARLY: dict[tuple[str, str, Any, str | None], WarmChild] = {}


def _problem_key(problem_spec: Any) -> str | None:
    return getattr(problem_spec, "origin", None)


def start_early(spec: str, rootdir: Path, *, timeout: float | None = None, user: int | str | None = None,
                problem_spec: Any = None) -> None:
    """Start the child for ``spec`` now, without waiting: it imports torch and loads the submission
    while pytest goes on (configuring, collecting); the :class:`IsolatedImplementation` made later for
    the same submission takes it over. Never raises (making the implementation reports any error).

    Example::

        start_early("homework.py", rootdir, timeout=60)   # the plugin does this with --backprop-isolate
    """
    from .loaders import find_file

    try:
        found = find_file(spec, Path(rootdir))
        key = (str(found.resolve()) if found is not None else spec, str(rootdir), user, _problem_key(problem_spec))
        if key not in _EARLY:
            _EARLY[key] = WarmChild(key[0], Path(rootdir), startup_timeout=(timeout + STARTUP_GRACE) if timeout else None,
                                    user=user, problem_spec=problem_spec)
    except (LoadError, OSError):
        pass


def load_submission(spec: str, rootdir: Path, *, isolate: bool, timeout: float | None = None,
                    user: int | str | None = None, problem_spec: Any = None) -> Implementation:
    """The implementation of ``spec`` as the kit runs it: in-process, or isolated in a warm child.

    Raises :class:`~pytest_backprop.usercode.base.LoadError` when it cannot be loaded.

    Example::

        impl = load_submission("homework.py", Path.cwd(), isolate=True, timeout=60)
    """
    if isolate:
        return IsolatedImplementation(spec, rootdir, timeout, user=user, problem_spec=problem_spec)
    if user is not None:
        raise LoadError("--backprop-isolate-user needs --backprop-isolate")
    from .loaders import load_implementation

    return load_implementation(spec, rootdir, problem_spec)
