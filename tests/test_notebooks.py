"""Notebooks as students write them: detection of exercise cells, renamed variables, shadowed n,
copied .grad, syntax errors, tags, magics, constants of earlier cells, locations ``cell N, line M``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pytest_backprop.judge.grade import verdicts_for_run
from pytest_backprop.problems.instance import build_problem, resolve_words
from pytest_backprop.usercode.loaders import load_implementation
from pytest_backprop.usercode.notebook import NotebookImplementation, strip_magics
from conftest import run_inprocess

_spec = importlib.util.spec_from_file_location("backprop_test_notebooks", Path(__file__).parent / "data" / "notebooks.py")
nbdata = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbdata)

# Cell positions of nbdata.lecture_notebook() (1-based, the markdown title is cell 1).
EX1, CMP, EX2, EX3 = 9, 10, 11, 12


@pytest.fixture(scope="module")
def problem():
    return build_problem(resolve_words(None))


def load(tmp_path: Path, nb, name: str = "student.ipynb") -> NotebookImplementation:
    impl = load_implementation(str(nbdata.write(nb, tmp_path / name)), tmp_path)
    assert isinstance(impl, NotebookImplementation)
    return impl


def verdicts(impl, problem, exercise: str = "ex1", timeout: float | None = 10):
    run = impl.run(exercise, problem, timeout)
    return run, {v.tensor: v for v in verdicts_for_run(exercise, run, problem)}


def test_lecture_layout_detects_exercise_cells_and_passes(tmp_path, problem):
    impl = load(tmp_path, nbdata.lecture_notebook())
    assert impl.exercises() == ("ex1", "ex2", "ex3")
    assert impl.cells_of("ex1") == [EX1, CMP] and impl.cells_of("ex2") == [EX2] and impl.cells_of("ex3") == [EX3]
    for ex in impl.exercises():  # the training and plotting cells raise if run: they must not be
        run, vs = verdicts(impl, problem, ex)
        assert run.error is None, run.error
        assert {v.status for v in vs.values()} == {"pass"}, ex


def test_wrong_exercise_2_fails_only_exercise_2(tmp_path, problem):
    impl = load(tmp_path, nbdata.lecture_notebook(ex2=nbdata.EX2.replace("dlogits /= n", "")))
    assert verdicts(impl, problem, "ex2")[1]["logits"].status == "fail"
    assert verdicts(impl, problem, "ex3")[1]["hprebn"].status == "pass"
    assert all(v.status == "pass" for v in verdicts(impl, problem, "ex1")[1].values())


def test_renamed_variables_are_checked_through_cmp(tmp_path, problem):
    impl = load(tmp_path, nbdata.renamed_notebook())
    assert impl.exercises() == ("ex1", "ex2", "ex3")
    for ex in impl.exercises():
        run, vs = verdicts(impl, problem, ex)
        assert run.error is None and {v.status for v in vs.values()} == {"pass"}, ex


def test_cmp_wins_over_a_stale_d_variable(tmp_path, problem):
    ex1 = nbdata.EX1.replace("dprobs = (1.0 / probs) * dlogprobs",
                             "dL_dprobs = (1.0 / probs) * dlogprobs\ndprobs = dL_dprobs * 2  # stale experiment")
    ex1 = ex1.replace("dcounts_sum_inv = (counts * dprobs)", "dcounts_sum_inv = (counts * dL_dprobs)")
    ex1 = ex1.replace("dcounts = counts_sum_inv * dprobs", "dcounts = counts_sum_inv * dL_dprobs")
    calls = nbdata.CMP_CALLS.replace("cmp('probs', dprobs, probs)", "cmp('probs', dL_dprobs, probs)")
    _, vs = verdicts(load(tmp_path, nbdata.lecture_notebook(ex1=ex1, cmp_calls=calls)), problem)
    assert vs["probs"].status == "pass" and vs["counts"].status == "pass"
    # without the cmp call, the stale d-variable is what the kit reads
    calls = nbdata.CMP_CALLS.replace("cmp('probs', dprobs, probs)", "")
    _, vs = verdicts(load(tmp_path, nbdata.lecture_notebook(ex1=ex1, cmp_calls=calls), "b.ipynb"), problem)
    assert vs["probs"].status == "fail"


def test_dC_loop_shadowing_n_does_not_leak_into_exercise_2(tmp_path, problem):
    ex1 = nbdata.EX1.replace("for k in range(Xb.shape[0]):", "for n in range(Xb.shape[0]):").replace(
        "ix = Xb[k,j]", "ix = Xb[n,j]").replace("dC[ix] += demb[k,j]", "dC[ix] += demb[n,j]")
    impl = load(tmp_path, nbdata.lecture_notebook(ex1=ex1))
    run, vs = verdicts(impl, problem, "ex1")
    assert all(v.status == "pass" for v in vs.values())
    assert any(w.code == "reassigned_name" and "`n`" in w.message for w in run.warnings)
    assert verdicts(impl, problem, "ex2")[1]["logits"].status == "pass"  # fresh namespace: n is 32 again


def test_copying_grad_in_a_notebook_gives_reads_autograd(tmp_path, problem):
    ex1 = nbdata.EX1.replace("dhpreact = (1.0 - h**2) * dh", "dhpreact = hpreact.grad # works in the lecture!")
    _, vs = verdicts(load(tmp_path, nbdata.lecture_notebook(ex1=ex1)), problem)
    assert vs["h"].status == "pass"
    assert vs["hpreact"].diagnosis.code == "reads_autograd"
    assert f"cell {EX1}, line 16" in vs["hpreact"].diagnosis.message
    # as written, the next line uses the None it copied: an error there, explained (graded independently,
    # that line is inherited: see test_independent.py)
    assert vs["bngain"].status == "error" and vs["bngain"].diagnosis.code == "reads_autograd"


def test_syntax_error_in_an_exercise_cell_points_at_cell_and_line(tmp_path, problem):
    first, second = nbdata.EX1.split("dh = dlogits @ W2.T\n")
    second = "dh = dlogits @ W2.T\n" + second.replace("db2 = dlogits.sum(0)", "db2 = dlogits.sum(0))")
    nb = nbdata.lecture_notebook(ex1=first)
    nb.cells.insert(EX1, nbdata.nbformat.v4.new_code_cell(second))  # cells[EX1] is position EX1 + 1
    impl = load(tmp_path, nb)
    assert impl.cells_of("ex1") == [EX1, EX1 + 1, CMP + 1]
    run, vs = verdicts(impl, problem)
    assert run.error.type == "SyntaxError" and run.error.location == f"cell {EX1 + 1}, line 3"
    assert vs["logits"].status == "pass"  # the first cell's gradients are still checked
    assert vs["h"].status == "error" and f"cell {EX1 + 1}, line 3" in vs["h"].diagnosis.message


def test_syntax_error_in_a_plotting_cell_is_ignored(tmp_path, problem):
    nb = nbdata.lecture_notebook()
    nb.cells.append(nbdata.nbformat.v4.new_code_cell("plt.plot(lossi\n"))
    run, vs = verdicts(load(tmp_path, nb), problem)
    assert run.error is None and all(v.status == "pass" for v in vs.values())


def test_runtime_error_location_is_cell_and_line(tmp_path, problem):
    ex1 = nbdata.EX1.replace("dW2 = h.T @ dlogits", "dW2 = h @ dlogits")
    run, vs = verdicts(load(tmp_path, nbdata.lecture_notebook(ex1=ex1)), problem)
    assert run.error.location == f"cell {EX1}, line 14" and run.error.source_line == "dW2 = h @ dlogits"
    assert vs["h"].status == "pass" and vs["W2"].status == "error"


def test_tags_override_detection(tmp_path, problem):
    nb = nbdata.notebook(nbdata.SETUP, ("weird = 1\n" + nbdata.EX2.replace("dlogits", "g_logits"), ["backprop:ex2"]),
                         (nbdata.EX1, ["backprop:ex1"]), (nbdata.CMP_CALLS, ["backprop:skip"]))
    impl = load(tmp_path, nb)
    assert impl.cells_of("ex2") == [3] and impl.cells_of("ex1") == [4]
    assert verdicts(impl, problem, "ex2")[1]["logits"].status == "pass"  # through its cmp call
    assert all(v.status == "pass" for v in verdicts(impl, problem, "ex1")[1].values())


def test_magics_are_skipped_and_constants_of_earlier_cells_supplied(tmp_path, problem):
    ex1 = "%time\n!echo hi\n" + nbdata.EX1.replace("-1.0/n", "-1.0/BATCH_SIZE").replace(
        "num_classes=logits.shape[1]", "num_classes=VOCAB")
    nb = nbdata.lecture_notebook(ex1=ex1, extra_before_ex1=("BATCH_SIZE = 32\nVOCAB = 26 + 1\nlr = 0.1",))
    run, vs = verdicts(load(tmp_path, nb), problem)
    assert run.error is None and all(v.status == "pass" for v in vs.values())
    assert strip_magics("!wget x\n  %time y\nn = 1") == "pass  # wget x\n  pass  # time y\nn = 1"


def test_a_cell_defining_a_name_the_exercise_uses_runs_with_it(tmp_path, problem):
    ex1 = nbdata.EX1.replace("dh = dlogits @ W2.T", "dh = dlogits @ W2_t")
    nb = nbdata.lecture_notebook(ex1=ex1, extra_before_ex1=("W2_t = W2.T.clone()",))
    impl = load(tmp_path, nb)
    assert impl.cells_of("ex1") == [9, 10, 11]  # the helper cell, then Exercise 1 and its cmp calls
    run, vs = verdicts(impl, problem)
    assert run.error is None and all(v.status == "pass" for v in vs.values())


def test_name_the_kit_cannot_supply_names_its_cell(tmp_path, problem):
    ex1 = nbdata.EX1.replace("dh = dlogits @ W2.T", "dh = dlogits @ W2_t")
    nb = nbdata.lecture_notebook(ex1=ex1, extra_before_ex1=("W2_t = W2.T.clone()\nn = 32",))  # a set-up cell
    run, vs = verdicts(load(tmp_path, nb), problem)
    assert run.error.type == "NameError" and "defined in cell 9" in run.error.message
    assert run.error.location == "cell 10, line 13"
    assert "defined in cell 9" in vs["h"].diagnosis.message


def test_notebook_without_exercise_cells_says_how_to_tag(tmp_path, problem):
    impl = load(tmp_path, nbdata.notebook(nbdata.SETUP, nbdata.DATA))
    assert impl.exercises() == ()
    for ex in ("ex1", "ex2", "ex3"):
        assert f"no Exercise {ex[2:]} cell found" in impl.missing_reason(ex) and f"backprop:{ex}" in impl.missing_reason(ex)


def test_broken_notebook_file_is_a_load_error(tmp_path):
    path = tmp_path / "broken.ipynb"
    path.write_text("{not json")
    from pytest_backprop.usercode.base import LoadError

    with pytest.raises(LoadError, match="cannot read notebook"):
        load_implementation(str(path), tmp_path)


def test_notebook_end_to_end(pytester):
    ex2 = nbdata.EX2.replace("dlogits /= n", "")
    nbdata.write(nbdata.lecture_notebook(ex2=ex2), pytester.path / "ninja.ipynb")
    result = run_inprocess(pytester, "--backprop", "--backprop-impl=ninja.ipynb", "-q", "-k", "not properties and not ex4",
                           "--backprop-json=report.json")
    assert result.parseoutcomes()["passed"] >= 27
    failed = [line for line in result.stdout.lines if line.startswith("FAILED backprop::ex")]
    assert len(failed) == 1 and failed[0].startswith("FAILED backprop::ex2::logits")
    result.stdout.re_match_lines([r".*ex2\s+logits\s.*FAIL", r".*ex3\s+hprebn\s.*ok"])
    report = json.loads((pytester.path / "report.json").read_text())
    ex2 = [c for c in report["checks"] if c["exercise"] == "ex2"]
    assert [(c["tensor"], c["status"]) for c in ex2] == [("logits", "fail")]


def test_script_with_cell_markers_gets_exercises_2_and_3(tmp_path, problem):
    parts = [nbdata.EX1, nbdata.CMP_CALLS, nbdata.EX2.replace("dlogits /= n", "dlogits /= n + 1"), nbdata.EX3,
             nbdata.TRAIN]
    source = "# a student's script\nimport torch\n" + "".join(f"# %%\n{p}\n" for p in parts)
    (tmp_path / "ninja.py").write_text(source)
    impl = load_implementation(str(tmp_path / "ninja.py"), tmp_path)
    assert isinstance(impl, NotebookImplementation) and impl.exercises() == ("ex1", "ex2", "ex3")
    assert all(v.status == "pass" for v in verdicts(impl, problem, "ex1")[1].values())
    assert verdicts(impl, problem, "ex2")[1]["logits"].status == "fail"
    assert verdicts(impl, problem, "ex3")[1]["hprebn"].status == "pass"
    # locations are the script's own lines
    bad = source.replace("dW2 = h.T @ dlogits", "dW2 = h @ dlogits")
    (tmp_path / "bad.py").write_text(bad)
    run, _ = verdicts(load_implementation(str(tmp_path / "bad.py"), tmp_path), problem)
    lineno = bad.splitlines().index("dW2 = h @ dlogits") + 1
    assert run.error.location == f"{tmp_path / 'bad.py'}:{lineno}"  # far from the working directory: absolute


def test_endless_loop_in_a_cell_is_a_timeout_at_its_cell(tmp_path, problem):
    ex1 = nbdata.EX1.replace("dh = dlogits @ W2.T", "while True:\n    pass")
    run, vs = verdicts(load(tmp_path, nbdata.lecture_notebook(ex1=ex1)), problem, timeout=0.5)
    assert run.error.timeout and run.error.location in (f"cell {EX1}, line 13", f"cell {EX1}, line 14")
    assert vs["logits"].status == "pass" and vs["h"].status == "skip"  # its line is the endless loop now
    assert vs["W2"].status == "error" and vs["W2"].diagnosis.code == "timeout"  # the next line never ran
