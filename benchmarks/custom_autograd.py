"""check_backward against the tools an engineer would pick instead, on the suite of buggy custom
Functions (each with its corrected twin) and correct controls in tests/custom_functions.py.

Each tool is used the way its docs suggest, once per seed (3 seeds):

- ``check_backward``: ``@given(<the kit's strategies, default value mix>)`` + ``check_backward(fn, *x,
  reference=...)`` (finite differences where the case has no reference);
- ``gradcheck``: ``torch.autograd.gradcheck(fn, x)`` on fixed seeded float64 inputs;
- ``assert_close``: forward and ``out.sum().backward()`` gradients vs the plain-torch version, with
  ``torch.testing.assert_close``, on the same fixed inputs;
- ``pytest-torch``: ``pytest_torch.assert_gradcheck(fn, x)`` on the same fixed inputs;
- ``hypothesis-torch``: ``@given(hypothesis_torch.tensor_strategy(float64, <the fixed shapes>,
  elements=floats(-100, 100), layout=torch.strided))`` (its default layout includes sparse ones) + forward ``assert_close`` vs the plain-torch version + gradcheck.

The last two only when installed (``pip install pytest-torch hypothesis-torch``); otherwise they are
skipped and the output says so. Hypothesis runs ``EXAMPLES`` examples without shrinking, for every
hypothesis-based tool alike. Prints, per tool: bugs found (in every seed / in at least one),
false alarms (correct Functions failed in any seed), and seconds; then the time of one call on the
fixed inputs (check_backward vs gradcheck), median over the suite.

    python benchmarks/custom_autograd.py [--examples 30] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import hypothesis.strategies as st  # noqa: E402
import torch  # noqa: E402
from custom_functions import CASES, Case  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from pytest_backprop import check_backward  # noqa: E402


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, report_multiple_bugs=False,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def _fails(run: Callable[[], None]) -> bool:
    try:
        run()
    except Exception:  # noqa: BLE001 -- any failure (AssertionError, GradcheckError, a crash) is a finding
        return True
    return False


def _leaves(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x.detach().clone().requires_grad_(True) for x in inputs)


def kit(case: Case, s: int, examples: int) -> bool:
    @seed(s)
    @_settings(examples)
    @given(case.inputs)
    def prop(inputs):
        check_backward(case.fn, *inputs, reference=case.reference)

    return _fails(prop)


def gradcheck(case: Case, s: int, examples: int) -> bool:
    return _fails(lambda: torch.autograd.gradcheck(case.fn, _leaves(case.fixed(seed=s))))


def sum_backward(case: Case, s: int, examples: int) -> bool:
    def run() -> None:
        x, y = _leaves(case.fixed(seed=s)), _leaves(case.fixed(seed=s))
        out, want = case.fn(*x), case.plain(*y)
        torch.testing.assert_close(out, want)
        out.sum().backward()
        want.sum().backward()
        for a, b in zip(x, y):
            torch.testing.assert_close(a.grad, b.grad)

    return _fails(run)


def pytest_torch(case: Case, s: int, examples: int) -> bool:
    from pytest_torch import assert_gradcheck

    return _fails(lambda: assert_gradcheck(case.fn, case.fixed(seed=s)))


def hypothesis_torch(case: Case, s: int, examples: int) -> bool:
    import hypothesis_torch as ht

    shapes = [tuple(x.shape) for x in case.fixed()]
    strategy = st.tuples(*(ht.tensor_strategy(torch.float64, shape, elements=st.floats(-100, 100), layout=torch.strided)
                           for shape in shapes))

    @seed(s)
    @_settings(examples)
    @given(strategy)
    def prop(inputs):
        torch.testing.assert_close(case.fn(*inputs), case.plain(*inputs))
        torch.autograd.gradcheck(case.fn, _leaves(inputs))

    return _fails(prop)


TOOLS: dict[str, tuple[Callable[[Case, int, int], bool], str | None]] = {
    "check_backward": (kit, None),
    "gradcheck (fixed inputs)": (gradcheck, None),
    "assert_close, out.sum().backward()": (sum_backward, None),
    "pytest-torch assert_gradcheck": (pytest_torch, "pytest_torch"),
    "hypothesis-torch + gradcheck": (hypothesis_torch, "hypothesis_torch"),
}


def _installed(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def per_call_seconds(rounds: int = 5) -> tuple[float, float]:
    """Median over the correct cases of one call on the fixed inputs: check_backward and gradcheck."""
    mine, theirs = [], []
    for case in (c for c in CASES if not c.buggy):
        inputs = case.fixed()
        for out, run in ((mine, lambda: check_backward(case.fn, *inputs, reference=case.reference)),
                         (theirs, lambda: torch.autograd.gradcheck(case.fn, _leaves(inputs)))):
            _fails(run)  # warm up
            start = time.perf_counter()
            for _ in range(rounds):
                _fails(run)
            out.append((time.perf_counter() - start) / rounds)
    return statistics.median(mine), statistics.median(theirs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=30, help="hypothesis examples per seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tools", nargs="*", help="run only the tools whose name starts with one of these")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # every tool alike: tiny tensors, a shared machine
    bugs = [c for c in CASES if c.buggy]
    correct = [c for c in CASES if not c.buggy]
    print(f"suite: {len(bugs)} buggy Functions (each with a corrected twin), {len(correct) - len(bugs)} more correct "
          f"controls; {args.seeds} seeds, {args.examples} hypothesis examples per seed")
    print(f"{'tool':38s} {'bugs found (all/any seed)':>26s} {'false alarms':>13s} {'seconds':>8s}")
    missed: dict[str, list[str]] = {}
    for name, (tool, module) in TOOLS.items():
        if args.tools and not any(name.startswith(t) for t in args.tools):
            continue
        if not _installed(module):
            print(f"{name:38s} skipped: {module} is not installed")
            continue
        start = time.perf_counter()
        found_all = found_any = alarms = 0
        missed[name] = []
        for case in CASES:
            failed = [tool(case, s, args.examples) for s in range(args.seeds)]
            if case.buggy:
                found_all += all(failed)
                found_any += any(failed)
                if not all(failed):
                    missed[name].append(case.name.replace(" (bug)", ""))
            else:
                alarms += any(failed)
        seconds = time.perf_counter() - start
        print(f"{name:38s} {f'{found_all}/{len(bugs)} / {found_any}/{len(bugs)}':>26s} "
              f"{f'{alarms}/{len(correct)}':>13s} {seconds:8.1f}")
    for name, cases in missed.items():
        print(f"  {name} misses: {', '.join(cases) or 'none'}")
    mine, theirs = per_call_seconds()
    print(f"one call on fixed inputs, median over the {len(correct)} correct Functions: check_backward "
          f"{mine * 1e3:.1f} ms, gradcheck {theirs * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
