"""The mutation suite: single edits of a correct Exercise 1 solution, one classic mistake each.

Each mistake must be blamed on the right gradient (the first own-fault one in backward order,
what the terminal summary names) with the right hint code, and every other failing gradient
must be ``inherited`` from it. Edits that are not mistakes (an equivalent expression, scribbling
over forward tensors after using them, dropping the max branch whose true gradient is ~0) must
pass every gradient, with at most a warning. Runs are in-process (about 0.1 s each); a few
subprocess tests check that the hints reach the terminal, the failing item and the JSON report.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_inprocess, solution_with, write_script

from pytest_backprop.checks.independent import grade_exercise
from pytest_backprop.judge.grade import verdicts_for_run
from pytest_backprop.problems.instance import build_problem
from pytest_backprop.report.text import first_wrong
from pytest_backprop.usercode.modules import ScriptImplementation
from reference_model.data import load_words

LOOP = "for k in range(Xb.shape[0]):"
MAX_BRANCH = "dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes"


@pytest.fixture(scope="module")
def problem():
    """The lecture's problem on the embedded names, built once for the module."""
    return build_problem(load_words(None))


@pytest.fixture
def run(problem, tmp_path):
    """Run a script source in-process and return (verdicts, warnings)."""

    def _run(source: str):
        path = tmp_path / "student.py"
        path.write_text(source)
        graded = grade_exercise(ScriptImplementation(path), "ex1", problem, timeout=None)
        return graded.verdicts, graded.warnings

    return _run


