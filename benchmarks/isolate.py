"""P7: what ``--backprop-isolate`` (one warm child process per submission) costs.

- child start: to the first answer, forked from the grader (no user) and as a fresh interpreter
  (what ``--backprop-isolate-user`` starts);
- per run: one Exercise 1 run of the reference script on the lecture's problem, in-process vs
  through the warm child (sending the problem, running, sending the 26 answers back), 1 thread;
- per session: the example homework graded with a correct answer (26 gradients, the 50 steps of
  Exercise 4, the instructor's five tests with 15 hypothesis examples: ~90 runs of the student's
  code), ``pytest --backprop`` vs ``pytest --backprop --backprop-isolate``, wall and CPU time
  (the child's CPU included).

    python benchmarks/isolate.py [--rounds 5] [--number 50] [--sessions 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, median, ratio_of_medians  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOLUTION = REPO / "examples" / "ex1_solution.py"


def per_run(rounds: int, number: int) -> None:
    from pytest_backprop.problems.device import single_thread
    from pytest_backprop.problems.instance import build_problem, resolve_words
    from pytest_backprop.usercode.isolate import IsolatedImplementation
    from pytest_backprop.usercode.loaders import load_implementation

    from pytest_backprop.usercode import isolate

    problem = build_problem(resolve_words(None))
    starts = {}
    for how, fork in (("a fresh interpreter (--backprop-isolate-user)", False), ("forked (no user)", True)):
        isolate.FORK = fork
        start = time.perf_counter()
        isolated = IsolatedImplementation(str(SOLUTION), REPO, 60)
        isolated.run("ex1", problem, 60)  # the first answer: the child is ready
        starts[how] = time.perf_counter() - start
        if not fork:
            isolated.close()
    local = load_implementation(str(SOLUTION), REPO)
    try:
        with single_thread():
            times = interleaved({"in-process": lambda: local.run("ex1", problem, 60),
                                 "warm child": lambda: isolated.run("ex1", problem, 60)},
                                rounds=rounds, number=number, warmup=5)
    finally:
        isolated.close()
    for how, seconds in starts.items():
        print(f"child start to its first answer, {how}: {seconds:.2f} s")
    for name, values in times.items():
        print(f"one Exercise 1 run, {name:10s}: {median(values) * 1e3:6.2f} ms (median of {rounds} x {number})")
    print(f"warm child / in-process: x{ratio_of_medians(times, 'warm child', 'in-process'):.2f} per run")


def per_session(sessions: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="backprop-bench-"))
    try:
        shutil.copytree(REPO / "examples" / "homework", folder, dirs_exist_ok=True)
        shutil.copy(SOLUTION, folder / "homework.py")
        base = [sys.executable, "-m", "pytest", "--backprop", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0"]
        variants = {"in-process": base, "--backprop-isolate": [*base, "--backprop-isolate"]}
        walls: dict[str, list[float]] = {k: [] for k in variants}
        cpus: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(sessions):
            order = list(variants.items())
            for name, cmd in (order if r % 2 == 0 else order[::-1]):
                before = os.times()
                start = time.perf_counter()
                proc = subprocess.run(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                walls[name].append(time.perf_counter() - start)
                after = os.times()
                cpus[name].append(after.children_user - before.children_user
                                  + after.children_system - before.children_system)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}")
        for name in variants:
            print(f"homework session, {name:18s}: {median(walls[name]):6.2f} s wall, {median(cpus[name]):6.2f} s CPU "
                  f"(medians of {sessions})")
        print(f"--backprop-isolate / in-process: x{median(walls['--backprop-isolate']) / median(walls['in-process']):.2f}"
              f" wall, x{median(cpus['--backprop-isolate']) / median(cpus['in-process']):.2f} CPU")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=3)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    per_run(args.rounds, args.number)
    per_session(args.sessions)


if __name__ == "__main__":
    main()
