"""Property checks: the user's backward on sizes, values and broadcasting patterns hypothesis picks.

A backward that passes at the lecture's sizes can still be wrong: a hard-coded 32, 27 or 10, a sum
over the wrong dim that works for square shapes, a keepdim that only matters when a size is 1.
Each property runs the user's code on generated cases (float64), compares every answer with
autograd, and on failure reports the smallest failing case hypothesis shrinks to. When the lecture's
sizes pass, the cause of a generated failure is measured before it is named
(:func:`explain_failure`, :mod:`pytest_backprop.properties.explain`).

- :func:`whole_backward`: Exercise 1 (or any exercise) through ``implementation.run``;
- :func:`line_property`: one ``backward_<output>`` function with random upstream gradients;
- :func:`cross_entropy_property` (Exercise 2, extreme logits) and :func:`batchnorm_property`
  (Exercise 3, down to n = 2).

Each returns a :class:`~pytest_backprop.verdict.Verdict` (exercise ``prop-ex1``, ``prop-lines``, ...).
The test items ``backprop::properties::...`` that ``--backprop`` collects live in
:mod:`pytest_backprop.items.properties`.

Example::

    impl = load_implementation("reference_model.backward", Path("."))
    verdict = whole_backward(impl, examples=10)
    verdict.status, verdict.diagnosis.message      # ('pass', ...)
"""

from __future__ import annotations

import functools
import gc
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Mapping

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, seed, settings

from reference_model.model import Config

from ..judge.compare import compare
from ..judge.grade import first_wrong, verdicts_for_run
from ..problems.instance import Problem, problem_from_batch
from ..problems.lecture import LINE_OF, LINES, Line, Truth, forward_expanded, run_line
from ..problems.noise import EPS64, FLOAT64_SLACK
from ..problems.tolerance import Reference, attach, derive
from ..usercode.scan import function_span, spans_for
from ..verdict import ERROR, FAIL, PASS, SKIP, Diagnosis, Verdict
from .explain import default_dtype, describe_config, explain_failure
from .strategies import (
    LECTURE_PATTERN,
    Case,
    describe_pattern,
    elements,
    makemore_cases,
    param_patterns,
    tensors,
)

#: Properties run in float64: rounding never decides a verdict on a generated case.
DTYPE = torch.float64
#: Default number of generated examples per property (``--backprop-examples``).
DEFAULT_EXAMPLES = 6
#: Parameter regimes the whole-backward property draws from (shrinks towards the first).
PARAM_REGIMES = ("lecture", "small", "saturated", "large_logits")
#: Lines whose inputs include a parameter with a broadcasting pattern (the broadcast tier's per-line items).
BROADCAST_LINES = ("hprebn", "hpreact", "logits")


class PropertyFailed(AssertionError):
    """Raised inside a property for a failing case; hypothesis shrinks it and re-raises the minimal one."""

    def __init__(self, case: Any, verdict: Verdict):
        super().__init__(f"{verdict.tensor}: {verdict.diagnosis.code}")
        self.case, self.verdict = case, verdict


