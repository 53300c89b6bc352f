"""Independent grading: every gradient graded as if the earlier ones were right (re-runs with the true
value substituted), errors charged to the statement that raised, one mistake one verdict."""

from __future__ import annotations

import textwrap

import pytest
from conftest import GRADIENTS_ONLY, run_inprocess, solution_with, write_script

from pytest_backprop.checks.independent import ancestors, grade_exercise
from pytest_backprop.problems.instance import build_problem, resolve_words
from pytest_backprop.usercode.loaders import load_implementation
from pytest_backprop.problems.lecture import GRADIENT_ORDER


@pytest.fixture(scope="module")
def problem():
    return build_problem(resolve_words(None))


def grade_source(tmp_path, problem, source: str, name: str = "student.py"):
    path = tmp_path / name
    path.write_text(source)
    graded = grade_exercise(load_implementation(str(path), tmp_path), "ex1", problem, timeout=20)
    return {v.tensor: v for v in graded.verdicts}, graded


def own_faults(verdicts) -> dict[str, str]:
    return {t: v.diagnosis.code for t, v in verdicts.items() if v.status in ("fail", "error")
            and v.diagnosis.code != "inherited"}


def test_ancestors_follow_the_line_graph():
    assert "probs" in ancestors("counts") and "counts_sum" in ancestors("counts")
    assert ancestors("logprobs") == frozenset()
    assert "hpreact" in ancestors("C") and "C" not in ancestors("hpreact")


def test_a_sign_error_is_one_own_fault_and_the_rest_is_inherited_measured(tmp_path, problem):
    verdicts, graded = grade_source(tmp_path, problem, solution_with("dbnmeani = (-dbndiff)", "dbnmeani = dbndiff"))
    assert own_faults(verdicts) == {"bnmeani": "sign"}
    downstream = [t for t in GRADIENT_ORDER if "bnmeani" in ancestors(t)]
    assert downstream and all(verdicts[t].diagnosis.code == "inherited" for t in downstream if verdicts[t].status != "pass")
    assert graded.runs == 2  # the run as written, and one re-run with the true dbnmeani


def test_one_rerun_at_most_per_failing_gradient(tmp_path, problem):
    source = solution_with("-1.0 / n", "-1.0").replace("(2 * bndiff)", "bndiff").replace(
        "dW1 = embcat.T @ dhprebn", "dW1 = dhprebn.T @ embcat")
    verdicts, graded = grade_source(tmp_path, problem, source)
    faults = own_faults(verdicts)
    assert set(faults) == {"logprobs", "bndiff", "W1"}
    assert graded.runs <= 1 + len(faults)


def test_a_raising_line_is_charged_to_its_own_target(tmp_path, problem):
    verdicts, _ = grade_source(tmp_path, problem, solution_with("dbnraw = bngain * dhpreact", "dbnraw = bngain.T * dhpreact"))
    assert verdicts["bnraw"].status == "error" and verdicts["bnraw"].diagnosis.code == "exception"
    assert verdicts["bnraw"].location.source == "dbnraw = bngain.T * dhpreact"
    assert verdicts["bnbias"].status == "pass"  # its line is right: never charged with the line above it
    below = [t for t in GRADIENT_ORDER if "bnraw" in ancestors(t)]
    assert all(verdicts[t].diagnosis.code == "inherited" for t in below)


def test_a_name_error_does_not_make_a_later_plus_equals_a_missing_branch(tmp_path, problem):
    source = solution_with("dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvar_inv",
                           "dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvarinv")
    verdicts, _ = grade_source(tmp_path, problem, source)
    assert verdicts["bnvar"].status == "error" and "dbnvarinv" in verdicts["bnvar"].diagnosis.message
    assert verdicts["bnvar"].location.line == source.splitlines().index(
        "dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvarinv") + 1
    assert verdicts["bndiff"].diagnosis.code in ("inherited", "ok") and verdicts["bndiff"].diagnosis.code != "missing_branch"
    assert verdicts["bnvar_inv"].status == "pass"


def test_a_plus_equals_that_raised_is_an_error_never_ok(tmp_path, problem):
    source = solution_with("dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes",
                           "dlogits += F.one_hot(logits.max(1).indices, num_classes=26) * dlogit_maxes")
    verdicts, _ = grade_source(tmp_path, problem, source)
    assert verdicts["logits"].status == "error" and verdicts["logits"].diagnosis.code == "exception"
    assert "num_classes=26" in verdicts["logits"].location.source or "num_classes=26" in verdicts["logits"].diagnosis.message