# (edit from, edit to, blamed gradient, hint code, words the hint must contain)
MISTAKES = [
    pytest.param("dcounts += torch.ones_like", "dcounts = torch.ones_like", "counts", "missing_branch",
                 "also used in `probs = counts * counts_sum_inv`: did you forget `+=`?",
                 id="counts-forgot-plus-equals"),
    pytest.param("dcounts += torch.ones_like(counts) * dcounts_sum", "pass", "counts", "missing_branch",
                 "also used in `counts_sum = counts.sum(1, keepdims=True)`: did you forget `+=`?",
                 id="counts-sum-branch-dropped"),
    pytest.param("dbndiff += (2", "dbndiff = (2", "bndiff", "missing_branch", "`bnraw = bndiff * bnvar_inv`",
                 id="bndiff-forgot-plus-equals"),
    pytest.param("dbndiff += (2 * bndiff) * dbndiff2", "pass", "bndiff", "missing_branch", "`bndiff2 = bndiff**2`",
                 id="bndiff-square-branch-dropped"),
    pytest.param("dhprebn += 1.0", "dhprebn = 1.0", "hprebn", "missing_branch", "`bndiff = hprebn - bnmeani`",
                 id="hprebn-forgot-plus-equals"),
    pytest.param("dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)", "pass", "hprebn", "missing_branch",
                 "`bnmeani = 1/n*hprebn.sum(0, keepdim=True)`", id="hprebn-mean-branch-dropped"),
    pytest.param("dC[ix] += demb[k, j]", "dC[ix] = demb[k, j]", "C", "missing_branch", "`dC[ix] += demb[k, j]`",
                 id="dC-forgot-plus-equals"),
    pytest.param(LOOP, "dC[Xb] += demb\nfor k in range(0):", "C", "missing_branch", "several times",
                 id="dC-advanced-indexing-plus-equals"),
    pytest.param(LOOP, "for k in range(Xb.shape[0] - 1):", "C", "loop_range",
                 "lacks exactly the contributions of batch row 31 (the last of 32) of Xb", id="dC-loop-stops-one-row-early"),
    pytest.param(LOOP, "for k in range(1, Xb.shape[0]):", "C", "loop_range", "batch row 0 (the first of 32)",
                 id="dC-loop-starts-at-1"),
    pytest.param("for j in range(Xb.shape[1]):", "for j in range(Xb.shape[1] - 1):", "C", "loop_range",
                 "context position 2 (the last of 3)", id="dC-inner-loop-stops-early"),
    pytest.param(MAX_BRANCH, MAX_BRANCH.replace("dlogits +=", "dlogits ="), "logits", "lost_branch",
                 "not the main one, through `norm_logits = logits - logit_maxes`", id="dlogits-max-branch-overwrites"),
    pytest.param("dhprebn = dbndiff.clone()", "dhprebn = dbndiff", "bndiff", "aliased", "dhprebn = dbndiff.clone()",
                 id="dhprebn-aliases-dbndiff"),
    pytest.param("(1.0 / (n - 1))", "(1.0 / n)", "bndiff2", "scale", "1/n where Bessel's correction needs 1/(n-1)",
                 id="bessel-1-over-n"),
    pytest.param("1.0 / n * (torch.ones_like(hprebn)", "1.0 / (n - 1) * (torch.ones_like(hprebn)", "hprebn", "scale",
                 "n/(n-1)", id="mean-with-bessel"),
    pytest.param("(2 * bndiff)", "bndiff", "bndiff", "scale", "factor 2 is missing", id="square-factor-2-missing"),
    pytest.param("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0", "logprobs", "scale",
                 "1/n is missing (n = 32): the 1/n of the mean in `loss = -logprobs[range(n), Yb].mean()`",
                 id="logprobs-mean-forgotten"),
    pytest.param("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0 / (n - 1)", "logprobs", "scale",
                 "1/(n-1) where the mean needs 1/n? (n = 32) (`loss = -logprobs[range(n), Yb].mean()`)",
                 id="logprobs-mean-with-bessel"),
    pytest.param("dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)",
                 "dhprebn += (torch.ones_like(hprebn) * dbnmeani)", "hprebn", "scale",
                 "the contribution through `bnmeani = 1/n*hprebn.sum(0, keepdim=True)` is n × what it should be: a "
                 "factor 1/n is missing (n = 32): the 1/n of the mean in `bnmeani = 1/n*hprebn.sum(0, keepdim=True)`",
                 id="hprebn-mean-1-over-n-forgotten"),
    pytest.param("dhpreact = (1.0 - h**2) * dh", "dhpreact = 2 * (1.0 - h**2) * dh", "hpreact", "scale", "2 ×",
                 id="tanh-extra-2"),
    pytest.param("dbnbias = dhpreact.sum(0, keepdim=True)", "dbnbias = dhpreact.sum(0)", "bnbias", "keepdim",
                 "keepdim=True", id="bnbias-missing-keepdim"),
    pytest.param("db1 = dhprebn.sum(0)", "db1 = dhprebn.sum(0, keepdim=True)", "b1", "keepdim", "drop the size-1",
                 id="b1-extra-keepdim"),
    pytest.param("dbnbias = dhpreact.sum(0, keepdim=True)", "dbnbias = dhpreact", "bnbias", "unreduced",
                 "`hpreact = bngain * bnraw + bnbias`", id="bnbias-not-summed"),
    pytest.param("dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)", "dcounts_sum_inv = counts * dprobs",
                 "counts_sum_inv", "unreduced", "sum over dim 1 with keepdim=True", id="counts-sum-inv-not-summed"),
    pytest.param("dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)", "dbnvar_inv = bndiff * dbnraw", "bnvar_inv",
                 "unreduced", "`bnraw = bndiff * bnvar_inv`", id="bnvar-inv-not-summed"),
    pytest.param("dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)",
                 "dcounts_sum_inv = (counts * dprobs).sum(0, keepdim=True)", "counts_sum_inv", "shape",
                 "sum over dim 1, not dim 0", id="counts-sum-inv-wrong-dim"),
    pytest.param("dbngain = (bnraw * dhpreact).sum(0, keepdim=True)",
                 "dbngain = (bnraw * dhpreact).sum(1, keepdim=True)",
                 "bngain", "shape", "sum over dim 0, not dim 1", id="bngain-wrong-dim"),
    pytest.param("db2 = dlogits.sum(0)", "db2 = dlogits.sum(1)", "b2", "shape", "dim 0: 32 vs 27", id="b2-wrong-dim"),
    pytest.param("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h", "W2", "transposed", "dW = X.T @ dY",
                 id="W2-transposed"),
    pytest.param("dW1 = embcat.T @ dhprebn", "dW1 = dhprebn.T @ embcat", "W1", "transposed", "embcat @ W1",
                 id="W1-transposed"),
    pytest.param("dembcat = dhprebn @ W1.T", "dembcat = (W1 @ dhprebn.T)", "embcat", "transposed", ".T",
                 id="embcat-transposed"),
    pytest.param("dcounts_sum = (-counts_sum**-2)", "dcounts_sum = (counts_sum**-2)", "counts_sum", "sign",
                 "`counts_sum_inv = counts_sum**-1`", id="counts-sum-sign"),
    pytest.param("dbnmeani = (-dbndiff)", "dbnmeani = dbndiff", "bnmeani", "sign", "`bndiff = hprebn - bnmeani`",
                 id="bnmeani-sign"),
    pytest.param("dbnvar = (-0.5", "dbnvar = (0.5", "bnvar", "sign", "minus sign", id="bnvar-sign"),
    pytest.param("dhpreact = (1.0 - h**2) * dh", "dhpreact = (1.0 - h) * dh", "hpreact", "mismatch", "differ",
                 id="tanh-derivative-wrong"),
    pytest.param("dprobs = (1.0 / probs)", "dprobs = (1.0 / (probs - probs))", "probs", "nonfinite", "division by zero",
                 id="division-by-zero"),
]


