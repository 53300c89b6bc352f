"""--backprop-isolate: one warm child process runs the user's code; nothing it does ends pytest,
changes a verdict, or outlives its run.

Each test starts a child (~2-3 s: importing torch), so the file keeps to the cases that matter.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_inprocess
from sandbox_env import alive, sandbox_python, sandbox_uid, uid_in_use, world_readable_dir  # noqa: F401 -- fixture

from pytest_backprop.judge.grade import verdicts_for_run
from pytest_backprop.problems.instance import build_problem, resolve_words
from pytest_backprop.properties.checks import case_problem
from pytest_backprop.usercode import isolate
from pytest_backprop.usercode.base import RunResult
from pytest_backprop.usercode.isolate import IsolatedImplementation, WireError
from pytest_backprop.usercode.loaders import load_implementation
from pytest_backprop.usercode.run import UserError
from pytest_backprop.verdict import Diagnosis

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ex1_solution.py"


@pytest.fixture(scope="module")
def problem():
    return build_problem(resolve_words(None))


def isolated(tmp_path: Path, source: str, name: str = "student.py", **kwargs) -> IsolatedImplementation:
    (tmp_path / name).write_text(textwrap.dedent(source))
    impl = IsolatedImplementation(str(tmp_path / name), tmp_path, 30, **kwargs)
    return impl


def statuses(run, problem) -> dict[str, str]:
    return {v.tensor: v.status for v in verdicts_for_run("ex1", run, problem)}




# --- the wire -------------------------------------------------------------------------------------

def test_answers_travel_as_data_and_come_back_equal():
    grads = {"probs": torch.randn(4, 3), "bnbias": torch.randn(1, 5).t(),  # non-contiguous
             "h": torch.randn(2, 2, dtype=torch.bfloat16), "Yb": torch.tensor([1, 2]), "n": torch.tensor(3.0),
             "empty": torch.zeros(0, 4), "arr": np.arange(6.0).reshape(2, 3), "scalar": np.float32(2.5),
             "pair": (1, [2.0, None], "x"), "odd": object()}
    result = RunResult(grads, UserError("ZeroDivisionError", "division by zero", "student.py", 3, "x = 1/0"),
                       [Diagnosis("mutated_input", "m")], {"probs": Diagnosis("reads_autograd", "copied")})
    back = isolate.from_wire(isolate.to_wire(("ok", result)))[1]
    assert isinstance(back, RunResult) and back.error == result.error and back.warnings == result.warnings
    assert back.overrides == result.overrides
    for name in ("probs", "bnbias", "h", "Yb", "n", "empty"):
        assert back.grads[name].dtype == grads[name].dtype and torch.equal(back.grads[name], grads[name])
    assert isinstance(back.grads["arr"], np.ndarray) and np.array_equal(back.grads["arr"], grads["arr"])
    assert back.grads["scalar"] == np.float32(2.5) and back.grads["pair"] == (1, [2.0, None], "x")
    assert isinstance(back.grads["odd"], isolate.Opaque) and "object" in back.grads["odd"].description


def test_a_reply_cannot_run_code_in_the_grader(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(WireError, match="not allowed"):
        isolate.from_wire(pickle.dumps(("ok", Evil())))
    with pytest.raises(WireError):
        isolate.from_wire(pickle.dumps({"__tensor__": ["float32", [10**6], b"", "cpu"]}))  # wrong size
    assert not marker.exists()


# --- one warm child ---------------------------------------------------------------------------------

def test_one_warm_child_serves_every_run_with_the_in_process_verdicts(tmp_path, problem):
    pids = tmp_path / "pids"
    source = EXAMPLE.read_text() + f"\nimport os\nopen({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
    impl = isolated(tmp_path, source)
    local = load_implementation(str(tmp_path / "student.py"), tmp_path)
    try:
        from hypothesis import given, settings

        from pytest_backprop.strategies import makemore_cases

        other_sizes = []

        @settings(max_examples=3, deadline=None, database=None, derandomize=True)
        @given(case=makemore_cases())
        def collect(case):
            other_sizes.append(case_problem(case))

        collect()
        for p in [problem, *other_sizes]:
            mine, theirs = verdicts_for_run("ex1", impl.run("ex1", p, 30), p), verdicts_for_run("ex1", local.run("ex1", p, 30), p)
            assert [(v.status, v.maxdiff) for v in mine] == [(v.status, v.maxdiff) for v in theirs]
            assert all(v.status == "pass" for v in mine)
        assert "isolated" in impl.description and impl.exercises() == ("ex1",)
    finally:
        impl.close()
    seen = pids.read_text().split()  # isolated, local, isolated, local, ...
    assert len(seen) == 8 and set(seen[1::2]) == {str(os.getpid())}
    assert len(set(seen[0::2])) == 1 and seen[0] != str(os.getpid())  # four runs, one child


def test_keyword_arguments_reach_the_childs_run(tmp_path, problem):
    """What independent grading passes (``substitute=...``) arrives unchanged at the child's ``run``:
    the isolated run does exactly what the in-process run does with the same arguments."""
    impl = isolated(tmp_path, EXAMPLE.read_text())
    local = load_implementation(str(tmp_path / "student.py"), tmp_path)
    kwargs = {"substitute": {"probs": problem.grads["probs"]}}
    try:
        remote = impl.run("ex1", problem, 30, **kwargs)
        try:
            here = local.run("ex1", problem, 30, **kwargs)
        except TypeError as exc:  # an implementation without that argument: the child's says the same
            assert "substitute" in str(exc)
            assert remote.error is not None and "substitute" in remote.error.message
        else:
            assert remote.grads.keys() == here.grads.keys()
            assert all(torch.equal(remote.grads[k], here.grads[k]) for k in here.grads)
        assert impl.run("ex1", problem, 30).error is None  # the child is still there
    finally:
        impl.close()


def test_os_exit_in_user_code_is_a_verdict(tmp_path, problem):
    impl = isolated(tmp_path, """
        import os
        dlogprobs = torch.zeros_like(logprobs)
        os._exit(3)
    """)
    try:
        run = impl.run("ex1", problem, 10)
    finally:
        impl.close()
    # os._exit raises SystemExit while user code runs: what was computed before it comes back
    assert run.error.type == "SystemExit" and "os._exit(3)" in run.error.message
    verdicts = verdicts_for_run("ex1", run, problem)
    assert verdicts[0].tensor == "logprobs" and verdicts[0].status == "fail"  # checked, not lost
    assert verdicts[1].status == "skip"  # dprobs is not written at all: not attempted
    assert any(w.code == "statement_error" and "os._exit(3)" in w.message for w in run.warnings)


def test_a_child_that_really_dies_is_replaced_then_given_up(tmp_path, problem):
    flag = tmp_path / "died-once"
    impl = isolated(tmp_path, EXAMPLE.read_text() + textwrap.dedent(f"""
        import os, posix, signal
        if not os.path.exists({str(flag)!r}):
            open({str(flag)!r}, "w").close()
            posix._exit(0)   # past the guard: the process really ends
    """))
    try:
        first = impl.run("ex1", problem, 10)
        assert first.error.type == "ProcessDied" and "exited with code 0" in first.error.message
        assert statuses(first, problem)["logprobs"] == "error"
        second = impl.run("ex1", problem, 10)  # a fresh child
        assert second.error is None and set(statuses(second, problem).values()) == {"pass"}
    finally:
        impl.close()
    always = isolated(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", name="always.py")
    try:
        runs = [always.run("ex1", problem, 10) for _ in range(isolate.MAX_DEATHS + 1)]
    finally:
        always.close()
    assert all("killed by signal 9" in r.error.message for r in runs[:-1])
    assert "not run again" in runs[-1].error.message


def test_monkeypatching_the_kit_or_torch_in_the_child_changes_no_verdict(tmp_path, problem):
    impl = isolated(tmp_path, """
        import torch
        import pytest_backprop.judge.compare as compare
        import pytest_backprop.judge.grade as grade
        torch.allclose = lambda *a, **k: True
        torch.testing.assert_close = lambda *a, **k: None
        torch.equal = lambda *a, **k: True
        torch.testing._comparison.TensorLikePair.compare = lambda self: None
        grade.verdicts_for_run = lambda *a, **k: []
        compare.compare = None
        dlogprobs = torch.zeros_like(logprobs)   # wrong
        dprobs = (1.0 / probs) * torch.ones_like(probs)   # wrong
    """)
    try:
        run = impl.run("ex1", problem, 10)
    finally:
        impl.close()
    found = statuses(run, problem)
    assert found["logprobs"] == "fail" and found["probs"] == "fail"
    assert torch.allclose(torch.zeros(1), torch.ones(1)) is False  # the grader's torch is untouched


def test_segfault_in_user_code_is_a_verdict(tmp_path, problem):
    impl = isolated(tmp_path, "import ctypes\ndlogprobs = torch.zeros_like(logprobs)\nctypes.string_at(0)\n")
    try:
        run = impl.run("ex1", problem, 10)
    finally:
        impl.close()
    assert run.error.type == "ProcessDied" and "signal" in run.error.message


def test_a_loop_that_ignores_the_time_limit_is_killed(tmp_path, problem, monkeypatch):
    monkeypatch.setattr(isolate, "RUN_GRACE", 1.0)
    impl = isolated(tmp_path, "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                              "dlogprobs = torch.zeros_like(logprobs)\nwhile True:\n    pass\n")
    try:
        start = time.monotonic()
        run = impl.run("ex1", problem, 1)
        assert time.monotonic() - start < 15
    finally:
        impl.close()
    assert run.error.timeout and "killed" in run.error.message
    assert statuses(run, problem)["logprobs"] == "error"  # its code "timeout"


def test_processes_the_code_spawns_end_with_its_run(tmp_path, problem):
    pids = tmp_path / "spawned"
    impl = isolated(tmp_path, EXAMPLE.read_text() + textwrap.dedent(f"""
        import os, subprocess
        detached = subprocess.Popen(["sleep", "300"], start_new_session=True)
        if os.fork() == 0:            # a daemon: fork, new session, fork again, parent gone
            os.setsid()
            if os.fork() == 0:
                open({str(pids)!r}, "a").write(f"{{os.getpid()}}\\n")
                import time
                time.sleep(300)
            os._exit(0)
        open({str(pids)!r}, "a").write(f"{{detached.pid}}\\n")
        import time
        time.sleep(0.5)
    """))
    try:
        run = impl.run("ex1", problem, 30)
        assert run.error is None and set(statuses(run, problem).values()) == {"pass"}
        spawned = [int(p) for p in pids.read_text().split()]
        assert len(spawned) == 2
        assert not any(alive(p) for p in spawned)
        assert impl._child.alive  # the child itself serves the next run
    finally:
        impl.close()


def test_close_all_ends_the_child(tmp_path, problem):
    impl = isolated(tmp_path, "dlogprobs = torch.zeros_like(logprobs)\n")
    pid = impl._child.proc.pid
    assert alive(pid)
    isolate.close_all()
    assert not alive(pid)
    assert impl.run("ex1", problem, 10).error is None  # a closed implementation starts a new child when used


def test_the_users_prints_go_to_the_running_tests_output(tmp_path, problem, capsys):
    impl = isolated(tmp_path, "print('hello from the student')\ndlogprobs = torch.zeros_like(logprobs)\n")
    try:
        impl.run("ex1", problem, 10)
    finally:
        impl.close()
    assert "hello from the student" in capsys.readouterr().out


def test_a_forged_reply_is_no_answer_and_runs_nothing(tmp_path, problem):
    marker = tmp_path / "ran-in-the-grader"
    impl = isolated(tmp_path, textwrap.dedent(f"""
        import os, pickle, struct
        def write_only_pipe(fd):
            try:
                flags = int(open(f"/proc/self/fdinfo/{{fd}}").read().split("flags:")[1].split()[0], 8)
                return os.readlink(f"/proc/self/fd/{{fd}}").startswith("pipe:") and flags & 3 == os.O_WRONLY
            except OSError:  # the descriptor listdir itself had open
                return False
        fd = next(int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2 and write_only_pipe(fd))  # the replies
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        data = pickle.dumps(("ok", Evil()))
        os.write(fd, struct.pack(">Q", len(data)) + data)
        dlogprobs = torch.zeros_like(logprobs)
    """))
    try:
        run = impl.run("ex1", problem, 10)
    finally:
        impl.close()
    assert not marker.exists()
    assert run.error.type == "ProcessDied" and "not an answer" in run.error.message


def test_load_errors_come_from_the_child(tmp_path):
    (tmp_path / "broken.py").write_text("dlogprobs = (\n")
    with pytest.raises(isolate.LoadError, match="was never closed"):
        IsolatedImplementation(str(tmp_path / "broken.py"), tmp_path, 30)


# --- a sandbox user -------------------------------------------------------------------------------

SANDBOX_DRIVER = """
import json, os, signal, sys
from pathlib import Path
from pytest_backprop.judge.grade import verdicts_for_run
from pytest_backprop.problems.instance import build_problem, resolve_words
from pytest_backprop.usercode import isolate