def test_an_incomplete_gradient_names_the_statement_that_did_not_run(tmp_path, problem):
    source = solution_with("dbndiff += (2 * bndiff) * dbndiff2", "print(undefined_name)\ndbndiff += (2 * bndiff) * dbndiff2")
    path = tmp_path / "s.py"
    path.write_text(source)
    impl = load_implementation(str(path), tmp_path)
    from pytest_backprop.judge.grade import verdicts_for_run

    run = impl.run("ex1", problem, 20)
    v = {x.tensor: x for x in verdicts_for_run("ex1", run, problem)}["bndiff"]
    assert v.status == "error" and "incomplete" in v.diagnosis.message and "dbndiff += (2 * bndiff) * dbndiff2" in v.diagnosis.message
    # graded independently, the run continues past the scratch line: dbndiff is right
    verdicts, graded = grade_source(tmp_path, problem, source, "t.py")
    assert verdicts["bndiff"].status == "pass" and "incomplete" in verdicts["bndiff"].details["as_written"]
    assert verdicts["hprebn"].status == "pass"
    assert any(w.code == "statement_error" and "undefined_name" in w.message for w in graded.warnings)


def test_a_gradient_used_but_not_written_yet_is_skipped_and_the_lines_using_it_graded(tmp_path, problem):
    source = solution_with("dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)\n", "")
    verdicts, graded = grade_source(tmp_path, problem, source)
    assert verdicts["counts_sum_inv"].status == "skip"
    assert verdicts["counts_sum"].status == "pass" and verdicts["C"].status == "pass"


def test_module_backward_raising_midway(tmp_path, problem):
    """backward(cache) raises at dh: the gradients it had computed are read from its frame, the error is
    charged to dh's statement, and the rest is graded on a re-run with the true dh substituted."""
    body = solution_with("dh = dlogits @ W2.T", "dh = dlogits @ W2").splitlines()
    names = ("logprobs", "probs", "counts", "counts_sum", "counts_sum_inv", "norm_logits", "logit_maxes", "logits",
             "h", "hpreact", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "emb",
             "C", "W1", "W2", "bngain", "n", "Xb", "Yb")
    source = ("import torch\nimport torch.nn.functional as F\n\n\ndef backward(cache):\n    "
              + "; ".join(f"{k} = cache['{k}']" for k in names) + "\n"
              + "\n".join("    " + ln for ln in body if ln.strip() and not ln.startswith("#"))
              + "\n    return {k[1:]: v for k, v in locals().items() if k.startswith('d')}\n")
    verdicts, graded = grade_source(tmp_path, problem, source, "mod.py")
    assert verdicts["logits"].status == "pass"  # computed before the exception
    assert verdicts["h"].status == "error" and verdicts["h"].location.source == "dh = dlogits @ W2"
    assert verdicts["W2"].status == "pass" and verdicts["C"].diagnosis.code == "inherited"
    assert graded.runs == 2


def test_per_line_chain_is_graded_independently(tmp_path, problem):
    path = tmp_path / "lines.py"
    path.write_text("from reference_model.backward_lines import *\n" + textwrap.dedent("""
        def backward_probs(dprobs, counts, counts_sum_inv):
            return {"counts": 2 * counts_sum_inv * dprobs, "counts_sum_inv": (counts * dprobs).sum(1, keepdim=True)}
    """))
    graded = grade_exercise(load_implementation(str(path), tmp_path), "ex1", problem, timeout=20)
    verdicts = {v.tensor: v for v in graded.verdicts}
    assert own_faults(verdicts) == {"counts": verdicts["counts"].diagnosis.code}
    assert verdicts["norm_logits"].diagnosis.code == "inherited" and graded.runs == 2


def test_inherited_failures_are_one_line_in_the_terminal(pytester):
    script = write_script(pytester, solution_with("dprobs = (1.0 / probs) * dlogprobs", "dprobs = -(1.0 / probs) * dlogprobs"))
    result = run_inprocess(pytester, *GRADIENTS_ONLY, f"--backprop-impl={script}")
    text = result.stdout.str()
    failures = text[text.index("= FAILURES ="):text.index("backprop: gradients vs autograd")]
    inherited = [ln for ln in failures.splitlines() if "[inherited]" in ln]
    assert len(inherited) >= 20
    assert len(failures.splitlines()) <= 2 * len(inherited) + 12  # a header and one line each, one full block
    assert f"fail ({len(inherited)} of them inherited)" in text