def _failing(verdicts):
    return [v for v in verdicts if v.status == "fail"]


@pytest.mark.parametrize("edit_from, edit_to, blamed, code, words", MISTAKES)
def test_mistake_is_blamed(run, edit_from, edit_to, blamed, code, words):
    verdicts, _ = run(solution_with(edit_from, edit_to))
    wrong = first_wrong(verdicts)
    assert wrong is not None, "the mistake went unnoticed"
    assert (wrong.tensor, wrong.diagnosis.code) == (blamed, code), wrong.diagnosis.message
    assert words in wrong.diagnosis.message
    for v in _failing(verdicts):
        if v.tensor != blamed:
            assert v.diagnosis.code == "inherited", (v.tensor, v.diagnosis)
            assert v.details["inherited_from"] == blamed
            assert f"fix d{blamed} first" in v.diagnosis.message
    assert not [v for v in verdicts if v.status == "error"]


def test_mistakes_cover_the_suite():
    assert len(MISTAKES) >= 25
    codes = {p.values[3] for p in MISTAKES}
    assert {"missing_branch", "lost_branch", "loop_range", "aliased", "scale", "sign", "keepdim", "unreduced",
            "transposed", "shape"} <= codes


@pytest.mark.parametrize("edit_from, edit_to, blamed, quoted, not_quoted", [
    pytest.param("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0 / (n - 1)", "logprobs",
                 "loss = -logprobs", "bnmeani", id="logprobs-n-over-n-minus-1"),
    pytest.param("dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)",
                 "dhprebn += (torch.ones_like(hprebn) * dbnmeani)", "hprebn", "bnmeani = 1/n", "loss =",
                 id="hprebn-missing-1-over-n"),
    pytest.param("(1.0 / (n - 1))", "(1.0 / n)", "bndiff2", "bnvar = 1/(n-1)", "bnmeani", id="bessel"),
])
def test_scale_hints_quote_the_line_of_their_factor(run, edit_from, edit_to, blamed, quoted, not_quoted):
    """The line a scale hint quotes is the one on that gradient's path holding the factor, never a fixed one."""
    wrong = first_wrong(run(solution_with(edit_from, edit_to))[0])
    assert (wrong.tensor, wrong.diagnosis.code) == (blamed, "scale")
    assert quoted in wrong.diagnosis.message and not_quoted not in wrong.diagnosis.message


def test_a_scale_without_such_a_factor_on_the_path_claims_no_line(problem):
    """dlogits (n-1)/n: there is no Bessel correction between logits and the loss, so no Bessel hint."""
    from pytest_backprop.judge.compare import compare
    from pytest_backprop.judge.diagnose import diagnose

    hint = diagnose("logits", compare(problem.grads["logits"] * 31 / 32, problem.grads["logits"]), n=32)
    assert hint.code == "scale" and "(n-1)/n" in hint.message
    assert "Bessel" not in hint.message and "bnvar" not in hint.message


def test_loop_stopping_early_is_never_a_forgotten_plus_equals(problem, tmp_path):
    """Whatever the batch, a dC loop that skips the last row is loop_range, even when every row it
    leaves wrong is one that Xb repeats (where a missing `+=` would show too)."""
    import torch

    from pytest_backprop.problems.instance import problem_from_batch
    from reference_model.model import Config, params_only

    config = Config(vocab_size=4, n_embd=3, n_hidden=5, block_size=3, batch_size=8)
    g = torch.Generator().manual_seed(11)
    Xb = torch.randint(0, 2, (8, 3), generator=g)  # two characters only: every row of C is repeated
    Yb = torch.randint(0, 4, (8,), generator=g)
    small = problem_from_batch(config, params_only(config), Xb, Yb)
    path = tmp_path / "student.py"
    path.write_text(solution_with(LOOP, "for k in range(Xb.shape[0] - 1):"))
    verdicts = grade_exercise(ScriptImplementation(path), "ex1", small, None).verdicts
    wrong = first_wrong(verdicts)
    assert (wrong.tensor, wrong.diagnosis.code) == ("C", "loop_range")
    assert "batch row 7 (the last of 8)" in wrong.diagnosis.message and "+=" not in wrong.diagnosis.message