@dataclass
class Search:
    """How a property searches: number of examples, seed (None: derandomized), timeout per run of user code."""

    examples: int = DEFAULT_EXAMPLES
    seed: int | None = None
    timeout: float | None = 60.0
    derandomize: bool = field(default_factory=lambda: bool(os.environ.get("CI")))

    def __post_init__(self) -> None:
        if self.seed is None and not self.derandomize:
            self.seed = random.getrandbits(32)

    def settings(self) -> settings:
        """Hypothesis settings: no deadline (first torch calls are slow), no database, blob printed."""
        return settings(max_examples=max(1, self.examples), deadline=None, database=None, print_blob=True,
                        derandomize=self.derandomize, phases=(Phase.explicit, Phase.generate, Phase.shrink),
                        suppress_health_check=list(HealthCheck))

    def reproduce(self) -> str:
        """How to get the same examples again."""
        if self.derandomize:
            return "examples derandomized (CI is set): every run tries the same cases"
        return f"hypothesis seed {self.seed}: rerun with --hypothesis-seed={self.seed} to get the same cases"


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: on tiny tensors the thread pool costs ~10x the work (measured).

    Example::

        with single_thread():
            problem = case_problem(case)
    """
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


def run_search(test: Callable[..., None], strategy: st.SearchStrategy[Any], search: Search,
               explicit: tuple[Any, ...] = ()) -> tuple[PropertyFailed | None, str]:
    """Run ``test`` under ``@given(strategy)`` (after the ``explicit`` examples); return the minimal
    :class:`PropertyFailed` (or None) and hypothesis's notes (``@reproduce_failure`` blob).

    Hypothesis tries the simplest case first (n=2, vocabulary 2, one unit everywhere), so sizes
    written into the code are found on the first example. Other exceptions (health checks, a bug
    of the kit) propagate.

    Example::

        failure, notes = run_search(lambda case: check(case), makemore_cases(), Search(examples=5))
    """
    wrapped = given(strategy)(test)
    for value in reversed(explicit):
        wrapped = example(value)(wrapped)
    wrapped = search.settings()(wrapped)
    if search.seed is not None and not search.derandomize:
        wrapped = seed(search.seed)(wrapped)
    # hypothesis's first run calls gc.collect(): ~0.2 s over torch's objects, unless they are frozen
    freeze = gc.get_freeze_count() == 0  # (someone else's freeze is left alone)
    if freeze:
        gc.freeze()
    try:
        with single_thread():
            wrapped()
    except PropertyFailed as exc:
        blobs = [n.strip() for n in getattr(exc, "__notes__", []) if "@reproduce_failure(" in n]
        notes = "".join(f"hypothesis blob: {b[b.index('@reproduce_failure('):].split(')')[0]})" for b in blobs[:1])
        return exc, notes
    finally:
        if freeze:
            gc.unfreeze()
    return None, ""


# --- verdicts ------------------------------------------------------------------------------------

def _passed(exercise: str, tensor: str, what: str, search: Search, *, line: str | None = None) -> Verdict:
    """The verdict of a property that found no failing case."""
    return Verdict(exercise, tensor, PASS, None, True, None, (), None,
                   Diagnosis("ok", f"{what}: no failing case in {search.examples} generated examples"), line=line,
                   details={"examples": search.examples, "seed": search.seed})


def skipped(exercise: str, tensor: str, message: str) -> Verdict:
    """A property that could not run (nothing to check).

    Example::

        skipped("prop-lines", "h", "no backward_h() found").status   # 'skip'
    """
    return Verdict(exercise, tensor, SKIP, None, None, None, (), None, Diagnosis("missing", message))


def _failed(exercise: str, inner: Verdict, case: Any, message: str, code: str, search: Search, notes: str,
           extra: Mapping[str, Any] | None = None) -> Verdict:
    """The verdict of a property with a failing case: the inner gradient's verdict, re-labelled."""
    details = {"case": repr(case), "gradient": inner.tensor, "inner_code": inner.diagnosis.code,
               "inner_message": inner.diagnosis.message, "seed": search.seed, "reproduce": search.reproduce()}
    if notes:
        details["hypothesis"] = notes
    details.update(extra or {})
    status = ERROR if inner.status == ERROR and code == inner.diagnosis.code else FAIL
    return Verdict(exercise, inner.tensor, status, inner.exact, False, inner.maxdiff, inner.expected_shape,
                   inner.actual_shape, Diagnosis(code, message), atol=inner.atol, mismatched=inner.mismatched,
                   numel=inner.numel, worst_index=inner.worst_index, line=inner.line, details=details)


# --- whole backward ------------------------------------------------------------------------------

def case_problem(case: Case) -> Problem:
    """The float64 problem (truth + tolerances) of a generated case.

    In float64, :func:`~pytest_backprop.problem.problem_from_batch` widens each tolerance to the
    larger of the rule's times :data:`~pytest_backprop.noise.FLOAT64_SLACK` and the float64 noise
    floor of :func:`~pytest_backprop.noise.noise_floor` (see there for why).

    Example::

        problem = case_problem(case)
        implementation.run("ex1", problem, timeout=10)
    """
    return problem_from_batch(case.config, case.params, case.Xb, case.Yb, dtype=DTYPE)


