"""``--backprop-problem``: the plugin on another forward pass (examples/problems/two_layer_relu.py).

One pytest run per form, in process (each costs about a second): the items are the problem's
gradients in its backward order, the terminal table and the JSON report list them, the buggy
backward fails exactly on its two mistakes with the gradients computed from them ``inherited``,
the lecture's Exercises 2-4 are not collected, and a forward the kit cannot derive from is a usage
error naming its line.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch  # noqa: F401 -- imported before the in-process runs: pytester restores sys.modules after each
from conftest import EXAMPLES

# What the in-process runs import, imported once here (pytester drops modules first imported inside a
# run, and importing torch's extension a second time crashes the interpreter).
for _name in ("hypothesis", "pytest_backprop.checks.session", "pytest_backprop.checks.independent",
              "pytest_backprop.items.collect", "pytest_backprop.items.gradients", "pytest_backprop.items.properties",
              "pytest_backprop.items.problem_properties", "pytest_backprop.properties.problem",
              "pytest_backprop.usercode.loaders", "pytest_backprop.usercode.perline", "pytest_backprop.usercode.isolate",
              "pytest_backprop.judge.lines", "pytest_backprop.report.text", "pytest_backprop.report.json"):
    importlib.import_module(_name)

FOLDER = EXAMPLES / "problems"
PROBLEM = str(FOLDER / "two_layer_relu.py")
ORDER = ("logp", "esum", "e", "shifted", "zmax", "z2", "a1", "W2", "b2", "z1", "x", "W1", "b1")


def run(pytester: pytest.Pytester, impl: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess("--backprop", "--backprop-steps=0", f"--backprop-impl={impl}",
                                        "-p", "no:cacheprovider", *args)


def checks(path) -> dict[tuple[str, str], dict]:
    report = json.loads(path.read_text())
    return {(c["exercise"], c["tensor"]): c for c in report["checks"]}


def test_correct_backward_every_gradient_an_item_in_order_from_the_ini(pytester):
    pytester.makeini(f"[pytest]\nbackprop_problem = {PROBLEM}\n")
    result = run(pytester, str(FOLDER / "two_layer_relu_backward.py"), "--backprop-examples=0",
                 "--backprop-json=out.json", "-v")
    result.assert_outcomes(passed=len(ORDER))
    ran = [line.split(" ")[0] for line in result.outlines if line.startswith("backprop::")]
    assert ran == [f"backprop::ex1::{t}" for t in ORDER]  # the spec's order; no ex2, ex3, ex4
    assert any("backprop: problem two-layer ReLU MLP" in line for line in result.outlines)
    assert any(line.startswith("ex1      z1 ") and line.endswith("| ok") for line in result.outlines)
    report = json.loads((pytester.path / "out.json").read_text())
    assert report["problem"] == {"name": "two-layer ReLU MLP", "origin": PROBLEM}
    assert [c["tensor"] for c in report["checks"]] == list(ORDER)
    assert {c["status"] for c in report["checks"]} == {"pass"}


def test_buggy_backward_fails_on_its_mistakes_and_the_rest_is_inherited(pytester):
    result = run(pytester, str(FOLDER / "two_layer_relu_buggy.py"), f"--backprop-problem={PROBLEM}",
                 "--backprop-examples=0", "--backprop-json=out.json", "--backprop-gradescope=results.json")
    result.assert_outcomes(passed=8, failed=5)
    found = checks(pytester.path / "out.json")
    codes = {t: found[("ex1", t)]["diagnosis"]["code"] for t in ORDER if found[("ex1", t)]["status"] == "fail"}
    assert codes == {"b2": "keepdim", "z1": "mismatch", "x": "inherited", "W1": "inherited", "b1": "inherited"}
    assert found[("ex1", "W1")]["details"]["inherited_from"] == "z1"
    assert found[("ex1", "b2")]["line"] == "z2 = a1 @ W2 + b2"  # the consumer graph of the spec
    assert found[("ex1", "z1")]["location"]["source"].startswith("dz1 = da1")
    result.stdout.fnmatch_lines(["*first wrong gradient: db2 (ex1) [[]keepdim[]]*",
                                 "*also wrong on its own: dz1 (ex1) [[]mismatch[]]*"])
    graded = json.loads((pytester.path / "results.json").read_text())
    scores = {t["name"]: t["score"] for t in graded["tests"]}
    assert set(scores) == {f"ex1::{t}" for t in ORDER}  # the problem's rows only: no ex2, ex3, ex4
    assert graded["score"] == len(ORDER) - 2 == sum(scores.values())  # inherited rows keep their points


def test_per_line_module_lines_chain_and_derived_properties(pytester):
    result = run(pytester, str(FOLDER / "two_layer_relu_lines.py"), f"--backprop-problem={PROBLEM}",
                 "--backprop-examples=2", "--backprop-json=out.json")
    found = checks(pytester.path / "out.json")
    lines = ("loss", "logp", "esum", "e", "shifted", "zmax", "z2", "a1", "z1")
    assert {t for (ex, t) in found if ex == "lines"} == set(lines)
    assert {t for (ex, t) in found if ex == "prop-lines"} == set(lines)
    assert ("prop-ex1", "all") in found
    assert {c["status"] for c in found.values()} == {"pass"}
    result.assert_outcomes(passed=len(ORDER) + 2 * len(lines) + 1)


def test_a_hardcoded_size_is_found_by_the_derived_property(pytester):
    source = (FOLDER / "two_layer_relu_backward.py").read_text()
    (pytester.path / "hard.py").write_text(source.replace("dlogp[range(n), y] = -1.0 / n",
                                                          "dlogp[range(8), y] = -1.0 / 8"))
    result = run(pytester, "hard.py", f"--backprop-problem={PROBLEM}", "--backprop-examples=3",
                 "--backprop-json=out.json")
    result.assert_outcomes(passed=len(ORDER), failed=1)  # right at the default n = 8
    prop = checks(pytester.path / "out.json")[("prop-ex1", "logp")]
    assert prop["status"] in ("fail", "error") and prop["details"]["sizes"]["n"] != 8


def test_a_forward_the_kit_cannot_derive_from_is_a_usage_error_naming_its_line(pytester):
    pytester.makepyfile(bad_problem="""
        import torch
        SIZES = {"n": 4}
        def make_inputs(sizes, generator):
            return {"x": torch.randn(sizes["n"], generator=generator)}
        def forward(x):
            y = x * 2; z = y + 1
            return z.sum()
    """)
    result = run(pytester, str(FOLDER / "two_layer_relu_backward.py"), "--backprop-problem=bad_problem.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--backprop-problem=bad_problem.py: bad_problem.py:6: `y = x * 2; z = y + 1`: two statements on one line*"])
    assert "Traceback" not in result.stderr.str()


def test_notebook_cells_answer_another_problem():
    """Notebook cells are found by the problem's gradient names (no pytest run: the loader and the grader)."""
    from pytest_backprop.checks.independent import grade_exercise
    from pytest_backprop.problems import load_spec, problem_from_spec
    from pytest_backprop.usercode.notebook import NotebookImplementation

    spec = load_spec(PROBLEM)
    lines = (FOLDER / "two_layer_relu_buggy.py").read_text().splitlines()[3:]
    cells = ["import torch\nprint(z1.shape)", "\n".join(lines[:9]), "scratch = dz2.abs().max()", "\n".join(lines[9:])]
    impl = NotebookImplementation.from_cells(cells, problem_spec=spec)
    assert impl.exercises() == ("ex1",) and impl.cells_of("ex1") == [2, 4]
    verdicts = {v.tensor: v for v in grade_exercise(impl, "ex1", problem_from_spec(spec), timeout=10).verdicts}
    assert [t for t in ORDER if verdicts[t].status == "fail"] == ["b2", "z1", "x", "W1", "b1"]
    assert verdicts["z1"].location.describe() == "cell 4, line 5" and verdicts["x"].diagnosis.code == "inherited"