def test_inherited_chain_is_complete(run):
    """Forgetting `+=` on dcounts makes everything below it wrong, and all of it inherited."""
    verdicts, _ = run(solution_with("dcounts += torch.ones_like", "dcounts = torch.ones_like"))
    failing = [v.tensor for v in _failing(verdicts)]
    assert failing[0] == "counts" and "C" in failing and "W1" in failing
    by_name = {v.tensor: v for v in verdicts}
    assert "dnorm_logits" in by_name["logit_maxes"].diagnosis.message  # names the wrong upstream gradient


def test_transposed_then_crash(run):
    """dh transposed: blamed, and the crash it causes on the next line is reported as an exception."""
    verdicts, _ = run(solution_with("dh = dlogits @ W2.T", "dh = W2 @ dlogits.T"))
    wrong = first_wrong(verdicts)
    assert (wrong.tensor, wrong.diagnosis.code) == ("h", "transposed")
    by_name = {v.tensor: v for v in verdicts}
    # as written, dhpreact's line raises (dh has the wrong shape); graded with the true dh it is right
    assert by_name["hpreact"].diagnosis.code == "inherited" and by_name["hpreact"].details["as_written"] == "exception"
    assert by_name["hpreact"].details["inherited_from"] == "h"
    assert {by_name[t].diagnosis.code for t in ("bnraw", "hprebn", "W1", "C")} == {"inherited"}


def test_keepdim_upstream_makes_downstream_inherited(run):
    """dcounts_sum_inv without keepdim: (32,) broadcasts to (32, 32) in dcounts_sum, which is inherited."""
    verdicts, _ = run(solution_with("dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)",
                                    "dcounts_sum_inv = (counts * dprobs).sum(1)"))
    by_name = {v.tensor: v for v in verdicts}
    assert by_name["counts_sum_inv"].diagnosis.code == "keepdim"
    assert by_name["counts_sum"].diagnosis.code == "inherited"
    assert first_wrong(verdicts).tensor == "counts_sum_inv"


def test_own_mistake_below_an_inherited_one_is_still_found(run):
    """Two mistakes: the mean's 1/n forgotten, and `+=` forgotten on dcounts. dcounts is wrong beyond
    what the wrong upstream explains, so it is diagnosed on its own (missing_branch), not inherited."""
    source = solution_with("-1.0 / n", "-1.0").replace("dcounts += torch.ones_like", "dcounts = torch.ones_like")
    verdicts, _ = run(source)
    by_name = {v.tensor: v for v in verdicts}
    assert by_name["logprobs"].diagnosis.code == "scale"
    assert by_name["probs"].diagnosis.code == "inherited"
    assert by_name["counts"].diagnosis.code == "missing_branch"
    assert by_name["norm_logits"].diagnosis.code == "inherited"
    assert by_name["norm_logits"].details["inherited_from"] == "counts"
    assert by_name["counts_sum"].details["inherited_from"] == "logprobs"


# (edit from, edit to, the warning codes it must raise)
HARMLESS = [
    pytest.param("(1.0 - h**2)", "(1.0 - torch.tanh(hpreact)**2)", set(), id="tanh-derivative-from-hpreact"),
    pytest.param("dprobs = (1.0 / probs) * dlogprobs", "dprobs = dlogprobs / probs", set(), id="divide-instead"),
    pytest.param(MAX_BRANCH, "pass", set(), id="max-branch-dropped"),
    pytest.param("dlogits = dnorm_logits.clone()", "dlogits = dnorm_logits", set(), id="dlogits-aliases-noise-only"),
    pytest.param("dlogit_maxes = (-dnorm_logits)", "dlogit_maxes = (dnorm_logits)", set(), id="logit-maxes-sign-noise"),
    pytest.param("db1 = dhprebn.sum(0)", "db1 = torch.zeros_like(b1)", set(), id="db1-zero"),
    pytest.param(LOOP, "dC.index_add_(0, Xb.view(-1), demb.view(-1, demb.shape[2]))\nfor k in range(0):", set(),
                 id="dC-index-add"),
    pytest.param("dC = torch.zeros_like(C)", "dC = torch.zeros_like(C)\nh.zero_(); counts.fill_(7.0); logits += 1",
                 {"mutated_input"}, id="scribble-after-use"),
    pytest.param("db1 = dhprebn.sum(0)", "db1 = dhprebn.sum(0)\nfor n in range(3):\n    pass", {"reassigned_name"},
                 id="n-clobbered-after-use"),
]