uid = int(sys.argv[1])
problem = build_problem(resolve_words(None))
impl = isolate.IsolatedImplementation("student.py", Path.cwd(), 60, user=uid)
run = impl.run("ex1", problem, 60)
impl.close()
print(json.dumps({"statuses": sorted({v.status for v in verdicts_for_run("ex1", run, problem)}),
                  "error": run.error.describe() if run.error else None}))
"""


def test_a_sandbox_user_cannot_touch_the_grader(sandbox_python):
    folder = world_readable_dir()
    secret = folder / "results.json"
    secret.write_text("the grader's")
    secret.chmod(0o644)
    uid = sandbox_uid()
    student = EXAMPLE.read_text() + textwrap.dedent(f"""
        import os, signal, subprocess
        outcomes = []
        try:
            open({str(secret)!r}, "w").write("forged")
        except OSError as exc:
            outcomes.append(type(exc).__name__)
        try:
            os.kill(int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[1]), signal.SIGKILL)
        except OSError as exc:
            outcomes.append(type(exc).__name__)
        escaped = subprocess.Popen(["sleep", "300"], start_new_session=True)
        open("spawned", "w").write(str(escaped.pid))
        print(outcomes)
    """)
    (folder / "student.py").write_text(student)
    (folder / "spawned").write_text("")
    for path in (folder / "student.py", folder / "spawned"):
        path.chmod(0o666)
    try:
        result = subprocess.run([str(sandbox_python), "-c", SANDBOX_DRIVER, str(uid)], cwd=folder,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        data = json.loads(result.stdout.strip().splitlines()[-1])
        assert data == {"statuses": ["pass"], "error": None}
        assert "['PermissionError', 'PermissionError']" in result.stdout  # its own prints, forwarded
        assert secret.read_text() == "the grader's"
        assert not uid_in_use(uid)  # the escaped sleep too: every process of the user is gone
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


# --- through pytest --------------------------------------------------------------------------------

def test_isolated_session_runs_properties_and_the_full_exercise_4_in_one_child(pytester, ex1_solution):
    pids = pytester.path / "pids"
    pytester.makepyfile(student=ex1_solution.read_text() + f"\nimport os\nopen({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n")
    pytester.makepyfile(test_mine="""
        def test_mine(backprop_student, makemore_forward):
            assert "probs" in backprop_student.gradients(makemore_forward, "probs")
    """)
    result = run_inprocess(pytester, "--backprop", "--backprop-impl=student.py", "--backprop-isolate",
                           "--backprop-examples=2", "--backprop-steps=4", "-p", "no:cacheprovider",
                           "-rs")
    outcomes = result.parseoutcomes()
    # nothing skipped but Exercises 2 and 3, which a script does not answer
    assert outcomes.get("failed", 0) == 0 and outcomes.get("skipped", 0) == 2, result.stdout.str()[-3000:]
    assert outcomes["passed"] == 26 + 1 + 1 + 1  # gradients, properties::ex1, ex4::sgd, test_mine
    result.stdout.fnmatch_lines(["*ex4*sgd*ok*", "*prop-ex1*ok*"])
    seen = pids.read_text().split()
    assert len(seen) >= 1 + 4 + 2 + 1 and len(set(seen)) == 1  # every run, one child


def test_isolated_session_survives_a_killed_child(pytester):
    pytester.makepyfile(student="import os, signal\ndlogprobs = torch.zeros_like(logprobs)\n"
                                "os.kill(os.getpid(), signal.SIGKILL)\n",
                        test_mine="def test_mine():\n    assert True\n")
    result = run_inprocess(pytester, "--backprop", "--backprop-impl=student.py", "--backprop-isolate",
                           "-k", "not properties and not ex4", "test_mine.py")
    result.stdout.fnmatch_lines(["*test_mine.py*", "*ProcessDied*"])
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 1 and outcomes["failed"] == 1 and outcomes["skipped"] == 27


def test_a_missing_file_is_reported_without_starting_a_child(pytester):
    result = run_inprocess(pytester, "--backprop", "--backprop-impl=missing.py", "--backprop-isolate",
                           "--backprop-examples=0", "--backprop-steps=0")
    result.stdout.fnmatch_lines(["*no such file: missing.py*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_an_answer_on_a_device_the_grader_lacks_is_judged_on_the_cpu():
    plain = {"__tensor__": ["float32", [2], torch.tensor([1.0, 2.0]).numpy().tobytes(), "cuda:7"]}
    back = isolate.from_plain(plain)
    assert back.device.type == ("cuda" if torch.cuda.device_count() > 7 else "cpu")
    assert torch.equal(back.cpu(), torch.tensor([1.0, 2.0]))


def test_a_child_without_a_user_is_forked_and_starts_as_a_fresh_one_would(tmp_path, problem, capsys):
    """No user: the child is forked from this process (torch already imported: no second import),
    then made what a fresh ``python -c`` child is: its own session, only its two pipes open besides
    the standard streams, torch's default seed, one thread."""
    from pytest_backprop.usercode import isolate

    torch.manual_seed(1)  # the grader's generator state must not leak into the child
    impl = isolated(tmp_path, """
        import os, sys, torch
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        same = open("/proc/self/cmdline", "rb").read() == open(f"/proc/{os.getppid()}/cmdline", "rb").read()
        print("FACTS", os.getppid(), os.getsid(0) == os.getpid(), len(fds), torch.initial_seed(),
              torch.get_num_threads(), sys.stdout.fileno(), same)
        dlogprobs = torch.zeros_like(logprobs)
    """)
    forked = isinstance(impl._child.proc, isolate._Forked)  # (not if this worker has started threads)
    try:
        run = impl.run("ex1", problem, 10)
    finally:
        impl.close()
    assert run.error is None
    facts = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("FACTS")).split()
    assert isolate.FORK
    # the parent is this process; 0, 1, 2, the two pipes and the one listdir opens; a fork runs pytest's command line
    assert facts[1:] == [str(os.getpid()), "True", "6", str(67280421310721), "1", "1", str(forked)]


