"""P5: building the lecture's problem -- truths, tolerances and (float64) the noise floor -- in this
tree and, with ``--against DIR``, in another checkout of the project (e.g. the commit before the
forward pass was derived from its source), so the two can be compared on the same machine.

Each tree is timed in its own subprocess; the trees alternate round by round (medians over rounds,
ratios within this run). Per tree:

- ``import``: ``import pytest_backprop.problems.instance`` after torch, the standard-library
  modules pytest itself imports (ast, inspect, dataclasses, traceback, ...) and the lecture's data
  and parameters: where the derived tree parses the lecture's forward and derives its table (one
  run of it, which also pays torch's first-call costs that a hand-written table pays at the first build);
- ``import+build``: the same and the first float32 build: what a ``pytest --backprop`` run pays once;
- ``float32``: ``problem_from_batch(..., dtype=float32)`` at the lecture's sizes (float32 and float64
  truths, tolerances), what every ``pytest --backprop`` run builds once;
- ``float64``: the same with ``dtype=float64`` (adds the float32 truth and the noise floor);
- ``noise floor``: the noise floor alone, from a float64 problem's values and gradients.

Everything runs on one thread, as the kit builds problems (``single_thread``). Times are CPU
seconds of the process (``time.process_time``: waiting for a core on a shared machine does not
count). Each variant's number is the median of ``--number`` calls in a round, then the median over
rounds; ``min`` columns give the fastest round. ``--pycache-prefix``: let Python cache bytecode in a
temporary folder (where PYTHONDONTWRITEBYTECODE is set, every import compiles its modules again,
which a normal installation does once; see benchmarks/startup.py).

    python benchmarks/problem_build.py [--rounds 9] [--number 20] [--against DIR] [--pycache-prefix]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(number: int) -> dict[str, float]:
    """Seconds per call of each variant in the tree on ``sys.path[0]``."""
    import ast, dataclasses, importlib.util, linecache, textwrap, traceback  # noqa: E401, F401 -- pytest's own
    import torch

    from reference_model.data import build_splits, load_words
    from reference_model.model import Config, lecture_params_and_batch

    torch.set_num_threads(1)
    config = Config()
    dataset = build_splits(load_words(None))
    params, Xb, Yb = lecture_params_and_batch(dataset.Xtr, dataset.Ytr, config)
    start = time.process_time()
    from pytest_backprop.problems import instance, noise  # timed: the import and the first build are a variant
    imported = time.process_time() - start
    instance.problem_from_batch(config, params, Xb, Yb, dtype=torch.float32)
    first = time.process_time() - start
    p64 = instance.problem_from_batch(config, params, Xb, Yb, dtype=torch.float64)
    table_first = "table" in inspect.signature(noise.noise_floor).parameters
    if table_first:
        def floor():
            return noise.noise_floor(p64.spec.table, p64.truth64.values, p64.truth64.grads)
    else:
        def floor():
            return noise.noise_floor(p64.truth64.values, p64.truth64.grads)

    variants = {
        "float32": lambda: instance.problem_from_batch(config, params, Xb, Yb, dtype=torch.float32),
        "float64": lambda: instance.problem_from_batch(config, params, Xb, Yb, dtype=torch.float64),
        "noise floor": floor,
    }
    result = {"import": imported, "import+build": first}
    for name, fn in variants.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(number):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        result[name] = statistics.median(times)
    return result


def run_tree(tree: Path, number: int, pycache: Path | None) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    code = (f"import sys; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(REPO / 'benchmarks')!r}); "
            f"import json, problem_build; print(json.dumps(problem_build.child({number})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree}: the child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--number", type=int, default=20, help="timed calls per variant and round")
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--pycache-prefix", action="store_true", help="let bytecode be cached in a temporary folder")
    args = parser.parse_args()
    trees = {"this tree": REPO}
    if args.against:
        trees["against"] = args.against.resolve()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        pycache = Path(tmp) if args.pycache_prefix else None
        if pycache is not None:
            for tree in trees.values():
                run_tree(tree, 1, pycache)  # writes the bytecode once
        for r in range(args.rounds):
            order = list(trees.items())
            for name, tree in (order if r % 2 == 0 else order[::-1]):
                results[name].append(run_tree(tree, args.number, pycache))
    variants = list(next(iter(results.values()))[0])
    print(f"CPU ms per call, {args.rounds} rounds of {args.number} calls (import: once per process); "
          f"bytecode cache: {'temporary prefix' if args.pycache_prefix else 'as the environment says'}")
    columns = [f"{name} {stat}" for name in trees for stat in ("median", "min")]
    print(f"{'':14}" + "".join(f"{c:>20}" for c in columns) + ("   ratio (median, min)" if args.against else ""))
    for v in variants:
        row = f"{v:14}"
        for runs in results.values():
            values = [run[v] * 1e3 for run in runs]
            row += f"{statistics.median(values):20.2f}{min(values):20.2f}"
        if args.against:
            ratios = [a[v] / b[v] for a, b in zip(results["this tree"], results["against"])]
            best = min(run[v] for run in results["this tree"]) / min(run[v] for run in results["against"])
            row += f"   {statistics.median(ratios):.3f}, {best:.3f}"
        print(row)


if __name__ == "__main__":
    main()
