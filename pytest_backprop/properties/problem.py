"""Property checks derived from any problem's spec (``--backprop-problem``): the user's backward on
sizes hypothesis draws from the problem's ``SIZE_RANGES``, inputs from its ``make_inputs``.

The lecture's property checks (:mod:`~pytest_backprop.properties.checks`) know its network
(parameter regimes, broadcasting patterns, Exercises 2 and 3); these know only what a problem file
says, so they work for every problem:

- :func:`spec_whole_backward` (``backprop::properties::ex1``): the whole backward at generated sizes
  and seeds, every gradient against autograd in float64;
- :func:`spec_line_property` (``backprop::properties::lines::<output>``): one ``backward_<output>``
  function against autograd's VJP of its line, with a random upstream gradient.

Hypothesis shrinks a failing case towards the smallest sizes of the ranges, so a size written into
the code (``8`` for ``n``) is reported at the simplest sizes that show it.

Example::

    spec = load_spec("examples/problems/two_layer_relu.py")
    fns = line_functions(module, spec)
    spec_line_property(fns["z2"], spec, "z2", search=Search(examples=5)).status   # 'pass'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from hypothesis import strategies as st

from ..judge.grade import verdicts_for_run
from ..problems.instance import Problem, problem_from_spec
from ..problems.spec import ProblemSpec
from ..verdict import Verdict
from .checks import DTYPE, PropertyFailed, Search, _bad, _failed, _passed, _passes_with_floor, run_search


@dataclass(frozen=True)
class SpecCase:
    """A generated case of a problem: its sizes, the seed of ``make_inputs``'s generator, and the
    seed of a per-line check's random upstream gradient."""

    sizes: Mapping[str, int]
    seed: int
    upstream_seed: int = 0

    def describe(self) -> str:
        """``n=1, d=1, h=1, c=2 (inputs seed 0)``."""
        return ", ".join(f"{k}={v}" for k, v in self.sizes.items()) + f" (inputs seed {self.seed})"

    def __repr__(self) -> str:
        return f"SpecCase({self.describe()}, upstream seed {self.upstream_seed})"


def spec_cases(spec: ProblemSpec) -> st.SearchStrategy[SpecCase]:
    """Cases for ``spec``: every size drawn from its range (shrinking to the low end), two seeds.

    Example::

        @given(spec_cases(spec))
        def test(case): problem_from_spec(spec, case.sizes, seed=case.seed)
    """
    sizes = st.fixed_dictionaries({name: st.integers(*spec.size_ranges[name]) for name in spec.sizes})
    return st.builds(SpecCase, sizes, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))


def case_problem(spec: ProblemSpec, case: SpecCase) -> Problem:
    """The float64 problem (truth and tolerances) of a generated case."""
    return problem_from_spec(spec, dict(case.sizes), seed=case.seed, dtype=DTYPE)


def case_values(spec: ProblemSpec, case: SpecCase) -> dict[str, Any]:
    """Every forward value of a case in float64 (detached), with the constants."""
    inputs = spec.inputs(dict(case.sizes), seed=case.seed)
    inputs = {k: (v.detach().to(DTYPE) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in inputs.items()}
    with torch.no_grad():
        return spec.run(inputs)


def spec_whole_backward(implementation: Any, spec: ProblemSpec, *, search: Search,
                        ignore: frozenset[str] = frozenset()) -> Verdict:
    """The whole backward (Exercise 1) of ``implementation`` on generated cases of ``spec``;
    gradients in ``ignore`` (those already failing at the default sizes) are left to their own items.

    Example::

        spec_whole_backward(impl, spec, search=Search(examples=6)).diagnosis.code   # 'ok'
    """
    label = "prop-ex1"

    def test(case: SpecCase) -> None:
        problem = case_problem(spec, case)
        run = implementation.run("ex1", problem, search.timeout)
        bad = _bad([v for v in verdicts_for_run("ex1", run, problem) if v.tensor not in ignore])
        if bad is not None:
            raise PropertyFailed(case, bad)

    failure, notes = run_search(test, spec_cases(spec), search)
    if failure is None:
        return _passed(label, "all", f"every gradient of {spec.name} matches autograd on generated sizes", search)
    case, inner = failure.case, failure.verdict
    message = f"fails at {case.describe()} (smallest case found): {inner.diagnosis.message}"
    return _failed(label, inner, case, message, inner.diagnosis.code, search, notes, {"sizes": dict(case.sizes)})


def spec_line_property(fn: Callable[..., Any], spec: ProblemSpec, output: str, *, search: Search) -> Verdict:
    """One ``backward_<output>`` function of a problem against autograd's VJP of its line, on
    generated cases with a standard-normal upstream gradient.

    Example::

        spec_line_property(fns["a1"], spec, "a1", search=Search(examples=5)).status   # 'pass'
    """
    from ..judge.lines import check_line

    line = spec.line_of[output]
    label = "prop-lines"

    def test(case: SpecCase) -> None:
        check = check_line(fn, line, case_values(spec, case), seed=case.upstream_seed, timeout=search.timeout)
        if not (check.passed or _passes_with_floor(check)):
            raise PropertyFailed(case, check.verdict(label))

    failure, notes = run_search(test, spec_cases(spec), search)
    if failure is None:
        return _passed(label, output, f"backward_{output} matches autograd's VJP on generated sizes", search,
                       line=line.source)
    case, inner = failure.case, failure.verdict
    message = (f"fails at {case.describe()} (smallest case found), random upstream d{output}: "
               f"{inner.diagnosis.message}")
    return _failed(label, inner, case, message, inner.diagnosis.code, search, notes, {"sizes": dict(case.sizes)})
