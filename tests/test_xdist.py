"""``pytest -n 2 --backprop`` (pytest-xdist): same verdicts, one summary table, one JSON report."""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES

pytest.importorskip("xdist")

VOLATILE = ("details",)  # Exercise 4's curves are floats computed the same way; compared separately


def _run(pytester, json_path, *extra):
    result = pytester.runpytest_subprocess("--backprop", f"--backprop-impl={EXAMPLES / 'ex1_buggy.py'}",
                                           "--backprop-steps=5", f"--backprop-json={json_path}", "-q", *extra)
    return result, json.loads(json_path.read_text())


CONTROLLER_MODULES = """
import sys

def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # xdist's controller (or a serial run)
        open("controller.txt", "w").write("torch" if "torch" in sys.modules else "no torch")
"""


def test_xdist_same_verdicts_one_table_one_report(pytester):
    pytester.makeconftest(CONTROLLER_MODULES)
    serial, serial_json = _run(pytester, pytester.path / "serial.json")
    parallel, parallel_json = _run(pytester, pytester.path / "parallel.json", "-n", "2")
    # xdist's controller only gathers, prints and writes verdicts: it imports no torch
    assert (pytester.path / "controller.txt").read_text() == "no torch"
    assert any(s in parallel.stdout.str() for s in ("2 workers", "gw1", "bringing up nodes"))
    s_checks = {c["exercise"] + "::" + c["tensor"]: c for c in serial_json["checks"]}
    p_checks = {c["exercise"] + "::" + c["tensor"]: c for c in parallel_json["checks"]}
    assert list(s_checks) == list(p_checks)  # same checks, same (exercise, backward) order
    assert {c["status"] for c in s_checks.values()} >= {"pass", "fail"}
    for key, check in s_checks.items():
        assert {k: v for k, v in check.items() if k not in VOLATILE} == \
               {k: v for k, v in p_checks[key].items() if k not in VOLATILE}, key
    assert s_checks["ex4::sgd"]["details"]["step"] == p_checks["ex4::sgd"]["details"]["step"] == 0
    for result in (serial, parallel):
        out = result.stdout.str()
        assert out.count("backprop: gradients vs autograd") == 1
        assert out.count("first wrong gradient:") == 1
    outcomes = serial.parseoutcomes()
    assert parallel.parseoutcomes().get("failed") == outcomes.get("failed")
    # the combined report is the controller's: a worker's would hold only the checks that worker ran
    assert {k: v for k, v in serial_json.items() if k != "checks"} == \
           {k: v for k, v in parallel_json.items() if k != "checks"}