@pytest.mark.parametrize("edit_from, edit_to, warned", HARMLESS)
def test_harmless_edit_passes(run, edit_from, edit_to, warned):
    verdicts, warnings = run(solution_with(edit_from, edit_to))
    bad = [(v.tensor, v.diagnosis.code, v.diagnosis.message) for v in verdicts if v.status != "pass"]
    assert bad == []
    assert {w.code for w in warnings} == warned


def test_scribbling_before_use_fails_and_warns(run):
    """The counterpart of scribble-after-use: zeroing h before dhpreact reads it is a real mistake."""
    verdicts, warnings = run(solution_with("dhpreact = (1.0 - h**2) * dh", "h.zero_()\ndhpreact = (1.0 - h**2) * dh"))
    assert first_wrong(verdicts).tensor == "hpreact"
    assert "mutated_input" in {w.code for w in warnings}


@pytest.mark.parametrize("edit_from, edit_to, blamed, code", [
    pytest.param("dprobs = (1.0 / probs) * dlogprobs", "dprobs = ((1.0 / probs) * dlogprobs).numpy()", "probs", "type",
                 id="numpy-answer", marks=pytest.mark.filterwarnings("ignore::DeprecationWarning")),
    pytest.param("dbnvar = (-0.5", "dbnvar = 0 * (-0.5", "bnvar", "mismatch", id="zero-answer"),
    pytest.param("dbnraw = bngain * dhpreact", "dbnraw = (bngain * dhpreact).double()", "bnraw", "type",
                 id="float64-answer"),
    pytest.param("dh = dlogits @ W2.T", "dh = (dlogits @ W2.T).sum()", "h", "shape", id="scalar-answer"),
])
def test_odd_answers_get_a_verdict_not_a_crash(run, edit_from, edit_to, blamed, code):
    verdicts, _ = run(solution_with(edit_from, edit_to))
    wrong = first_wrong(verdicts)
    assert (wrong.tensor, wrong.diagnosis.code) == (blamed, code), wrong.diagnosis.message
    assert all("blame_error" not in v.details for v in verdicts)
    later = [v for v in verdicts if v.status == "fail" and v.tensor != blamed]
    assert all(v.diagnosis.code == "inherited" for v in later), [(v.tensor, v.diagnosis.code) for v in later]


def test_exercise2_scale_hint_names_n(problem, tmp_path):
    """Outside Exercise 1 there is no blame, but the single-comparison hints still name n."""
    from pytest_backprop.usercode.modules import ModuleImplementation

    path = tmp_path / "student_ex2.py"
    path.write_text("import torch.nn.functional as F\n\n"
                    "def cross_entropy_backward(logits, Yb, n):\n"
                    "    dlogits = F.softmax(logits, 1)\n"
                    "    dlogits[range(n), Yb] -= 1\n"
                    "    return dlogits\n")
    result = ModuleImplementation(str(path), path).run("ex2", problem, timeout=None)
    (verdict,) = verdicts_for_run("ex2", result, problem)
    assert verdict.diagnosis.code == "scale"
    assert "1/n is missing" in verdict.diagnosis.message


# ---- end to end: the hints reach the terminal summary, the failing item and the JSON report ----
# Only the Exercise 1 items (no property checks, no other exercises): quick, and counts that stay put.
ARGS = ("--backprop", "--backprop-examples=0", "-k", "ex1")


def test_hint_in_terminal_item_and_json(pytester):
    script = write_script(pytester, solution_with("(1.0 / (n - 1))", "(1.0 / n)"))
    result = run_inprocess(pytester, *ARGS, f"--backprop-impl={script}", "--backprop-json=out.json")
    result.assert_outcomes(passed=19, failed=7)
    result.stdout.fnmatch_lines([
        "*dbndiff2 [[]scale[]]: dbndiff2 is (n-1)/n × the true gradient: "
        "1/n where Bessel's correction needs 1/(n-1)?*",
        "*first wrong gradient: dbndiff2 (ex1) [[]scale[]]*",
        "*your line: student.py:*: dbndiff2 = (1.0 / n) * torch.ones_like(bndiff2) * dbnvar*",
        "*backprop through: bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)*",
    ])
    assert "first wrong gradient: dbndiff " not in result.stdout.str()
    data = json.loads((pytester.path / "out.json").read_text())
    checks_ = {c["tensor"]: c for c in data["checks"]}
    assert checks_["bndiff2"]["diagnosis"]["code"] == "scale"
    assert "Bessel" in checks_["bndiff2"]["diagnosis"]["message"]
    assert checks_["bndiff"]["diagnosis"]["code"] == "inherited"
    assert checks_["bndiff"]["details"]["inherited_from"] == "bndiff2"


