"""Grading: points, hidden checks, Gradescope's results.json, and a valid file whatever happens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES, run_inprocess, solution_with, write_script

from pytest_backprop.grading import gradescope as gs
from pytest_backprop.report.text import render_verdict
from pytest_backprop.verdict import Verdict

INSTRUCTOR_TESTS = """
import pytest

@pytest.mark.backprop_points(3)
def test_worth_three():
    pass

@pytest.mark.backprop_hidden
def test_hidden_and_failing():
    assert 1 == 2, "hidden check failed"

@pytest.mark.backprop_hidden(visibility="after_due_date")
@pytest.mark.backprop_points(0.5)
def test_half_after_due_date():
    pass

def test_default_one_point_skipped():
    pytest.skip("not attempted yet")

def test_torch_not_imported():
    import sys
    assert "torch" not in sys.modules
"""


#: Built-in property and Exercise 4 checks off: these tests are about grading, and run faster without.
FAST = ("--backprop-examples=0", "--backprop-steps=0", "-p", "no:cacheprovider")


def load_results(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert gs.is_valid_results(path)
    assert set(data) >= {"score", "execution_time", "output", "tests"}
    for test in data["tests"]:
        assert set(test) >= {"name", "score", "max_score", "status", "output", "visibility"}
        assert test["status"] in ("passed", "failed")
        assert test["visibility"] in gs.VISIBILITIES
        kept = test["output"].startswith("Keeps its points")  # an inherited failure, under the default cascade
        assert test["score"] == (test["max_score"] if test["status"] == "passed" or kept else 0)
    assert data["score"] == sum(t["score"] for t in data["tests"])
    # the submissions live in pytest's temporary folders: none of their absolute paths may leak (the
    # kit's own files may: a clone of this repository can itself be in /tmp)
    assert "/pytest-of-" not in json.dumps(data), "paths are relative to the submission's folder"
    return data


def by_name(data: dict) -> dict[str, dict]:
    return {t["name"]: t for t in data["tests"]}


# --- the settings ------------------------------------------------------------------------------

def test_points_exact_key_beats_patterns_in_any_order():
    for text in ("ex1=1 ex2=3 ex1::b1=2", "ex1::b1=2, ex2=3, ex1=1", ["ex1::b1=2", "ex1=1", "ex2=3"]):
        rules = gs.parse_points(text)
        assert gs.points_for("ex1::b1", rules) == 2.0
        assert gs.points_for("ex1::h", rules) == 1.0
        assert gs.points_for("ex2::logits", rules) == 3.0
        assert gs.points_for("ex3::hprebn", rules) == gs.DEFAULT_POINTS


def test_points_last_matching_pattern_wins_and_node_ids_match():
    rules = gs.parse_points("*=0 ex1=2 tests/test_hw.py::*=4")
    assert gs.points_for("ex1::C", rules) == 2.0
    assert gs.points_for("ex3::hprebn", rules) == 0.0
    assert gs.points_for("tests/test_hw.py::test_a", rules) == 4.0
    assert gs.points_for(gs.check_key("backprop::ex1::C"), rules) == 2.0


@pytest.mark.parametrize("text, words", [
    ("ex1:3", "PATTERN=POINTS"), ("ex1=-1", ">= 0"), ("ex1=lots", ">= 0"), ("=2", "PATTERN=POINTS"),
    ("ex1=nan", ">= 0"),
])
def test_bad_points_are_usage_errors(text, words):
    with pytest.raises(pytest.UsageError, match=words):
        gs.parse_points(text)


def test_hidden_patterns():
    rules = gs.parse_hidden("ex3 ex1::b1=after_due_date")
    assert gs.visibility_for("ex3::hprebn", rules) == "hidden"
    assert gs.visibility_for("ex1::b1", rules) == "after_due_date"
    assert gs.visibility_for("ex1::C", rules) == "visible"
    with pytest.raises(pytest.UsageError, match="VISIBILITY"):
        gs.parse_hidden("ex1=secret")


def test_the_catalogue_is_set_by_the_settings_alone():
    from pytest_backprop.grading import points

    keys = [key for key, _ in points.builtin_checks(steps=0, examples=0, broadcast=False)]
    assert keys[:26] == [f"ex1::{t}" for t in ("logprobs", "probs", "counts_sum_inv", "counts_sum", "counts",
                                                 "norm_logits", "logit_maxes", "logits", "h", "W2", "b2", "hpreact",
                                                 "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff",
                                                 "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C")]
    assert keys[26:28] == ["ex2::logits", "ex3::hprebn"] and "ex4::sgd" not in keys
    full = dict(points.builtin_checks(steps=5, examples=3, broadcast=True))
    assert full["ex4::sgd"] == full["properties::ex2"] == full["properties::broadcast::ex1"] == 1
    assert full["lines::h"] == full["properties::lines::h"] == full["properties::broadcast::logits"] == 0
    assert points.keeps_points("fail", "inherited", "independent")
    assert not points.keeps_points("fail", "inherited", "strict")
    assert not points.keeps_points("fail", "scale", "independent") and not points.keeps_points("error", "inherited", "x")
    assert "Exercise 3" in points.missing_reason("properties::ex3")
    assert "Exercise 4 trains with your Exercise 1" in points.missing_reason("ex4::sgd")


# --- results.json as a file --------------------------------------------------------------------

def test_results_json_sums_passed_cases_and_is_strict_json(tmp_path):
    cases = [gs.Case("a", 2, True, "ok"), gs.Case("b", 1.5, False, "x" * (gs.MAX_OUTPUT + 10), "hidden")]
    data = gs.results_json(cases, output="summary", execution_time=1.23456)
    assert data["score"] == 2 and data["extra_data"]["max_score"] == 3.5
    assert data["tests"][1]["output"].endswith("(truncated)") and data["tests"][1]["visibility"] == "hidden"
    gs.write_results(tmp_path / "sub" / "results.json", data)
    assert load_results(tmp_path / "sub" / "results.json")["execution_time"] == 1.235


def test_ensure_writes_a_crash_result_only_when_needed(tmp_path, capsys):
    path, log = tmp_path / "results.json", tmp_path / "pytest.log"
    log.write_text("Fatal Python error: Segmentation fault\n")
    assert gs.ensure_results(path, log=log)
    data = load_results(path)
    assert data["score"] == 0 and data["tests"][0]["visibility"] == "visible"
    assert "Segmentation fault" in data["tests"][0]["output"]
    assert not gs.ensure_results(path)  # valid now: left alone
    path.write_text('{"score": 3, "tests": [')  # half a file
    assert gs.main(["--ensure", str(path)]) == 0
    assert "wrote a crash result" in capsys.readouterr().out
    assert load_results(path)["extra_data"]["crashed"] is True


# --- through the plugin ------------------------------------------------------------------------

def test_instructor_tests_alone_no_backprop_no_torch(pytester):
    """Without --backprop: markers registered (--strict-markers), points and visibility, no torch."""
    pytester.makepyfile(test_hw=INSTRUCTOR_TESTS)
    out = pytester.path / "out" / "results.json"
    result = pytester.runpytest_subprocess("--strict-markers", f"--backprop-gradescope={out}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1, skipped=1)
    data = load_results(out)
    tests = by_name(data)
    assert tests["test_hw.py::test_worth_three"]["max_score"] == 3
    assert tests["test_hw.py::test_hidden_and_failing"]["visibility"] == "hidden"
    assert "hidden check failed" in tests["test_hw.py::test_hidden_and_failing"]["output"]
    assert tests["test_hw.py::test_half_after_due_date"]["visibility"] == "after_due_date"
    assert tests["test_hw.py::test_default_one_point_skipped"] == {
        "name": "test_hw.py::test_default_one_point_skipped", "score": 0, "max_score": 1, "status": "failed",
        "output": "skipped: not attempted yet", "visibility": "visible"}
    assert tests["test_hw.py::test_torch_not_imported"]["status"] == "passed"
    assert data["score"] == 3 + 0.5 + 1 and data["extra_data"]["max_score"] == 3 + 1 + 0.5 + 1 + 1
    result.stdout.fnmatch_lines(["*Gradescope results written to*(score 4.5 / 6.5)*"])


def test_malformed_marker_fails_its_test_with_zero_points(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.backprop_points("two")
        def test_bad():
            pass
    """)
    out = pytester.path / "results.json"
    result = pytester.runpytest(f"--backprop-gradescope={out}")
    result.assert_outcomes(errors=1)
    test = load_results(out)["tests"][0]
    assert test["status"] == "failed" and test["max_score"] == 0
    assert "backprop_points: points must be a number >= 0, got 'two'" in test["output"]