def _absmax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _bad(verdicts: list[Verdict]) -> Verdict | None:
    wrong = first_wrong(verdicts)
    if wrong is not None:
        return wrong
    return next((v for v in verdicts if v.status in (FAIL, ERROR)), None)


def _run_case(implementation: Any, exercise: str, case: Case, timeout: float | None,
              ignore: frozenset[str] = frozenset(), *, float64_default: bool = False) -> Verdict | None:
    """The first wrong verdict of one case (None: all right); ``float64_default`` runs the user's code
    with torch's default dtype float64, so the tensors it creates follow the case's precision."""
    problem = case_problem(case)
    if float64_default:
        with default_dtype(DTYPE):
            run = implementation.run(exercise, problem, timeout)
    else:
        run = implementation.run(exercise, problem, timeout)
    return _bad([v for v in verdicts_for_run(exercise, run, problem) if v.tensor not in ignore])


def _fixed_case(config: Config, pattern: Mapping[str, str] | None = None) -> Case:
    """A case at given sizes with the lecture's initialisation and a seeded batch (no hypothesis)."""
    from reference_model.model import params_only

    from .strategies import apply_pattern

    params = {k: v.to(DTYPE) for k, v in params_only(config).items()}
    g = torch.Generator().manual_seed(config.seed)
    Xb = torch.randint(0, config.vocab_size, (config.batch_size, config.block_size), generator=g)
    Yb = torch.randint(0, config.vocab_size, (config.batch_size,), generator=g)
    return Case(config, apply_pattern(params, pattern or LECTURE_PATTERN), Xb, Yb, dict(pattern or LECTURE_PATTERN))


def whole_backward(implementation: Any, exercise: str = "ex1", *, search: Search | None = None,
                   examples: int | None = None, broadcast: bool = False, lecture: Config | None = None,
                   lecture_passed: bool = False, lecture_failures: Collection[str] | None = None,
                   label: str | None = None, configs: st.SearchStrategy[Config] | None = None) -> Verdict:
    """Run ``implementation`` on generated cases; a :class:`Verdict` for the whole backward.

    ``lecture_passed`` says the lecture's problem passes (the ``backprop::ex1`` items): then a
    generated failure gets its cause measured (:func:`explain_failure`: ``precision``,
    ``hardcoded_shape`` with the literal quoted, ``size_one``, ``size_specific``). ``lecture_failures``
    names the gradients that already fail at the lecture's sizes: they are left to their own items
    (not counted twice) and the rest is treated as passing there. With ``broadcast`` the
    parameters also come in every :func:`~pytest_backprop.strategies.param_patterns` pattern, and a
    failure names the pattern that broke the gradient.

    Example::

        v = whole_backward(load_implementation("student.py", Path(".")), examples=10, lecture_passed=True)
        v.diagnosis.message   # 'passes at n=32, fails at n=2: 32 is written into your code: `...` (student.py:8); ...'
    """
    search = search or Search(examples=examples if examples is not None else DEFAULT_EXAMPLES)
    lecture = lecture or Config()
    label = label or ("bcast-" + exercise if broadcast else "prop-" + exercise)
    timeout = search.timeout
    ignore = frozenset(lecture_failures or ())
    if lecture_failures is not None:
        lecture_passed = True
        from ..judge.grade import EXERCISE_TENSORS

        if set(EXERCISE_TENSORS.get(exercise, ())) <= ignore:
            return skipped(label, "all", "every gradient already fails at the lecture's sizes: fix those first")
    strategy = _whole_cases(broadcast) if configs is None else makemore_cases(
        configs, patterns=param_patterns() if broadcast else None, regimes=st.sampled_from(PARAM_REGIMES))

    def test(case: Case) -> None:
        bad = _run_case(implementation, exercise, case, timeout, ignore)
        if bad is not None:
            raise PropertyFailed(case, bad)

    failure, notes = run_search(test, strategy, search)
    if failure is None:
        what = "every gradient matches autograd on generated sizes" + (" and broadcasting patterns" if broadcast else "")
        return _passed(label, "all", what, search)
    case, inner = failure.case, failure.verdict
    where = f"fails at {case.describe()}"
    message = f"{where} (smallest case found): d{inner.tensor} [{inner.diagnosis.code}] {inner.diagnosis.message}"
    code = inner.diagnosis.code
    extra: dict[str, Any] = {"config": describe_config(case.config)}
    with single_thread():
        if broadcast and case.pattern != LECTURE_PATTERN:
            plain = Case(case.config, _reshape_like_lecture(case.params), case.Xb, case.Yb, dict(LECTURE_PATTERN), case.regime)
            if _run_case(implementation, exercise, plain, timeout, ignore) is None:
                code = "broadcast"
                message = (f"with parameters {describe_pattern(case.pattern)} (a correct forward pass too), "
                           f"d{inner.tensor} is wrong: {inner.diagnosis.message} (at {describe_config(case.config)}); "
                           "reduce the gradient to its parameter's shape, e.g. g.sum_to_size(p.shape)")
                extra["pattern"] = describe_pattern(case.pattern)
                return _failed(label, inner, case, message, code, search, notes, extra)
        if lecture_passed:
            return _explain_whole(implementation, exercise, case, inner, lecture, timeout, ignore, label, search,
                                  notes, extra)
    return _failed(label, inner, case, message, code, search, notes, extra)