def test_aliased_end_to_end(pytester):
    script = write_script(pytester, solution_with("dhprebn = dbndiff.clone()", "dhprebn = dbndiff"))
    result = run_inprocess(pytester, *ARGS, f"--backprop-impl={script}")
    result.assert_outcomes(passed=25, failed=1)
    result.stdout.fnmatch_lines(["*first wrong gradient: dbndiff (ex1) [[]aliased[]]*",
                                 "*Write `dhprebn = dbndiff.clone()`*"])


@pytest.fixture(scope="module")
def small_problem():
    """A different network and batch size (n = 5), so that nothing depends on the lecture's 32."""
    import torch

    from pytest_backprop.problems.instance import problem_from_batch
    from reference_model.model import Config, params_only

    config = Config(vocab_size=7, n_embd=3, n_hidden=6, block_size=2, batch_size=5, seed=3)
    g = torch.Generator().manual_seed(5)
    Xb = torch.randint(0, config.vocab_size, (config.batch_size, config.block_size), generator=g)
    Yb = torch.randint(0, config.vocab_size, (config.batch_size,), generator=g)
    return problem_from_batch(config, params_only(config), Xb, Yb)


@pytest.mark.parametrize("edit_from, edit_to, blamed, code, words", [
    pytest.param("(1.0 / (n - 1))", "(1.0 / n)", "bndiff2", "scale", "(n-1)/n × the true gradient: 1/n where "
                 "Bessel's correction needs 1/(n-1)? (n = 5)", id="bessel"),
    pytest.param("dcounts += torch.ones_like", "dcounts = torch.ones_like", "counts", "missing_branch", "`+=`",
                 id="counts-forgot-plus-equals"),
    pytest.param("dhprebn = dbndiff.clone()", "dhprebn = dbndiff", "bndiff", "aliased", ".clone()", id="aliased"),
    pytest.param("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0", "logprobs", "scale",
                 "(n = 5)", id="mean-forgotten"),
    pytest.param(LOOP, "for k in range(Xb.shape[0] - 1):", "C", "loop_range", "batch row 4 (the last of 5)",
                 id="loop-stops-early"),
    pytest.param(MAX_BRANCH, MAX_BRANCH.replace("dlogits +=", "dlogits ="), "logits", "lost_branch",
                 "`norm_logits = logits - logit_maxes`", id="dlogits-overwritten"),
])
def test_blame_on_other_sizes(small_problem, tmp_path, edit_from, edit_to, blamed, code, words):
    path = tmp_path / "student.py"
    path.write_text(solution_with(edit_from, edit_to))
    verdicts = grade_exercise(ScriptImplementation(path), "ex1", small_problem, None).verdicts
    wrong = first_wrong(verdicts)
    assert (wrong.tensor, wrong.diagnosis.code) == (blamed, code), wrong.diagnosis.message
    assert words in wrong.diagnosis.message
    assert all(v.diagnosis.code == "inherited" for v in _failing(verdicts) if v.tensor != blamed)


def test_a_shared_view_with_its_own_mistake_is_not_aliased(run):
    """demb is a view of dembcat (legitimately); doubling dembcat in place is a scale mistake."""
    verdicts, _ = run(solution_with("demb = dembcat.view(emb.shape)", "demb = dembcat.view(emb.shape)\ndembcat *= 2"))
    wrong = first_wrong(verdicts)
    assert (wrong.tensor, wrong.diagnosis.code) == ("embcat", "scale")
    assert {v.tensor: v.diagnosis.code for v in verdicts}["emb"] == "inherited"


def test_two_names_for_one_wrong_tensor(run):
    """`dhprebn = dbndiff` and a wrong `+=` after it: dbndiff holds nobody's right answer, but the
    in-place update through the second name is still the first thing to fix."""
    verdicts, _ = run(solution_with("dhprebn = dbndiff.clone()", "dhprebn = dbndiff").replace(
        "dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)", "dhprebn += 1.0 / n * (torch.ones_like(hprebn))"))
    wrong = first_wrong(verdicts)
    assert (wrong.tensor, wrong.diagnosis.code) == ("bndiff", "aliased")
