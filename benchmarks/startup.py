"""P1 and P2: what the plugin costs a pytest run (medians of interleaved runs, ratios within this run).

- P1: the plugin installed but off: a trivial suite with and without ``-p no:backprop``.
  Target: ratio <= 1.02, and torch never imported (checked in the run itself).
- P2: ``pytest --backprop`` on a correct Exercise 1 script (``examples/ex1_solution.py``) at default
  settings (all checks: 26 gradients, Exercises 2-3, hypothesis properties, Exercise 4's 50 SGD
  steps) vs ``python -c "import torch, hypothesis, pytest"``. Target: <= 1.5x. Also prints how many
  times the user's code ran in the session, by kind (``pytest_backprop.usercode.run.RUNS``).

    python benchmarks/startup.py [--rounds 9] [--impl examples/ex1_solution.py] [--pycache-prefix]

``--pycache-prefix``: let Python write bytecode to a temporary folder. Where PYTHONDONTWRITEBYTECODE
is set (as in this sandbox), pytest cannot cache its assertion-rewritten copies of plugin modules,
and hypothesis's own pytest plugin imports all of hypothesis (74 modules) through the rewriter in
every run -- about 1.5 s that a normal installation pays only once. Both modes are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

TRIVIAL = '''
import pytest

@pytest.mark.parametrize("i", range(100))
def test_trivial(i):
    assert i + 1 > i
'''
CONFTEST = '''
import os, sys

def pytest_unconfigure(config):
    with open(os.environ["BACKPROP_BENCH_MODULES"], "w") as f:
        f.write("torch" if "torch" in sys.modules else "no torch")
'''
RUNS_CONFTEST = '''
import json, os, sys

def pytest_unconfigure(config):
    run = sys.modules.get("pytest_backprop.usercode.run")
    with open(os.environ["BACKPROP_BENCH_RUNS"], "w") as f:
        json.dump(dict(run.RUNS) if run else {}, f)
'''


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user+sys of the child) seconds of one run; raises if it fails."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if proc.returncode not in (0, 1):  # 1: some test failed -- still a timing; >1: usage error or crash
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    if proc.returncode == 1:
        print(f"  note: {' '.join(cmd[-3:])}: some tests failed ({proc.stdout.strip().splitlines()[-1]})")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def compare(label: str, variants: dict[str, list[str]], cwd: Path, env: dict[str, str], rounds: int,
            base: str) -> dict[str, tuple[float, float]]:
    for cmd in variants.values():  # warm-up (file caches, bytecode)
        timed(cmd, cwd, env)
    walls: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants.items())
        for name, cmd in (order if r % 2 == 0 else order[::-1]):  # alternate: no order bias
            w, c = timed(cmd, cwd, env)
            walls[name].append(w)
            cpus[name].append(c)
    print(f"\n{label} ({rounds} interleaved rounds, medians)")
    out = {}
    for name in variants:
        ratio_w = median([a / b for a, b in zip(walls[name], walls[base])])
        ratio_c = median([a / b for a, b in zip(cpus[name], cpus[base])])
        out[name] = (ratio_w, ratio_c)
        print(f"  {name:38s} wall {median(walls[name]):6.2f} s  cpu {median(cpus[name]):6.2f} s   "
              f"x{ratio_w:.3f} wall, x{ratio_c:.3f} cpu of {base!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--impl", default=str(REPO / "examples" / "ex1_solution.py"),
                    help="implementation for P2 (default: the example Exercise 1 script)")
    ap.add_argument("--pycache-prefix", action="store_true", help="let bytecode be cached in a temporary folder")
    ap.add_argument("--only", choices=("p1", "p2"))
    args = ap.parse_args(argv)
    env = dict(os.environ)
    env.pop("CI", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.pycache_prefix:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
        print(f"python {sys.version.split()[0]}; PYTHONDONTWRITEBYTECODE={env.get('PYTHONDONTWRITEBYTECODE', '')!r}; "
              f"bytecode cache: {'temporary prefix' if args.pycache_prefix else 'as the environment says'}")
        pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        if args.only in (None, "p1"):
            suite = tmp_path / "suite"
            suite.mkdir()
            (suite / "test_trivial.py").write_text(TRIVIAL)
            (suite / "conftest.py").write_text(CONFTEST)
            marker = tmp_path / "modules.txt"
            env["BACKPROP_BENCH_MODULES"] = str(marker)
            res = compare("P1: trivial suite (100 tests), plugin installed but off", {
                "pytest -p no:backprop": pytest_cmd + ["-p", "no:backprop"],
                "pytest (plugin loaded, --backprop off)": pytest_cmd,
            }, suite, env, args.rounds, base="pytest -p no:backprop")
            timed(pytest_cmd, suite, env)
            imported = marker.read_text()
            print(f"  torch imported with the plugin loaded and off: {imported == 'torch'}")
            ok = res["pytest (plugin loaded, --backprop off)"][0] <= 1.02 and imported != "torch"
            print(f"  P1 {'MET' if ok else 'NOT MET'} (target ratio <= 1.02, torch not imported)")
        if args.only in (None, "p2"):
            empty = tmp_path / "empty"
            empty.mkdir()
            (empty / "conftest.py").write_text(RUNS_CONFTEST)
            runs_file = tmp_path / "runs.json"
            env["BACKPROP_BENCH_RUNS"] = str(runs_file)
            env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
            res = compare(f"P2: pytest --backprop --backprop-impl={args.impl}", {
                "python -c 'import torch, hypothesis, pytest'": [sys.executable, "-c", "import torch, hypothesis, pytest"],
                "pytest --backprop": pytest_cmd + ["--backprop", f"--backprop-impl={args.impl}"],
            }, empty, env, args.rounds, base="python -c 'import torch, hypothesis, pytest'")
            runs = json.loads(runs_file.read_text())
            print(f"  the user's code ran {sum(runs.values())} times in one session: "
                  + ", ".join(f"{kind} {count}" for kind, count in sorted(runs.items())))
            r = res["pytest --backprop"][0]
            print(f"  P2 {'MET' if r <= 1.5 else 'NOT MET'} (target <= 1.5x wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