def _explain_whole(implementation: Any, exercise: str, case: Case, inner: Verdict, lecture: Config,
                   timeout: float | None, ignore: frozenset[str], label: str, search: Search, notes: str,
                   extra: dict[str, Any]) -> Verdict:
    """The verdict of a generated failure of a whole exercise that passes at the lecture's sizes."""
    spans, context = spans_for(implementation, exercise)

    def bad_at(config: Config, float64_default: bool) -> Verdict | None:
        return _run_case(implementation, exercise, _fixed_case(config, case.pattern), timeout, ignore,
                         float64_default=float64_default)

    e = explain_failure(inner, f"d{inner.tensor}", lecture, case.config, spans, context,
                        lambda f64: _run_case(implementation, exercise, case, timeout, ignore, float64_default=f64),
                        bad_at)
    shown = _fixed_case(lecture, case.pattern) if e.at_lecture else case
    return _failed(label, e.inner, shown, e.message, e.code, search, notes, {**extra, **e.extra})


@functools.lru_cache(maxsize=None)
def _whole_cases(broadcast: bool) -> st.SearchStrategy[Case]:
    return makemore_cases(patterns=param_patterns() if broadcast else None, regimes=st.sampled_from(PARAM_REGIMES))


def _reshape_like_lecture(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from .strategies import apply_pattern

    return apply_pattern(params, LECTURE_PATTERN)


# --- per-line ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LineCase:
    """A generated case for one line: forward values (float64) and the seed of the random upstream."""

    case: Case
    upstream_seed: int

    def __repr__(self) -> str:
        return f"LineCase({self.case!r}, upstream seed {self.upstream_seed})"


def case_values(case: Case) -> dict[str, Any]:
    """Every forward value of a case (float64, detached), with n, Xb, Yb.

    Example::

        case_values(case)["logits"].shape   # (n, vocab_size)
    """
    with torch.no_grad():
        values = forward_expanded({k: v.to(DTYPE) for k, v in case.params.items()}, case.Xb, case.Yb)
    return values


@functools.lru_cache(maxsize=None)
def line_cases(*, broadcast: bool = False) -> st.SearchStrategy[LineCase]:
    """Cases for per-line properties: a generated network and batch, and an upstream-gradient seed.

    Example::

        @given(line_cases())
        def test_line(lc): check_line(fn, LINE_OF["h"], case_values(lc.case), seed=lc.upstream_seed)
    """
    cases = makemore_cases(patterns=param_patterns() if broadcast else None,
                           regimes=st.sampled_from(PARAM_REGIMES))
    return st.builds(LineCase, cases, st.integers(0, 2**31 - 1))


def _check_line(fn: Callable[..., Any], line: Line, lc: LineCase, timeout: float | None) -> Verdict | None:
    from ..judge.lines import check_line

    check = check_line(fn, line, case_values(lc.case), seed=lc.upstream_seed, timeout=timeout)
    return None if check.passed or _passes_with_floor(check) else check.verdict("prop-lines")


def _passes_with_floor(check: Any) -> bool:
    """Whether a line check that failed the rule passes with the float64 floor of :func:`case_problem`
    (``FLOAT64_SLACK`` ulps of the contribution's and the upstream gradient's scale)."""
    if check.error is not None or check.missing or set(check.answers) != set(check.line.inputs):
        return False
    for name in check.line.inputs:
        first = check.comparisons.get(name)
        if first is None or first.problem is not None or first.nonfinite:
            return False
        if check.diagnoses[name].code == "ok":
            continue
        floor = FLOAT64_SLACK * EPS64 * max(_absmax(first.truth), _absmax(check.upstream))
        if not compare(check.answers[name], check.expected[name], atol=max(floor, first.tolerance.atol)).approximate:
            return False
    return True


def line_property(fn: Callable[..., Any], output: str, *, search: Search | None = None, examples: int | None = None,
                  broadcast: bool = False, lecture_values: Mapping[str, Any] | None = None,
                  lecture: Config | None = None) -> Verdict:
    """Check one ``backward_<output>`` function on generated sizes with random upstream gradients.

    The upstream gradient is standard normal (never ones: a missing multiplication by it must fail).
    ``lecture_values`` (the lecture problem's forward values) lets a size-only failure be reported as
    ``hardcoded_shape``.

    Example::

        v = line_property(backward_lines.backward_probs, "probs", examples=5)
        v.status   # 'pass'
    """
    from ..judge.lines import check_line

    search = search or Search(examples=examples if examples is not None else DEFAULT_EXAMPLES)
    line = LINE_OF[output]
    label = "bcast-lines" if broadcast else "prop-lines"
    timeout = search.timeout

    def test(lc: LineCase) -> None:
        bad = _check_line(fn, line, lc, timeout)
        if bad is not None:
            raise PropertyFailed(lc, bad)

    failure, notes = run_search(test, line_cases(broadcast=broadcast), search)
    if failure is None:
        return _passed(label, output, f"backward_{output} matches autograd's VJP on generated sizes"
                      + (" and broadcasting patterns" if broadcast else ""), search, line=line.source)
    lc, inner = failure.case, failure.verdict
    case = lc.case
    code, extra = inner.diagnosis.code, {"config": describe_config(case.config)}
    message = f"fails at {case.describe()} (smallest case found), random upstream d{output}: {inner.diagnosis.message}"
    with single_thread():
        if broadcast and case.pattern != LECTURE_PATTERN:
            plain = LineCase(Case(case.config, _reshape_like_lecture(case.params), case.Xb, case.Yb,
                                  dict(LECTURE_PATTERN), case.regime), lc.upstream_seed)
            if _check_line(fn, line, plain, timeout) is None:
                code = "broadcast"
                message = (f"with parameters {describe_pattern(case.pattern)}, backward_{output} is wrong: "
                           f"{inner.diagnosis.message}; reduce each gradient to its input's shape "
                           "(e.g. g.sum_to_size(p.shape))")
                extra["pattern"] = describe_pattern(case.pattern)
                return _failed(label, inner, lc, message, code, search, notes, extra)
        if lecture_values is not None and lecture is not None and check_line(
                fn, line, lecture_values, seed=lc.upstream_seed, timeout=timeout).passed:
            typed = _float64_default(fn)

            def bad_at(config: Config, float64_default: bool) -> Verdict | None:
                at = LineCase(_fixed_case(config, case.pattern), lc.upstream_seed)
                return _check_line(typed if float64_default else fn, line, at, timeout)

            e = explain_failure(inner, f"backward_{output}", lecture, case.config, function_span(fn), [],
                                lambda f64: _check_line(typed if f64 else fn, line, lc, timeout), bad_at)
            shown = LineCase(_fixed_case(lecture, case.pattern), lc.upstream_seed) if e.at_lecture else lc
            return _failed(label, e.inner, shown, e.message, e.code, search, notes, {**extra, **e.extra})
    return _failed(label, inner, lc, message, code, search, notes, extra)


def _float64_default(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with torch's default dtype float64 (same signature, so arguments are injected alike)."""

    @functools.wraps(fn)
    def typed(*args: Any, **kwargs: Any) -> Any:
        with default_dtype(DTYPE):
            return fn(*args, **kwargs)

    return typed


# --- Exercises 2 and 3 ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LogitsCase:
    """Logits (float64) and targets for the cross-entropy property."""

    logits: torch.Tensor
    Yb: torch.Tensor
    regime: str

    def __repr__(self) -> str:
        n, v = self.logits.shape
        return (f"LogitsCase(n={n}, vocab_size={v}, {self.regime} logits, max |logit| "
                f"{float(self.logits.abs().max()):.4g}; logits={self.logits.tolist()}, Yb={self.Yb.tolist()})")


@functools.lru_cache(maxsize=None)
def logits_cases(regimes: tuple[str, ...] = ("lecture", "large_logits", "extreme")) -> st.SearchStrategy[LogitsCase]:
    """(n, V) logits in a value regime (n >= 2, V >= 2; shapes from ``array_shapes``) and valid targets.

    Example::

        @given(logits_cases(("extreme",)))
        def test_ce(lc): cross_entropy_problem(lc).grads["logits"]
    """
    @st.composite
    def build(draw: Any) -> LogitsCase:
        shape = draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=8))
        regime = draw(st.sampled_from(regimes))
        logits = draw(tensors(shape, elements=elements(regime)))
        Yb = draw(tensors((shape[0],), dtype=torch.int64, elements=st.integers(0, shape[1] - 1)))
        return LogitsCase(logits, Yb, regime)

    return build()


