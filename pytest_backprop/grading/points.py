"""Points and visibility: what each check is worth, who sees it, and which checks every submission has.

The rules (``backprop_points``, ``backprop_hidden``, the markers) are documented in
:mod:`pytest_backprop.grading.gradescope`. Two decisions make the score the same whatever form a
student submits (script, module, notebook):

- :func:`builtin_checks` is the catalogue of built-in checks a session grades, fixed by the
  session's settings, not by the submission: a check the submission does not have (Exercise 2 in a
  script) still counts, as 0 out of its points (:func:`missing_reason` says why);
- checks that only some forms have (``lines::*``, the per-line functions' checks) are worth 0
  points unless ``backprop_points`` names them.

And by default one mistake costs only its own points (:func:`keeps_points`): a gradient that is
wrong only because an earlier one is (diagnosis ``inherited``) keeps its points, unless
``backprop_cascade = strict``.

This module imports neither torch nor hypothesis (except :func:`builtin_checks`, used with
``--backprop`` on).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pytest

from ..markers import HIDDEN_MARKER, POINTS_MARKER

VISIBILITIES = ("hidden", "after_due_date", "after_published", "visible")
DEFAULT_POINTS = 1.0
BUILTIN_PREFIX = "backprop::"
#: ``backprop_cascade``: ``independent`` (an inherited failure keeps its points) or ``strict``.
CASCADES = ("independent", "strict")


@dataclass(frozen=True)
class Rule:
    """One ``PATTERN=VALUE`` entry of ``backprop_points`` or ``backprop_hidden``."""

    pattern: str
    value: Any

    @property
    def exact(self) -> bool:
        return not any(c in self.pattern for c in "*?[")

    def matches(self, key: str) -> bool:
        return fnmatch.fnmatchcase(key, self.pattern)


def _entries(text: str | Sequence[str] | None) -> list[str]:
    if not text:
        return []
    if not isinstance(text, str):
        text = " ".join(str(t) for t in text)
    return [e for e in text.replace(",", " ").split() if e]


def _pattern(raw: str) -> str:
    # "ex1" alone means every check of exercise 1.
    if "::" not in raw and "/" not in raw and not raw.endswith(".py") and not any(c in raw for c in "*?["):
        return f"{raw}::*"
    return raw


def parse_points(text: str | Sequence[str] | None) -> list[Rule]:
    """Parse ``backprop_points``: whitespace- or comma-separated ``PATTERN=POINTS`` entries.

    Example::

        rules = parse_points("ex1=1 ex2=3 ex1::b1=2")
        points_for("ex1::b1", rules)   # 2.0
        points_for("ex1::h", rules)    # 1.0
    """
    rules = []
    for entry in _entries(text):
        pattern, sep, value = entry.rpartition("=")
        if not sep or not pattern:
            raise pytest.UsageError(f"backprop_points: {entry!r} is not PATTERN=POINTS "
                                    "(e.g. backprop_points = ex1=1 ex2=3 ex1::b1=2)")
        try:
            points = float(value)
        except ValueError:
            points = float("nan")
        if not math.isfinite(points) or points < 0:
            raise pytest.UsageError(f"backprop_points: {entry!r}: points must be a number >= 0, got {value!r}")
        rules.append(Rule(_pattern(pattern), points))
    return rules


def parse_hidden(text: str | Sequence[str] | None) -> list[Rule]:
    """Parse ``backprop_hidden``: ``PATTERN`` (hidden) or ``PATTERN=VISIBILITY`` entries.

    Example::

        rules = parse_hidden("ex3 ex1::b1=after_due_date")
        visibility_for("ex3::hprebn", rules)   # "hidden"
    """
    rules = []
    for entry in _entries(text):
        pattern, sep, value = entry.partition("=")
        value = value if sep else "hidden"
        if not pattern or value not in VISIBILITIES:
            raise pytest.UsageError(f"backprop_hidden: {entry!r}: expected PATTERN or PATTERN=VISIBILITY with "
                                    f"VISIBILITY one of {', '.join(VISIBILITIES)}")
        rules.append(Rule(_pattern(pattern), value))
    return rules


def _lookup(key: str, rules: Iterable[Rule], default: Any) -> Any:
    rules = list(rules)
    for rule in rules:
        if rule.exact and rule.pattern == key:
            return rule.value
    found = default
    for rule in rules:
        if rule.matches(key):
            found = rule.value
    return found


def points_for(key: str, rules: Iterable[Rule], default: float = DEFAULT_POINTS) -> float:
    """Points of the check or test ``key`` (``ex1::b1``, or a node id): exact entry, else the last
    matching pattern, else ``default``.

    Example::

        points_for("ex1::C", parse_points("ex1=1 ex1::C=2"))   # 2.0
    """
    return float(_lookup(key, rules, default))


def visibility_for(key: str, rules: Iterable[Rule], default: str = "visible") -> str:
    """Gradescope visibility of ``key`` under the ``backprop_hidden`` rules.

    Example::

        visibility_for("properties::ex1", parse_hidden("properties::*"))   # "hidden"
    """
    return str(_lookup(key, rules, default))


def check_key(nodeid: str) -> str:
    """The key points patterns match: ``ex1::b1`` for ``backprop::ex1::b1``, else the node id.

    Example::

        check_key("backprop::ex1::b1")        # "ex1::b1"
        check_key("tests/test_hw.py::test_a")  # unchanged
    """
    return nodeid[len(BUILTIN_PREFIX):] if nodeid.startswith(BUILTIN_PREFIX) else nodeid


def marker_points(item: pytest.Item) -> float | None:
    """Points given by ``@pytest.mark.backprop_points(n)`` on ``item`` (closest marker), or None.

    Raises ValueError with a clear message for a malformed marker.

    Example::

        @pytest.mark.backprop_points(2)
        def test_worth_two(): ...          # marker_points(item) == 2.0
    """
    marker = item.get_closest_marker(POINTS_MARKER)
    if marker is None:
        return None
    value = marker.args[0] if marker.args else marker.kwargs.get("points")
    if len(marker.args) > 1 or (value is None) or isinstance(value, bool):
        raise ValueError(f"@pytest.mark.{POINTS_MARKER} takes one number, e.g. @pytest.mark.{POINTS_MARKER}(2); "
                         f"got args={marker.args!r} kwargs={marker.kwargs!r}")
    try:
        points = float(value)
    except (TypeError, ValueError):
        points = float("nan")
    if not math.isfinite(points) or points < 0:
        raise ValueError(f"@pytest.mark.{POINTS_MARKER}: points must be a number >= 0, got {value!r}")
    return points


def marker_visibility(item: pytest.Item) -> str | None:
    """Visibility given by ``@pytest.mark.backprop_hidden`` on ``item``, or None.

    Example::

        @pytest.mark.backprop_hidden(visibility="after_due_date")
        def test_later(): ...              # marker_visibility(item) == "after_due_date"
    """
    marker = item.get_closest_marker(HIDDEN_MARKER)
    if marker is None:
        return None
    value = marker.args[0] if marker.args else marker.kwargs.get("visibility", "hidden")
    if value not in VISIBILITIES:
        raise ValueError(f"@pytest.mark.{HIDDEN_MARKER}: visibility must be one of {', '.join(VISIBILITIES)}; "
                         f"got {value!r}")
    return value


# --- the catalogue of built-in checks -----------------------------------------------------------

#: Keys of built-in checks only some forms of submission have (the per-line functions'): 0 points by default.
FORM_SPECIFIC = ("lines::*", "properties::lines::*", "properties::broadcast::*")


def default_points(key: str) -> float:
    """A built-in check's points when no ``backprop_points`` entry names it: 1, or 0 for a check only
    some forms have (``lines::*``; ``properties::broadcast::ex1`` is every form's).

    Example::

        default_points("ex1::C"), default_points("lines::h")   # (1.0, 0.0)
    """
    if key == "properties::broadcast::ex1":
        return DEFAULT_POINTS
    return 0.0 if any(fnmatch.fnmatchcase(key, p) for p in FORM_SPECIFIC) else DEFAULT_POINTS

def builtin_checks(*, steps: int, examples: int, broadcast: bool, spec: Any = None) -> list[tuple[str, float]]:
    """Every built-in check a session with these settings grades, whatever form the submission has,
    in the report's order, with its default points (0 for checks only some forms have). ``spec``:
    another problem than the lecture's (``--backprop-problem``): its gradients, lines and the
    properties derived from it; no Exercises 2-4.

    Example::

        keys = [key for key, _ in builtin_checks(steps=50, examples=0, broadcast=False)]
        keys[0], keys[26], keys[-1]   # ('ex1::logprobs', 'ex2::logits', 'ex4::sgd')
    """
    from ..judge.grade import EXERCISE_TENSORS, exercise_tensors  # with --backprop on: torch is loaded anyway

    if spec is not None:
        lines = exercise_tensors("lines", spec)
        keys = [f"ex1::{t}" for t in exercise_tensors("ex1", spec)] + [f"lines::{o}" for o in lines]
        if examples > 0:
            keys += ["properties::ex1", *(f"properties::lines::{o}" for o in lines)]
        return [(key, default_points(key)) for key in keys]
    lines = EXERCISE_TENSORS["lines"]
    keys = [f"{ex}::{t}" for ex in ("ex1", "ex2", "ex3") for t in EXERCISE_TENSORS[ex]]
    keys += [f"lines::{o}" for o in lines]
    if steps > 0:
        keys.append("ex4::sgd")
    if examples > 0:
        keys += [f"properties::{ex}" for ex in ("ex1", "ex2", "ex3")]
        keys += [f"properties::lines::{o}" for o in lines]
        if broadcast:
            from ..properties.checks import BROADCAST_LINES

            keys += ["properties::broadcast::ex1", *(f"properties::broadcast::{o}" for o in BROADCAST_LINES)]
    return [(key, default_points(key)) for key in keys]


_FORMS = {
    "ex1": "Exercise 1 (a script assigning dlogprobs ... dC, a module with backward(cache), or notebook cells)",
    "ex2": "Exercise 2 (cross_entropy_backward(...) in a module, or a notebook cell computing dlogits in one go)",
    "ex3": "Exercise 3 (batchnorm_backward(...) in a module, or a notebook cell computing dhprebn in one go)",
    "lines": "per-line backward functions (a module of backward_<output>(...) functions)",
}


def missing_reason(key: str) -> str:
    """Why a check of the catalogue has no result: what the submission lacks.

    Example::

        missing_reason("ex2::logits")   # 'Not in your submission: Exercise 2 (cross_entropy_backward(...) ...).'
    """
    parts = key.split("::")
    if parts[0] == "ex4":
        return ("Not run: Exercise 4 trains with your Exercise 1 gradients, and your submission has no "
                f"{_FORMS['ex1']}.")
    exercise = parts[0]
    if exercise == "properties":
        rest = parts[2:] if parts[1] == "broadcast" else parts[1:]
        exercise = rest[0] if rest and rest[0] in _FORMS else "lines"
    return f"Not in your submission: {_FORMS.get(exercise, _FORMS['lines'])}."


def keeps_points(status: str, code: str, cascade: str) -> bool:
    """Whether a failing built-in check keeps its points: under ``independent`` (the default), one
    that is wrong only because an earlier gradient is (``inherited``).

    Example::

        keeps_points("fail", "inherited", "independent")   # True
        keeps_points("fail", "inherited", "strict")        # False
    """
    return cascade != "strict" and status == "fail" and code == "inherited"
