"""The real plugin, run as users run it (pytester subprocesses)."""

from __future__ import annotations

import json

from conftest import run_inprocess, run_kit, solution_with, write_script

IMPL = "--backprop-impl={}"


def test_reference_module_passes_all_checks(pytester):
    result = run_kit(pytester, "--backprop-impl=reference_model.backward", "-q")
    # 26 atomic gradients + the Exercise 2 and 3 functions of the same module
    result.assert_outcomes(passed=28)
    result.stdout.fnmatch_lines(["*ex2*logits*ok*", "*ex3*hprebn*ok*", "*28 checks: 28 pass*"])


def test_a_wrong_answer_fails_at_its_tensor(pytester):
    script = write_script(pytester, solution_with("dbngain = (bnraw * dhpreact).sum(0, keepdim=True)",
                                                  "dbngain = (bnraw * dhpreact).sum(0, keepdim=True) * 1.5"))
    result = run_kit(pytester, IMPL.format(script), "-q", "-rf")
    result.assert_outcomes(passed=25, failed=1, skipped=2)
    result.stdout.fnmatch_lines(["FAILED backprop::ex1::bngain*"])


def test_unwritten_gradients_are_skipped_not_failed(pytester):
    script = write_script(pytester, "dlogprobs = torch.zeros_like(logprobs)\ndlogprobs[range(n), Yb] = -1.0 / n\n")
    result = run_kit(pytester, IMPL.format(script), "-v")
    result.assert_outcomes(passed=1, skipped=27)
    result.stdout.fnmatch_lines(["*::probs SKIPPED (dprobs: not attempted: no dprobs yet)*",
                                 "*1 pass, 0 fail (0 of them inherited), 0 error, 27 skipped*"])
    assert result.ret == 0


def test_backprop_without_implementation_is_a_usage_error(pytester):
    result = run_kit(pytester)
    assert result.ret == 4  # pytest's usage error
    result.stderr.fnmatch_lines(["*--backprop-impl=*", "*backprop_impl*"])


def test_implementation_from_the_ini_file_and_k_selection(pytester, ex1_solution):
    pytester.makeini(f"[pytest]\nbackprop_impl = {ex1_solution}\n")
    result = run_kit(pytester, "-q", "-k", "counts_sum_inv or b1")
    result.assert_outcomes(passed=2, deselected=26)


def test_header_names_dataset_seed_dtype_rule_and_implementation(pytester, ex1_solution):
    result = run_kit(pytester, IMPL.format(ex1_solution), "--backprop-dtype=float64",
                                           "--backprop-seed=7", "--co")
    result.stdout.fnmatch_lines([
        "backprop: dataset embedded*(5163 words), seed 7, dtype float64",
        "backprop: tolerance rule: no worse than 10x*",
        f"backprop: implementation {ex1_solution}*",
    ])


def test_json_report_follows_the_contract(pytester):
    script = write_script(pytester, solution_with("dprobs = (1.0 / probs) * dlogprobs", "dprobs = probs"))
    out = pytester.path / "report.json"
    run_kit(pytester, IMPL.format(script), f"--backprop-json={out}", "-q")
    data = json.loads(out.read_text())
    assert data["implementation"] == str(script)
    assert data["dataset"]["words"] == 5163 and data["dataset"]["source"].startswith("embedded")
    assert data["seed"] == 2147483647 and data["dtype"] == "float32"
    assert data["problem"] == {"name": "makemore MLP (the lecture)", "origin": "reference_model.model"}
    assert [c["tensor"] for c in data["checks"]][:3] == ["logprobs", "probs", "counts_sum_inv"]
    logprobs, probs = data["checks"][0], data["checks"][1]
    assert logprobs == {**logprobs, "exercise": "ex1", "status": "pass", "exact": True, "approximate": True,
                        "expected_shape": [32, 27], "actual_shape": [32, 27]}
    assert logprobs["diagnosis"]["code"] == "ok"
    assert probs["status"] == "fail" and probs["approximate"] is False and probs["maxdiff"] > 0
    assert set(probs["diagnosis"]) == {"code", "message"}
    assert isinstance(data["warnings"], list)