def test_verdicts_json_and_gradescope_render_the_same_verdicts(pytester):
    """A keepdim mistake costs exactly dbnbias's points; its output is the verdict's rendering.

    Also: a collection error in the instructor's tests is a visible failed test, and (with
    --continue-on-collection-errors) the built-in checks still count.
    """
    impl = write_script(pytester, solution_with("dbnbias = dhpreact.sum(0, keepdim=True)", "dbnbias = dhpreact.sum(0)"))
    pytester.makepyfile(test_hw=INSTRUCTOR_TESTS.replace("import sys", "import sys; return"),
                        test_broken="import no_such_module_xyz\n")
    out, report = pytester.path / "results.json", pytester.path / "report.json"
    result = run_inprocess(pytester,
        "--backprop", f"--backprop-impl={impl}", f"--backprop-gradescope={out}", f"--backprop-json={report}",
        "--backprop-points=ex1=0.5 ex1::bnbias=2", "--backprop-hidden=ex1::C", "--continue-on-collection-errors",
        *FAST)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    data, checks = load_results(out), json.loads(report.read_text())["checks"]
    checks = [c for c in checks if c["exercise"] == "ex1"]  # (other built-in checks may follow)
    builtin = [t for t in data["tests"] if t["name"].startswith("ex1::")]
    assert len(builtin) == 26
    assert [t["name"] for t in builtin] == [f"ex1::{c['tensor']}" for c in checks]  # same order as the table
    for test, check in zip(builtin, checks):
        assert test["output"] == render_verdict(Verdict.from_json(check))
        assert (test["status"] == "passed") == (check["status"] == "pass")
    tests = by_name(data)
    assert tests["ex1::bnbias"]["status"] == "failed" and tests["ex1::bnbias"]["max_score"] == 2
    assert "[keepdim]" in tests["ex1::bnbias"]["output"]
    assert tests["ex1::C"]["visibility"] == "hidden" and tests["ex1::C"]["max_score"] == 0.5
    assert sum(t["score"] for t in builtin) == 25 * 0.5
    assert [tests[f"test_hw.py::{name}"]["score"] for name in (
        "test_worth_three", "test_hidden_and_failing", "test_half_after_due_date", "test_default_one_point_skipped",
        "test_torch_not_imported")] == [3, 0, 0.5, 0, 1]
    assert "ex1      bnbias          | -     | -           | -        | FAIL [keepdim]" in data["output"]  # the table
    broken = tests["Collection error: test_broken.py"]
    assert broken["visibility"] == "visible" and "no_such_module_xyz" in broken["output"]


