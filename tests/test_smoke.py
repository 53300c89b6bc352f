"""The example solution passes all 26 gradients through the real plugin."""


def test_example_solution_passes(pytester, ex1_solution):
    result = pytester.runpytest_subprocess("--backprop", f"--backprop-impl={ex1_solution}", "-q")
    result.assert_outcomes(passed=26)
    result.stdout.fnmatch_lines(["*26 gradients: 26 pass, 0 fail*"])