def cross_entropy_problem(lc: LogitsCase) -> Problem:
    """A problem holding only what Exercise 2 reads (logits, Yb, n) and the true dlogits.

    The truth is autograd of ``F.cross_entropy`` in float64 (stable at any logit), its tolerance the
    rule's (float32 autograd vs float64).

    Example::

        p = cross_entropy_problem(LogitsCase(logits, Yb, "extreme"))
        implementation.run("ex2", p, timeout=10)
    """
    def grad(dtype: torch.dtype) -> torch.Tensor:
        x = lc.logits.detach().clone().to(dtype).requires_grad_(True)
        with torch.enable_grad():
            F.cross_entropy(x, lc.Yb).backward()
        return x.grad.detach()

    g64, g32 = grad(DTYPE), grad(torch.float32)
    tolerance = derive(g32, g64, DTYPE)
    attach(g64, Reference(g64, tolerance))
    n, vocab = lc.logits.shape
    values: dict[str, Any] = {"logits": lc.logits.clone(), "Yb": lc.Yb, "n": n, "Xb": torch.zeros((n, 1), dtype=torch.long)}
    with torch.no_grad():  # the lines after logits too (a notebook's Exercise 2 cell compares with `loss`)
        for line in LINES[LINES.index(LINE_OF["logit_maxes"]):]:
            run_line(line, values)
    values["logits"].grad = g64
    truth = Truth(DTYPE, values, {"logits": g64}, float(F.cross_entropy(lc.logits, lc.Yb)))
    config = Config(vocab_size=vocab, batch_size=n, block_size=1)
    return Problem(config, DTYPE, None, {}, values["Xb"], lc.Yb, truth, truth, {"logits": tolerance})