@pytest.mark.parametrize("kind", ["syntax", "missing", "raises"])
def test_unrunnable_submission_still_yields_a_valid_file(pytester, kind):
    sources = {"syntax": "dlogprobs = (\n", "raises": "dlogprobs = torch.zeros_like(logprobs)\ndprobs = 1 / 0\n"}
    impl = pytester.path / "nothing_here.py" if kind == "missing" else write_script(pytester, sources[kind])
    out = pytester.path / "results.json"
    run_inprocess(pytester, "--backprop", f"--backprop-impl={impl}", f"--backprop-gradescope={out}",
                  "--backprop-hidden=*", *FAST)
    data = load_results(out)
    errors = [t for t in data["tests"] if t["status"] == "failed" and t["visibility"] == "visible"]
    assert errors, "why it failed must be visible, even with every check hidden"
    expected = {"syntax": "was never closed", "missing": "no such file", "raises": "ZeroDivisionError"}[kind]
    assert expected in errors[0]["output"]
    assert data["extra_data"]["max_score"] == len(data["tests"]) >= 26
    assert data["score"] == (0 if kind != "raises" else sum(t["status"] == "passed" for t in data["tests"]))


def test_usage_error_still_yields_a_valid_file(pytester):
    out = pytester.path / "results.json"
    result = pytester.runpytest("--backprop", f"--backprop-gradescope={out}")  # no --backprop-impl
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    test = load_results(out)["tests"][0]
    assert test["status"] == "failed" and test["visibility"] == "visible" and "--backprop-impl" in test["output"]


def test_missing_test_path_still_yields_a_valid_file(pytester):
    out = pytester.path / "results.json"
    result = pytester.runpytest(f"--backprop-gradescope={out}", "no_such_tests_dir")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    test = load_results(out)["tests"][0]
    assert test["name"] == "The grader is misconfigured" and "usage error" in test["output"]


