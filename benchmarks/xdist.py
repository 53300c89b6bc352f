"""P8: ``pytest -n 2 --backprop`` (pytest-xdist) vs serial, on a correct Exercise 1 script at default
settings (medians of interleaved runs, ratios within this run). Target: -n 2 never slower (<= 1.0x).
Also measured: the floor, ``-n 2`` on two empty tests with workers that import torch and hypothesis
as the kit's do (and a controller that does not): what xdist costs before any check runs.

    python benchmarks/xdist.py [--rounds 7] [--impl examples/ex1_solution.py] [--pycache-prefix]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import REPO, compare  # noqa: E402


FLOOR_CONFTEST = """
import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # as the kit's workers: torch and hypothesis; the controller none
    import hypothesis  # noqa: F401
    import torch  # noqa: F401
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--impl", default=str(REPO / "examples" / "ex1_solution.py"))
    ap.add_argument("--workers", default="2")
    ap.add_argument("--pycache-prefix", action="store_true", help="let bytecode be cached in a temporary folder")
    args = ap.parse_args(argv)
    env = dict(os.environ)
    env.pop("CI", None)
    with tempfile.TemporaryDirectory() as tmp:
        if args.pycache_prefix:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--backprop", f"--backprop-impl={args.impl}"]
        floor = Path(tmp) / "floor"  # xdist's own cost: workers that import torch and run two empty tests
        floor.mkdir()
        (floor / "conftest.py").write_text(FLOOR_CONFTEST)
        (floor / "test_empty.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
        res = compare(f"P8: pytest --backprop --backprop-impl={args.impl}, serial vs -n {args.workers}", {
            "serial": cmd,
            f"-n {args.workers}": cmd + ["-n", args.workers],
            f"floor: -n {args.workers}, no checks": [*cmd[:6], "-p", "no:backprop", f"--rootdir={floor}", str(floor),
                                                     "-n", args.workers],
        }, Path(tmp), env, args.rounds, base="serial")
        ratio = res[f"-n {args.workers}"][0]
        print(f"  P8 {'MET' if ratio <= 1.0 else 'NOT MET'} (target: -n {args.workers} <= 1.0x serial wall); the floor is "
              f"what xdist costs with workers that import torch and check nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