def test_a_crash_is_an_error_with_location_and_earlier_gradients_still_checked(pytester):
    source = solution_with("dcounts = counts_sum_inv * dprobs", "raise ValueError('oops')")
    script = write_script(pytester, source)
    line = source.splitlines().index("raise ValueError('oops')") + 1
    result = run_kit(pytester, IMPL.format(script), "-q", "--backprop-json=out.json")
    # the statement that raised assigns no gradient: a warning at its line; dcounts' `+=` then raises
    # (dcounts was never assigned): its own error; the rest is graded on a re-run past the raise
    result.stdout.fnmatch_lines([f"*warning [[]statement_error[]]: your code raised ValueError: oops at student.py:{line}*"])
    checks = {c["tensor"]: c for c in json.loads((pytester.path / "out.json").read_text())["checks"] if c["exercise"] == "ex1"}
    assert [t for t, c in checks.items() if c["status"] == "error"] == ["counts"]
    assert all(checks[t]["status"] == "pass" for t in ("logprobs", "probs", "counts_sum_inv", "counts_sum"))
    assert checks["norm_logits"]["diagnosis"]["code"] == "inherited" and checks["C"]["diagnosis"]["code"] == "inherited"


def test_plugin_off_imports_no_torch(pytester):
    pytester.makepyfile(test_plain="""
        import sys
        def test_nothing_heavy():
            assert "torch" not in sys.modules
            assert not any(m.startswith(("reference_model", "pytest_backprop.checks")) for m in sys.modules)
    """)
    result = pytester.runpytest_subprocess("-q", "-p", "backprop")
    result.assert_outcomes(passed=1)


def test_with_backprop_the_libraries_objects_are_frozen_after_collection(pytester, ex1_solution):
    """Once torch is loaded the plugin calls gc.freeze() (full collections then skip torch's objects);
    the user's own tests see it collected as usual. Off, nothing is frozen."""
    pytester.makepyfile(test_gc="""
        import gc
        def test_freeze_count():
            print("FROZEN", gc.get_freeze_count())
    """)
    on = pytester.runpytest_subprocess("-q", "-s", "--backprop", f"--backprop-impl={ex1_solution}",
                                       "--backprop-examples=0", "--backprop-steps=0", "test_gc.py")
    off = pytester.runpytest_subprocess("-q", "-s", "test_gc.py")
    frozen = {name: int(next(line for line in r.outlines if line.startswith("FROZEN") or "FROZEN" in line)
                        .split("FROZEN")[1].split()[0]) for name, r in (("on", on), ("off", off))}
    assert frozen["on"] > 10_000 and frozen["off"] == 0, frozen


def test_fixtures_work_without_backprop_and_can_be_overridden(pytester):
    pytester.makeconftest("""
        import pytest
        @pytest.fixture(scope="session")
        def makemore_config():
            from reference_model.model import Config
            return Config(n_hidden=16, batch_size=8)
    """)
    pytester.makepyfile(test_kit="""
        import torch
        from pytest_backprop import assert_grad_matches

        def test_forward(makemore_forward, makemore_params, makemore_batch):
            f = makemore_forward
            assert f.n == 8 and f["h"].shape == (8, 16)
            assert makemore_params["W1"].shape == (30, 16)
            dlogprobs = torch.zeros_like(f["logprobs"])
            dlogprobs[range(f.n), f.Yb] = -1.0 / f.n
            assert_grad_matches(dlogprobs, f["logprobs"], name="logprobs")

        def test_wrong(makemore_forward):
            f = makemore_forward
            assert_grad_matches(torch.zeros_like(f["logprobs"]), f["logprobs"], name="logprobs")
    """)
    result = run_inprocess(pytester, "-q")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*dlogprobs: 8 of 216 elements*"])


def test_float64_run_and_names_file_from_the_rootdir(pytester, ex1_solution):
    words = ["emma", "olivia", "ava", "isabella", "sophia", "charlotte", "mia", "amelia", "harper", "evelyn"] * 10
    (pytester.path / "names.txt").write_text("\n".join(words) + "\n")
    result = run_kit(pytester, IMPL.format(ex1_solution), "--backprop-dtype=float64", "-q")
    result.assert_outcomes(passed=26, skipped=2)
    result.stdout.fnmatch_lines(["*28 checks: 26 pass*"])
    header = run_kit(pytester, IMPL.format(ex1_solution), "--co")
    header.stdout.fnmatch_lines(["backprop: dataset *names.txt (100 words)*", "collected 28 items"])


def test_no_header_when_off(pytester):
    pytester.makepyfile(test_plain="def test_ok():\n    pass\n")
    result = run_inprocess(pytester, )
    result.assert_outcomes(passed=1)
    assert "backprop:" not in result.stdout.str()


def test_kit_options_without_backprop_warn(pytester):
    pytester.makepyfile(test_plain="def test_ok():\n    pass\n")
    result = run_inprocess(pytester, "--backprop-json=out.json")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*--backprop-json has no effect without --backprop*"])
    assert not (pytester.path / "out.json").exists()