def test_a_process_with_new_threads_starts_a_fresh_interpreter():
    """Forking is only done from a grader that started no thread since it imported torch."""
    code = textwrap.dedent("""
        import threading, time
        from pytest_backprop.usercode import isolate
        before = isolate.can_fork()
        threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
        print(before, isolate.can_fork())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_a_forked_child_never_runs_an_inherited_thread_pool(tmp_path, problem, monkeypatch):
    """The grader's OpenMP threads have run; the child is forked anyway (as when the kit is imported
    late, in a notebook kernel); the user's code asks for two threads and does a large parallel
    operation: a forked child stays on one thread, so it answers instead of hanging."""
    from pytest_backprop.usercode import isolate

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        big = torch.randn(1500, 1500)
        (big @ big).sum(), big.exp().sum()  # the pool runs here
        monkeypatch.setattr(isolate, "_THREADS_AT_IMPORT", 1 << 20)  # fork whatever threads exist
        impl = isolated(tmp_path, EXAMPLE.read_text() + textwrap.dedent("""
            torch.set_num_threads(2)
            y = torch.randn(1500, 1500)
            z = (y @ y).sum() + y.exp().sum()
            print("THREADS", torch.get_num_threads())
        """))
        try:
            run = impl.run("ex1", problem, 30)
        finally:
            impl.close()
    finally:
        torch.set_num_threads(before)
    assert run.error is None and set(statuses(run, problem).values()) == {"pass"}


def test_a_grader_without_standard_input_still_gets_its_answers_and_prints(tmp_path):
    """With fd 0 closed the child's log or a pipe takes it; such a child is started fresh, not forked
    (a fork would replace that descriptor with its own standard input)."""
    student = tmp_path / "student.py"
    student.write_text(EXAMPLE.read_text() + "\nprint('HELLO FROM THE STUDENT')\n")
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        os.close(0)
        from pytest_backprop.problems.instance import build_problem, resolve_words
        from pytest_backprop.usercode.isolate import IsolatedImplementation
        problem = build_problem(resolve_words(None))
        impl = IsolatedImplementation({str(student)!r}, Path({str(tmp_path)!r}), 60)
        try:
            run = impl.run("ex1", problem, 60)
        finally:
            impl.close()
        print("ANSWERS", run.error, len(run.grads))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "ANSWERS None 26" in out.stdout and "HELLO FROM THE STUDENT" in out.stdout, out.stdout + out.stderr