def cross_entropy_property(implementation: Any, *, search: Search | None = None, examples: int | None = None,
                           lecture_passed: bool = False) -> Verdict:
    """Exercise 2 on generated sizes and logits up to +-1000 (a naive exp/sum overflows: ``nonfinite``).

    Example::

        cross_entropy_property(load_implementation("reference_model.backward", Path("."))).status   # 'pass'
    """
    search = search or Search(examples=examples if examples is not None else DEFAULT_EXAMPLES)

    def check(lc: LogitsCase, float64_default: bool = False) -> Verdict | None:
        problem = cross_entropy_problem(lc)
        with default_dtype(DTYPE if float64_default else torch.get_default_dtype()):
            run = implementation.run("ex2", problem, search.timeout)
        return _bad(verdicts_for_run("ex2", run, problem))

    def test(lc: LogitsCase) -> None:
        bad = check(lc)
        if bad is not None:
            raise PropertyFailed(lc, bad)

    # Always try one overflowing case: exp(710) is inf even in float64.
    overflow = LogitsCase(torch.tensor([[710.0, 0.0], [0.0, 1.0]], dtype=DTYPE), torch.tensor([0, 1]), "extreme")
    failure, notes = run_search(test, logits_cases(), search, explicit=(overflow,))
    if failure is None:
        return _passed("prop-ex2", "logits", "dlogits matches autograd for generated sizes and extreme logits", search)
    lc, inner = failure.case, failure.verdict
    n, vocab = lc.logits.shape
    code = inner.diagnosis.code
    big = float(lc.logits.abs().max())
    message = f"fails at n={n}, vocab_size={vocab}, max |logit| {big:.4g} (smallest case found): {inner.diagnosis.message}"
    extra: dict[str, Any] = {}
    if code == "nonfinite":
        message += ("; exp() of a large logit overflows: subtract each row's max first "
                    "(or use F.softmax), as the forward pass does")
    elif lecture_passed:
        with single_thread():
            tame = check(LogitsCase(lc.logits.clamp(-5, 5), lc.Yb, "lecture")) if lc.regime != "lecture" else inner
            if tame is None:
                code = "overflow"
                message += f"; it passes when the logits are small, so look at what large logits (|x| up to {big:.4g}) do"
            else:
                lecture = Config()
                spans, context = spans_for(implementation, "ex2")
                e = explain_failure(inner, "dlogits", lecture, lecture.with_(batch_size=n, vocab_size=vocab), spans,
                                    context, lambda f64: check(lc, f64),
                                    lambda c, f64: check(_plain_logits(c.batch_size, c.vocab_size), f64))
                if e.at_lecture:
                    lc = _plain_logits(lecture.batch_size, lecture.vocab_size)
                inner, code, message, extra = e.inner, e.code, e.message, e.extra
    return _failed("prop-ex2", inner, lc, message, code, search, notes, extra)


