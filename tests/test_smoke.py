"""The example solution passes every built-in check at default settings, through the real plugin."""


def test_example_solution_passes(pytester, ex1_solution):
    result = pytester.runpytest_subprocess("--backprop", f"--backprop-impl={ex1_solution}", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("error", 0) == 0
    assert outcomes["passed"] >= 26  # 26 gradients, plus the property and Exercise-4 checks
    assert result.ret == 0
    result.stdout.fnmatch_lines(["ex1      logprobs*ok", "ex1      C * ok", "* checks: * pass, 0 fail (0 of them inherited), 0 error, 2 skipped", "ex2 skipped: *", "ex3 skipped: *"])
