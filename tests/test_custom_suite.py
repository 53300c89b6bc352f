"""The suite of buggy custom Functions (tests/custom_functions.py) through check_backward as an
engineer writes it: ``@given(<inputs from the kit's strategies>)`` + ``check_backward(fn, *inputs,
reference=...)``. Every bug is caught by the check meant for it, with its message; every corrected
twin and every control passes (several hypothesis seeds; one derandomized run under CI)."""

from __future__ import annotations

import os
import re

import pytest
from custom_functions import BUGGY, CORRECT, Case
from hypothesis import HealthCheck, Phase, given, seed, settings

from pytest_backprop import check_backward
from pytest_backprop.judge.custom import CheckFailure

EXAMPLES = 30
SEEDS = [0] if os.environ.get("CI") else [0, 1, 2]


def search(case: Case, seed_: int) -> CheckFailure | None:
    """The first failure hypothesis finds for ``case`` (None when every example passes). Not shrunk:
    shrinking costs most of the time here; tests/test_custom.py shows what it shrinks to."""

    @seed(seed_)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
              report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow],
              phases=[Phase.explicit, Phase.generate])
    @given(case.inputs)
    def property_(inputs):
        check_backward(case.fn, *inputs, reference=case.reference)

    try:
        property_()
    except CheckFailure as caught:
        return caught
    return None


@pytest.mark.parametrize("case", BUGGY, ids=lambda c: c.name)
def test_each_bug_is_caught_by_its_check_with_its_message(case):
    caught = search(case, 0)
    assert caught is not None, f"{case.name} ({case.kind}) was not caught"
    assert caught.check in case.caught_by, f"caught by {caught.check}, expected {case.caught_by}:\n{caught}"
    assert re.search(case.message, str(caught)), str(caught)
    assert str(caught).startswith(case.fn.__self__.__name__ + ".apply [")


@pytest.mark.parametrize("seed_", SEEDS)
@pytest.mark.parametrize("case", CORRECT, ids=lambda c: c.name)
def test_each_correct_function_passes(case, seed_):
    caught = search(case, seed_)
    assert caught is None, f"false alarm on {case.name}:\n{caught}"


def test_the_suite_covers_the_bug_classes():
    kinds = {c.kind for c in BUGGY}
    assert {"contiguity", "needs_input_grad", "class state", "in-place on saved tensor", "overflow",
            "kink in the reference", "wrong transpose", "missing upstream multiply", "wrong reduction/keepdim",
            "broadcasting", "dtype (precision)", "non-determinism"} <= kinds
    assert len([c for c in CORRECT if c.kind == "control"]) >= 4
    assert {c.name.replace(" (bug)", "") for c in BUGGY} <= {c.name.replace(" (fixed)", "") for c in CORRECT}
