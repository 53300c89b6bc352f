"""Why a generated case fails when the lecture's passes: measured, then named.

A property check that passes at the lecture's sizes and fails at a generated one has found code that
depends on something the lecture's problem holds fixed. Each explanation below is checked before it
is given:

- ``precision``: the failing case passes when the user's code runs with torch's default dtype set
  to the case's float64 (:func:`default_dtype`), so the code creates float32 tensors
  (``torch.tensor(1.0 / n)``, ``torch.where`` with Python numbers, ``torch.zeros(...)`` without
  ``dtype=``); the calls that do so are quoted from the source;
- ``hardcoded_shape``: changing one size alone (:func:`size_findings`) breaks it, and that size's
  number is written into the user's source (:func:`~pytest_backprop.usercode.scan.find_numbers`):
  the statements and their locations are quoted;
- ``size_one``: it fails only when that size is 1 (probed at several values): a dimension of size
  1 is dropped (bare ``.squeeze()`` calls are quoted);
- ``size_specific``: a size breaks it but its number is not in the source: the message says at
  which values it fails and passes (odd n, n not a power of two, ...).

Example::

    findings = size_findings(Config(), Config(batch_size=3), lambda c: c.batch_size % 2 == 1)
    findings[0].pattern   # 'odd'
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from reference_model.model import Config

from ..usercode.base import SourceSpan
from ..usercode.scan import Found, bare_squeezes, find_numbers, float32_makers
from ..verdict import Verdict

#: (Config field, how messages name it), in the order sizes are blamed.
SIZE_NAMES = (("batch_size", "n"), ("vocab_size", "vocab_size"), ("n_embd", "n_embd"), ("n_hidden", "n_hidden"),
              ("block_size", "block_size"))
#: The values each size is probed at (besides the lecture's and the failing one): small, odd and
#: even, powers of two and not.
PROBES = {"batch_size": (2, 3, 4, 5, 6, 7, 8, 16), "vocab_size": (2, 3, 4, 5, 8)}
DEFAULT_PROBES = (1, 2, 3, 4, 5, 8)
#: How many quoted statements a message shows (the JSON details list them all).
SHOWN = 3


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Run with torch's default dtype set to ``dtype`` (what ``torch.zeros((2, 3))`` creates).

    Example::

        with default_dtype(torch.float64):
            torch.tensor(1.0 / 3).dtype   # torch.float64
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def label_of(attr: str) -> str:
    """``n`` for ``batch_size``; other sizes keep their name."""
    return dict(SIZE_NAMES)[attr]


def _power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _values(values: Iterable[int]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class SizeFinding:
    """One size that, changed alone from the lecture's value, breaks the check; and at which of
    the probed values it fails and passes (the lecture's value passes)."""

    attr: str
    lecture: int
    failing: tuple[int, ...]
    passing: tuple[int, ...]

    @property
    def label(self) -> str:
        return label_of(self.attr)

    @property
    def pattern(self) -> str:
        """``size_one``, ``odd``, ``not_power_of_two``, ``all`` (every probed value fails) or ``some``."""
        failing, passing = set(self.failing), set(self.passing)
        if failing == {1}:
            return "size_one"
        if all(v % 2 for v in failing) and not any(v % 2 for v in passing):
            return "odd"
        if not any(_power_of_two(v) for v in failing) and all(_power_of_two(v) for v in passing):
            return "not_power_of_two"
        if passing == {self.lecture}:
            return "all"
        return "some"

    def describe(self) -> str:
        """``fails at n=3, 5, 7; passes at n=2, 4, 8, 32``."""
        fails = _values(self.failing)
        passes = _values(sorted(self.passing))
        return f"fails at {self.label}={fails}; passes at {self.label}={passes}"


def size_findings(lecture: Config, failing: Config, fails_at: Callable[[Config], bool], *,
                  attrs: Iterable[str] | None = None) -> list[SizeFinding]:
    """Every size that alone breaks the check (changed from the lecture's value to the failing
    case's), each probed at :data:`PROBES`.

    Example::

        [f.attr for f in size_findings(Config(), Config(batch_size=2, vocab_size=3), lambda c: c.vocab_size != 27)]
        # ['vocab_size']
    """
    wanted = set(attrs) if attrs is not None else {a for a, _ in SIZE_NAMES}
    findings = []
    for attr, _ in SIZE_NAMES:
        old, new = getattr(lecture, attr), getattr(failing, attr)
        if attr not in wanted or old == new or not fails_at(lecture.with_(**{attr: new})):
            continue
        probes = sorted({v for v in PROBES.get(attr, DEFAULT_PROBES) if v != old} | {new})
        fails = tuple(v for v in probes if v == new or fails_at(lecture.with_(**{attr: v})))
        passes = tuple(v for v in probes if v not in fails) + (old,)
        findings.append(SizeFinding(attr, old, fails, passes))
    return findings


def size_literals(attr: str, lecture: Config) -> dict[float, str]:
    """The numbers that stand for a size in code, with what each is: ``{32: "32", 31: "31 (n-1)"}``.

    Example::

        size_literals("n_embd", Config())   # {10: '10', 30: '30 (n_embd*block_size)'}
    """
    value = getattr(lecture, attr)
    out = {float(value): str(value)}
    if attr == "batch_size" and value > 2:
        out.setdefault(float(value - 1), f"{value - 1} (n-1)")
    if attr in ("n_embd", "block_size"):
        both = lecture.n_embd * lecture.block_size
        out.setdefault(float(both), f"{both} (n_embd*block_size)")
    return out


def quote(found: list[Found]) -> str:
    """The first :data:`SHOWN` lines hit as ```line` (file:line)`` (each line once), and how many more.

    Example::

        quote(find_numbers(spans, {32}))   # '`dlogprobs[range(n), Yb] = -1.0 / 32` (student.py:8)'
    """
    lines = list(dict.fromkeys(f.describe() for f in found))
    more = f" and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
    return "; ".join(lines[:SHOWN]) + more


def _locations(found: list[Found]) -> list[dict[str, Any]]:
    return [{"value": f.value, "location": f.location.describe(), "source": f.location.source} for f in found]


def _written(spans: list[SourceSpan], context: list[SourceSpan], attrs: list[str],
             lecture: Config) -> tuple[str, list[Found]] | None:
    """``32 and 27 are written into your code: `...` (file:line); use n, ...`` and the hits, for the
    numbers of the sizes ``attrs`` found in the source; None when none is there."""
    named: dict[float, str] = {}
    for attr in attrs:
        for value, text in size_literals(attr, lecture).items():
            named.setdefault(value, text)
    found = find_numbers(spans, named, context=context) if named else []
    if not found:
        return None
    values = [named[float(v)] for v in dict.fromkeys(float(f.value) for f in found)]
    what = values[0] + " is" if len(values) == 1 else ", ".join(values[:-1]) + f" and {values[-1]} are"
    return (f"{what} written into your code: {quote(found)}; use n, x.shape[...] or *_like(...) instead of the "
            "number"), found


def _head(findings: list[SizeFinding], failing: Config) -> str:
    return "; ".join(f"passes at {f.label}={f.lecture}, fails at {f.label}={getattr(failing, f.attr)}" for f in findings)


def explain_sizes(findings: list[SizeFinding], lecture: Config, failing: Config, spans: list[SourceSpan],
                  context: list[SourceSpan], detail: str) -> tuple[str, str, dict[str, Any]]:
    """(code, message, details) for a failure that one or more sizes cause (see the module docstring).

    ``detail`` (the failing gradient's own hint) ends the message in parentheses.

    Example::

        code, message, extra = explain_sizes(findings, Config(), case.config, impl.source_spans(), [], "(dlogprobs: ...)")
        code, message   # ('hardcoded_shape', 'passes at n=32, fails at n=2: 32 is written into your code: `...` (student.py:8); ...')
    """
    extra: dict[str, Any] = {"size": findings[0].attr, "sizes": {f.attr: {"fails_at": list(f.failing),
                                                                          "passes_at": list(f.passing)}
                                                                 for f in findings}}
    ones = [f for f in findings if f.pattern == "size_one"]
    if ones and len(ones) == len(findings):
        squeezes = bare_squeezes(spans)
        where = (f": your code calls `.squeeze()` without a dimension, which drops every size-1 dimension: "
                 f"{quote(squeezes)}; squeeze only the dimension you mean (`.squeeze(0)`) or keep it "
                 "(keepdim=True)") if squeezes else (": look for what treats a size-1 dimension differently "
                                                     "(`.squeeze()`, indexing with [0], broadcasting)")
        if squeezes:
            extra["found"] = _locations(squeezes)
        sizes = "; ".join(f"passes at {f.label}={_values(sorted(f.passing, key=lambda v: v == f.lecture))}, fails only at "
                          f"{f.label}=1" for f in ones)
        return "size_one", f"{sizes}{where} {detail}", extra
    written = _written(spans, context, [f.attr for f in findings if f.pattern in ("all", "some")], lecture)
    if written is not None:
        text, found = written
        extra["found"] = _locations(found)
        return "hardcoded_shape", f"{_head(findings, failing)}: {text} {detail}", extra
    parts = []
    for f in findings:
        if f.pattern == "odd":
            why = f"it fails whenever {f.label} is odd"
        elif f.pattern == "not_power_of_two":
            why = (f"it fails whenever {f.label} is not a power of two: something is exact in binary only then "
                   "(1/n rounded, in float32 or a rounded constant?)")
        elif f.pattern == "all":
            why = (f"it fails at every {f.label} tried but {f.lecture}, yet {f.lecture} is not written into your code "
                   "as a number: is it computed from other numbers, or read from a tensor of the wrong size?")
        elif f.pattern == "size_one":
            why = f"it fails only at {f.label}=1"
        else:
            why = f"it depends on {f.label}"
        parts.append(f"{why} ({f.describe()})")
    return "size_specific", f"{_head(findings, failing)}: {'; '.join(parts)} {detail}", extra


def explain_combined(lecture: Config, failing: Config, spans: list[SourceSpan], context: list[SourceSpan],
                     detail: str) -> tuple[str, str, dict[str, Any]]:
    """(code, message, details) when no single size breaks it alone but the sizes together do.

    Example::

        explain_combined(Config(), Config(batch_size=3, vocab_size=3), spans, [], "(dprobs: ...)")[0]   # 'size_specific'
    """
    changed = [attr for attr, _ in SIZE_NAMES if getattr(lecture, attr) != getattr(failing, attr)]
    sizes = lambda config: ", ".join(f"{label_of(a)}={getattr(config, a)}" for a in changed)  # noqa: E731
    head = (f"passes at the lecture's sizes ({sizes(lecture)}), fails at {sizes(failing)}, though no one of these "
            "sizes breaks it when changed alone")
    written = _written(spans, context, changed, lecture)
    if written is not None:
        text, found = written
        return "hardcoded_shape", f"{head}: {text} {detail}", {"found": _locations(found)}
    return "size_specific", (f"{head}: it depends on several sizes together (square shapes, n == vocab_size?) "
                             f"{detail}"), {}


def explain_float32(spans: list[SourceSpan], inner: Any, subject: str, *,
                    powers_of_two: SizeFinding | None = None) -> tuple[str, dict[str, Any]]:
    """The ``precision`` message for a case that passes once new tensors default to float64, and details.

    ``inner`` is the failing verdict, ``subject`` what it is about (``dlogprobs``); ``powers_of_two``
    a batch-size finding with the ``not_power_of_two`` pattern, when the probe found one (then the
    message says why the lecture's n=32 could not show it).

    Example::

        message, extra = explain_float32(impl.source_spans(), inner, "dhprebn")
        message   # 'your code creates float32 tensors whatever the inputs' dtype: `...` (student.py:30); ...'
    """
    makers = float32_makers(spans)
    extra: dict[str, Any] = {"float32": True}
    where = ""
    if makers:
        extra["found"] = _locations(makers)
        where = f": {quote(makers)}"
    if inner.diagnosis.code == "type":
        effect = f"in a float64 run {subject} comes out float32"
    else:
        effect = f"in a float64 run {subject} is wrong: [{inner.diagnosis.code}] {inner.diagnosis.message}"
    message = (f"your code creates float32 tensors whatever the inputs' dtype{where}; {effect}. The same case passes "
               "when new tensors default to float64 (checked), so create them with dtype=x.dtype or *_like(...)")
    if powers_of_two is not None:
        f = powers_of_two
        extra["sizes"] = {f.attr: {"fails_at": list(f.failing), "passes_at": list(f.passing)}}
        message += (f". It {f.describe()}: numbers like 1/n are exact in float32 only when n is a power of two, so the lecture's "
                    f"n={f.lecture} could not show it")
    return message, extra


def float32_note(spans: list[SourceSpan]) -> str:
    """One sentence for a verdict whose main cause is elsewhere but whose code also creates float32 tensors.

    Example::

        float32_note(impl.source_spans())   # 'your code also creates float32 tensors (torch.zeros at student.py:7) ...'
    """
    makers = float32_makers(spans)
    where = ", ".join(dict.fromkeys(f"{f.value} at {f.location.describe()}" for f in makers))
    return (f"your code also creates float32 tensors{f' ({where})' if where else ''}, which give float32 answers in a "
            "float64 run (use dtype=x.dtype or *_like(...)); this case was judged with new tensors in float64")


def describe_config(config: Config, keys: tuple[str, ...] | None = None) -> str:
    """``n=2, vocab_size=3`` for the given size fields (default: all five).

    Example::

        describe_config(Config(), ("batch_size",))   # 'n=32'
    """
    return ", ".join(f"{label}={getattr(config, attr)}" for attr, label in SIZE_NAMES if keys is None or attr in keys)



@dataclass
class Explained:
    """Why a generated case fails (see :mod:`pytest_backprop.properties.explain`): the verdict to show
    (``inner``), its code, message and details; ``at_lecture`` when that verdict is the lecture's
    sizes in float64 rather than the generated case."""

    inner: Verdict
    code: str
    message: str
    extra: dict[str, Any]
    at_lecture: bool = False


def explain_failure(inner: Verdict, subject: str, lecture: Config, failing: Config, spans: list[Any],
                    context: list[Any], bad_case: Callable[[bool], Verdict | None],
                    bad_at: Callable[[Config, bool], Verdict | None], *, values_vary: bool = True) -> Explained:
    """Measure why a case at sizes ``failing`` fails when the lecture's sizes pass.

    ``bad_case(float64_default)`` re-runs the failing case, ``bad_at(config, float64_default)`` the
    same check at other sizes (lecture-like values); ``float64_default`` runs the user's code with
    torch's default dtype float64. ``subject`` names what failed (``dlogprobs``, ``backward_h``).
    ``values_vary``: the failing case has generated values, so "the sizes alone pass" is a finding.

    Example::

        e = explain_failure(inner, "dlogprobs", Config(), case.config, spans, [], lambda f: ..., lambda c, f: ...)
        e.code, e.message   # ('hardcoded_shape', 'passes at n=32, fails at n=2: 32 is written into your code: ...')
    """
    if bad_case(True) is None:  # the user's float32 tensors are the whole story
        probe = [] if bad_at(lecture, False) is not None else size_findings(
            lecture, failing, lambda c: bad_at(c, False) is not None, attrs=("batch_size",))
        pow2 = next((f for f in probe if f.pattern == "not_power_of_two"), None)
        message, more = explain_float32(spans, inner, subject, powers_of_two=pow2)
        return Explained(inner, "precision", message, more)
    float64_default, note, extra = False, "", {}
    at_lecture = bad_at(lecture, False)
    if at_lecture is not None:
        if bad_at(lecture, True) is not None:  # wrong in float64 at the lecture's own sizes, whatever dtype it creates
            makers = float32_makers(spans)
            where = f"; your code makes float32 tensors: {quote(makers)}" if makers else ""
            message = (f"passes the lecture's check in float32 but fails in float64 at the lecture's sizes "
                       f"({describe_config(lecture)}): [{at_lecture.diagnosis.code}] {at_lecture.diagnosis.message}"
                       f"{where}; keep the inputs' dtype (*_like(...), dtype=x.dtype, no .float())")
            return Explained(at_lecture, at_lecture.diagnosis.code, message, {"config": describe_config(lecture)}, True)
        # float32 tensors fail the lecture's sizes in float64 and pass with float64 defaults: fold that in
        float64_default, note, extra = True, "; " + float32_note(spans), {"float32": True}
        inner = bad_case(True) or inner
    detail = f"({subject}: {inner.diagnosis.message})"
    findings = size_findings(lecture, failing, lambda c: bad_at(c, float64_default) is not None)
    if not findings and values_vary and bad_at(failing, float64_default) is None:
        message = (f"fails with the generated values, passes at the same sizes with the lecture's values: "
                   f"{subject} [{inner.diagnosis.code}] {inner.diagnosis.message}")
        return Explained(inner, inner.diagnosis.code, message + note, extra)
    if findings:
        code, message, more = explain_sizes(findings, lecture, failing, spans, context, detail)
    else:
        code, message, more = explain_combined(lecture, failing, spans, context, detail)
    return Explained(inner, code, message + note, {**extra, **more})


__all__ = ["DEFAULT_PROBES", "PROBES", "SIZE_NAMES", "Explained", "SizeFinding", "default_dtype", "describe_config",
           "explain_combined", "explain_failure", "explain_float32", "explain_sizes", "float32_note", "label_of", "quote",
           "size_findings", "size_literals"]