def test_bad_points_setting_still_yields_a_valid_file(pytester):
    pytester.makeini("[pytest]\nbackprop_points = ex1:3\n")
    out = pytester.path / "results.json"
    result = pytester.runpytest(f"--backprop-gradescope={out}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "PATTERN=POINTS" in load_results(out)["tests"][0]["output"]


def test_ensure_cli_runs_without_torch(tmp_path):
    path = tmp_path / "results.json"
    code = ("import sys, runpy; sys.argv = ['x', '--ensure', sys.argv[1]]; "
            "from pytest_backprop import gradescope; gradescope.main(sys.argv[1:]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
    assert load_results(path)["score"] == 0


# --- one maximum whatever the form; one mistake, its own points -------------------------------------

def grade(pytester, impl: str, *args: str) -> dict:
    out = pytester.path / "results.json"
    run_inprocess(pytester, "--backprop", f"--backprop-impl={impl}", f"--backprop-gradescope={out}", *FAST,
                  *args)
    return load_results(out)


def test_the_maximum_is_set_by_the_configuration_not_the_submission_form(pytester, ex1_solution):
    """A script (Exercise 1 only), a module and a notebook (Exercises 1-3): the same rows, the same maximum;
    what a form lacks scores 0 out of its points and says what is missing."""
    from data.notebooks import lecture_notebook, write

    pytester.makeini("[pytest]\nbackprop_points = ex1=1 ex2=2 ex3=3\n")
    (pytester.path / "script.py").write_text(ex1_solution.read_text())
    write(lecture_notebook(), pytester.path / "notebook.ipynb")
    results = {form: grade(pytester, impl) for form, impl in
               (("script", "script.py"), ("module", "reference_model.backward"), ("notebook", "notebook.ipynb"))}
    for form, data in results.items():
        assert [t["name"] for t in data["tests"]][26:] == ["ex2::logits", "ex3::hprebn"], form
        assert data["extra_data"]["max_score"] == 26 + 2 + 3, form
    assert results["module"]["score"] == results["notebook"]["score"] == 31
    assert results["script"]["score"] == 26
    missing = by_name(results["script"])["ex2::logits"]
    assert missing["status"] == "failed" and missing["max_score"] == 2
    assert "not in script script.py: write Exercise 2" in missing["output"] and "0 of 2 points" in missing["output"]
    assert "missing" in by_name(results["script"])["ex3::hprebn"]["tags"]


def test_checks_only_some_forms_have_are_worth_nothing_unless_named(pytester):
    """The per-line module's lines::* checks are extra rows at 0 points; named in backprop_points they count,
    and then a script lacks them."""
    (pytester.path / "script.py").write_text((EXAMPLES / "ex1_solution.py").read_text())
    lines = grade(pytester, "reference_model.backward_lines")
    per_line = [t for t in lines["tests"] if t["name"].startswith("lines::")]
    assert len(per_line) == 20 and {t["max_score"] for t in per_line} == {0}
    assert lines["extra_data"]["max_score"] == 26 + 2  # ex1 and ex2/ex3 rows, as for every form
    named = grade(pytester, "script.py", "--backprop-points=lines::h=4")
    assert by_name(named)["lines::h"]["max_score"] == 4 and "per-line backward" in by_name(named)["lines::h"]["output"]
    assert "lines::logits" not in by_name(named)


def test_an_inherited_failure_keeps_its_points_unless_the_cascade_is_strict(pytester, ex1_solution):
    """Forgetting dcounts's second branch: one own fault, every later gradient inherits it."""
    impl = write_script(pytester, solution_with("dcounts += torch.ones_like(counts) * dcounts_sum\n", ""))
    report = pytester.path / "report.json"
    default = grade(pytester, str(impl), f"--backprop-json={report}")
    strict = grade(pytester, str(impl), "--backprop-cascade=strict")
    codes = {c["tensor"]: (c["status"], c["diagnosis"]["code"]) for c in json.loads(report.read_text())["checks"]
             if c["exercise"] == "ex1"}
    assert codes["counts"] == ("fail", "missing_branch")
    inherited = {t for t, (status, code) in codes.items() if code == "inherited"}
    passing = {t for t, (status, _) in codes.items() if status == "pass"}
    assert {"norm_logits", "logits", "W1", "C"} <= inherited
    row = by_name(default)["ex1::C"]
    assert row["status"] == "failed" and row["score"] == row["max_score"] == 1
    assert row["output"].startswith("Keeps its points") and "[inherited]" in row["output"]
    assert by_name(default)["ex1::counts"]["score"] == 0
    ex1 = lambda data: sum(t["score"] for t in data["tests"] if t["name"].startswith("ex1::"))  # noqa: E731
    assert ex1(default) == len(passing) + len(inherited) == 25
    assert ex1(strict) == len(passing)
    assert by_name(strict)["ex1::C"]["score"] == 0


def test_results_name_the_submissions_file_relative_to_its_folder(pytester):
    impl = write_script(pytester, "dlogprobs = torch.zeros_like(logprobs)\nx = 1 / 0\n")
    data = grade(pytester, str(impl))
    # the line that raised assigns no gradient: the summary (shown to every student) names it
    assert "ZeroDivisionError" in data["output"] and "student.py:2" in data["output"]
    assert by_name(data)["ex1::probs"]["status"] == "failed" and str(pytester.path) not in json.dumps(data)