def _plain_logits(n: int, vocab: int) -> LogitsCase:
    """Seeded lecture-sized logits (standard normal, float64) at given sizes, for probing sizes alone."""
    g = torch.Generator().manual_seed(n * 1009 + vocab)
    logits = torch.randn((n, vocab), generator=g, dtype=DTYPE)
    return LogitsCase(logits, torch.randint(0, vocab, (n,), generator=g), "lecture")


def batchnorm_property(implementation: Any, *, search: Search | None = None, examples: int | None = None,
                       lecture: Config | None = None, lecture_passed: bool = False) -> Verdict:
    """Exercise 3 (dhprebn in one go) on generated sizes down to n = 2 (Bessel's n-1 matters most there).

    Example::

        batchnorm_property(load_implementation("reference_model.backward", Path("."))).status   # 'pass'
    """
    search = search or Search(examples=examples if examples is not None else DEFAULT_EXAMPLES)
    verdict = whole_backward(implementation, "ex3", search=search, lecture=lecture, lecture_passed=lecture_passed,
                             label="prop-ex3")
    if verdict.status == PASS:
        return _passed("prop-ex3", "hprebn", "dhprebn matches autograd on generated sizes down to n=2", search)
    return verdict


__all__ = [
    "DEFAULT_EXAMPLES", "DTYPE", "PropertyFailed", "Search", "batchnorm_property", "case_problem", "case_values",
    "cross_entropy_problem", "cross_entropy_property", "line_cases", "line_property", "logits_cases",
    "whole_backward",
]
