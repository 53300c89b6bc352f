"""Real notebooks' layouts (issue: every exercise found, the lecture's own answer passes, the student's own
line named): each test builds a notebook laid out the way real students' notebooks are and checks what
the kit finds, runs and reports, exercise by exercise, as the notebook would run top to bottom."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from nbformat.v4 import new_output

from pytest_backprop.checks.independent import grade_exercise
from pytest_backprop.problems.instance import build_problem, resolve_words
from pytest_backprop.usercode.loaders import load_implementation
from pytest_backprop.usercode.notebook import NotebookImplementation
from conftest import run_inprocess

_spec = importlib.util.spec_from_file_location("backprop_test_layouts", Path(__file__).parent / "data" / "layouts.py")
layouts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layouts)
base = layouts.base


@pytest.fixture(scope="module")
def problem():
    return build_problem(resolve_words(None))


def load(tmp_path: Path, nb, name: str = "student.ipynb") -> NotebookImplementation:
    path = tmp_path / name
    base.write(nb, path)
    impl = load_implementation(str(path), tmp_path)
    assert isinstance(impl, NotebookImplementation)
    return impl


def grade(impl, problem, exercise: str = "ex1"):
    graded = grade_exercise(impl, exercise, problem, timeout=20)
    return {v.tensor: v for v in graded.verdicts}, graded


def statuses(verdicts) -> set[str]:
    return {v.status for v in verdicts.values()}


def test_exercise3_cell_with_parameter_gradients_and_a_bridging_line_is_exercise_3(tmp_path, problem):
    ex3 = ("dhpreact = dL_dhpreact  # bridge from my names\n"
           "dbngain = (bnraw * dhpreact).sum(0, keepdim=True)\ndbnbias = dhpreact.sum(0, keepdim=True)\n"
           + layouts.EX3_NO_BESSEL + "\ncmp('hprebn', dhprebn, hprebn)")
    nb = layouts.frame(layouts.renamed(base.EX1), layouts.renamed_cmp_calls(), base.EX2, ex3)
    impl = load(tmp_path, nb)
    assert impl.exercises() == ("ex1", "ex2", "ex3") and impl.cells_of("ex3") == [12]
    verdicts, _ = grade(impl, problem, "ex3")
    hprebn = verdicts["hprebn"]
    assert hprebn.status == "fail" and 2e-5 < hprebn.maxdiff < 5e-5  # the missing n/(n-1): caught, not vanished
    assert hprebn.location.cell == 12 and hprebn.location.source.startswith("dhprebn = bngain")
    assert statuses(grade(impl, problem, "ex1")[0]) == {"pass"}


def test_exercise_1_over_sixty_one_line_cells_with_exploration(tmp_path, problem):
    cells = layouts.one_line_cells()
    assert len(cells) > 60
    nb = layouts.frame(*cells, base.EX2, base.EX3)
    impl = load(tmp_path, nb)
    verdicts, _ = grade(impl, problem)
    assert {t: v.status for t, v in verdicts.items() if v.status != "pass"} == {}
    assert verdicts["bnmeani"].diagnosis.code == "shape_note"  # the lecture's (64,) for (1, 64)
    assert impl.cells_of("ex2") == [9 + len(cells)] and impl.cells_of("ex3") == [10 + len(cells)]
    dC = verdicts["C"].location
    assert dC.cell is not None and dC.line == 1 and dC.source == "dC = torch.zeros_like(C)"


def test_one_cell_with_cmp_calls_interleaved(tmp_path, problem):
    lines = []
    for st in layouts.one_line_cells():
        if not st.endswith(".shape"):
            lines.append(st)
    nb = layouts.frame("\n".join(lines))
    verdicts, _ = grade(load(tmp_path, nb), problem)
    assert statuses(verdicts) == {"pass"}


def test_scratch_cells_that_raise_do_not_stop_the_grading(tmp_path, problem):
    cells = layouts.one_line_cells()
    cells.insert(5, "print(dlogits.shape)  # scratch: dlogits does not exist yet")
    cells.insert(12, "x = torch.tensor([1, 2]) @ torch.tensor([[1.0]])  # a broken experiment")
    cells.insert(20, "helper = dprobs.sum()\nraise ValueError('experiment')")
    nb = layouts.frame(*cells)
    verdicts, graded = grade(load(tmp_path, nb), problem)
    assert {t for t, v in verdicts.items() if v.status != "pass"} <= {"bnmeani"} and statuses(verdicts) == {"pass"}


def test_lecture_solution_pasted_below_an_attempt_wins(tmp_path, problem):
    attempt = base.EX1.replace("dcounts += torch.ones_like(counts) * dcounts_sum",
                               "dcounts = torch.ones_like(counts) * dcounts_sum").replace("dh = dlogits @ W2.T",
                                                                                        "dh = dlogits @ W2")
    nb = layouts.frame(attempt, base.CMP_CALLS, "# the lecture's solution, for reference", base.EX1, base.CMP_CALLS)
    impl = load(tmp_path, nb)
    verdicts, _ = grade(impl, problem)
    assert statuses(verdicts) == {"pass"}
    # the answer graded is the later one: the location names the pasted solution's cell
    assert verdicts["counts"].location.cell == 12


def test_a_repeated_cell_runs_twice_as_in_the_notebook(tmp_path, problem):
    nb = layouts.frame(base.EX1, base.EX1, base.CMP_CALLS)
    verdicts, _ = grade(load(tmp_path, nb), problem)
    assert statuses(verdicts) == {"pass"}


def test_later_placeholders_do_not_clobber_exercise_1_and_empty_exercises_inherit_nothing(tmp_path, problem):
    nb = layouts.frame(base.EX1, base.CMP_CALLS, layouts.EX2_TEMPLATE, layouts.EX3_TEMPLATE)
    impl = load(tmp_path, nb)
    assert impl.cells_of("ex2") == [11] and impl.cells_of("ex3") == [12]
    assert statuses(grade(impl, problem)[0]) == {"pass"}  # dlogits and dhprebn from Exercise 1's cells
    for ex, tensor in (("ex2", "logits"), ("ex3", "hprebn")):
        v = grade(impl, problem, ex)[0][tensor]
        assert v.status == "skip" and f"d{tensor} is None" in v.diagnosis.message, ex


def test_placeholders_inside_exercise_1_cells_never_replace_an_answer(tmp_path, problem):
    template = "\n".join(f"d{t} = None # TODO" for t in ("logits", "h", "hprebn"))
    nb = layouts.frame(base.EX1, template, base.CMP_CALLS)
    verdicts, _ = grade(load(tmp_path, nb), problem)
    assert statuses(verdicts) == {"pass"}


def test_notebook_only_syntax(tmp_path, problem):
    first, second = base.EX1.split("dh = dlogits @ W2.T\n")
    cells = ["torch.all??", "%%time\n" + first, " " + ("\n ".join(("dh = dlogits @ W2.T\n" + second).splitlines())),
             "?torch.allclose", "%%bash\necho not python", "%timeit dlogits.sum()\n" + base.CMP_CALLS]
    nb = layouts.frame(*cells)
    impl = load(tmp_path, nb)
    assert impl.cells_of("ex1") == [10, 11, 14]
    verdicts, graded = grade(impl, problem)
    assert statuses(verdicts) == {"pass"} and graded.first.error is None


def test_cells_never_executed_and_stored_outputs_that_disagree_are_graded_as_code(tmp_path, problem):
    nb = layouts.frame(base.EX1.replace("dh = dlogits @ W2.T", "dh = dlogits @ W2"), base.CMP_CALLS)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.execution_count = None
            cell.outputs = [new_output("stream", name="stdout", text="logprobs | exact: True\n")]
    verdicts, _ = grade(load(tmp_path, nb), problem)
    assert verdicts["h"].status == "error"  # what the code does, not what the stored output says
    assert "cell 9, line 13" in verdicts["h"].diagnosis.message


def test_constants_of_earlier_cells(tmp_path, problem):
    ex1 = base.EX1.replace("-1.0/n", "-1.0/BATCH_SIZE").replace("num_classes=logits.shape[1]", "num_classes=vocab_size")
    nb = layouts.frame("BATCH_SIZE = 32\nlr = 0.1", ex1, base.CMP_CALLS)
    verdicts, _ = grade(load(tmp_path, nb), problem)
    assert statuses(verdicts) == {"pass"}


def test_a_loop_rebinding_n_is_named_with_its_cell_and_what_it_breaks(tmp_path, problem):
    ex1 = base.EX1.replace("for k in range(Xb.shape[0]):", "for n in range(Xb.shape[0]):").replace(
        "ix = Xb[k,j]", "ix = Xb[n,j]").replace("dC[ix] += demb[k,j]", "dC[ix] += demb[n,j]")
    first, second = ex1.split("dembcat = dhprebn @ W1.T\n")
    # the dC loop first, then the lines that use n afterwards (a real ordering mistake)
    loop = second[second.index("dC = torch.zeros_like(C)"):]
    rest = second[:second.index("dC = torch.zeros_like(C)")]
    nb = layouts.frame(first + "dembcat = dhprebn @ W1.T\n" + rest + loop, "dlogprobs2 = 1.0/n", base.CMP_CALLS)
    verdicts, graded = grade(load(tmp_path, nb), problem)
    warning = next(w for w in graded.warnings if w.code == "reassigned_name")
    assert "`n`" in warning.message and "cell 9, line" in warning.message and "for n in range" in warning.message


def test_copied_grad_is_blamed_and_everything_below_is_still_graded(tmp_path, problem):
    ex1 = base.EX1.replace("dhpreact = (1.0 - h**2) * dh", "dhpreact = hpreact.grad.clone()")
    verdicts, graded = grade(load(tmp_path, layouts.frame(ex1, base.CMP_CALLS)), problem)
    assert verdicts["hpreact"].diagnosis.code == "reads_autograd"
    below = layouts.GRADIENTS[layouts.GRADIENTS.index("hpreact") + 1:]
    assert all(verdicts[t].diagnosis.code == "inherited" for t in below), [(t, verdicts[t].diagnosis) for t in below]
    assert all(verdicts[t].status == "pass" for t in layouts.GRADIENTS[:layouts.GRADIENTS.index("hpreact")])


def test_lecture_cmp_lines_of_gradients_not_written_yet_are_not_attempted(tmp_path, problem):
    written = base.EX1.split("dh = dlogits @ W2.T")[0]
    verdicts, graded = grade(load(tmp_path, layouts.frame(written, layouts.ALL_CMP)), problem)
    assert {v.status for t, v in verdicts.items() if t in ("logprobs", "probs", "logits")} == {"pass"}
    rest = [v for t, v in verdicts.items() if t in layouts.GRADIENTS[layouts.GRADIENTS.index("h"):]]
    assert {v.status for v in rest} == {"skip"} and graded.first.error is None


def test_the_lecture_solution_gets_one_shape_note_as_a_notebook_and_as_a_script(tmp_path, problem):
    nb = layouts.frame(layouts.LECTURE_EX1, base.CMP_CALLS, base.EX2, base.EX3)
    impl = load(tmp_path, nb)
    notes = []
    for ex in ("ex1", "ex2", "ex3"):
        verdicts, _ = grade(impl, problem, ex)
        assert statuses(verdicts) == {"pass"}, ex
        notes += [v.tensor for v in verdicts.values() if v.diagnosis.code == "shape_note"]
    assert notes == ["bnmeani"]
    script = tmp_path / "lecture.py"
    script.write_text(layouts.LECTURE_EX1 + "\n")
    verdicts, _ = grade(load_implementation(str(script), tmp_path), problem)
    assert statuses(verdicts) == {"pass"} and [v.tensor for v in verdicts.values() if v.diagnosis.code == "shape_note"] == ["bnmeani"]
    assert "keepdim=True" in verdicts["bnmeani"].diagnosis.message and "(1, 64)" in verdicts["bnmeani"].diagnosis.message


def test_a_shape_that_broadcasts_to_other_values_still_fails(tmp_path, problem):
    script = tmp_path / "s.py"
    script.write_text(base.EX1.replace("dcounts_sum = (-counts_sum**-2) * dcounts_sum_inv",
                                       "dcounts_sum = ((-counts_sum**-2) * dcounts_sum_inv).view(-1)") + "\n")
    verdicts, _ = grade(load_implementation(str(script), tmp_path), problem)
    assert verdicts["counts_sum"].status == "fail" and verdicts["counts_sum"].diagnosis.code == "keepdim"
    # a parameter must have its exact shape, even when broadcasting would restore it
    script.write_text(base.EX1.replace("db2 = dlogits.sum(0)", "db2 = dlogits.sum(0, keepdim=True)") + "\n")
    verdicts, _ = grade(load_implementation(str(script), tmp_path), problem)
    assert verdicts["b2"].status == "fail" and verdicts["b2"].diagnosis.code == "keepdim"


def test_error_message_names_the_cell_that_really_assigns_the_name(tmp_path, problem):
    first, second = base.EX1.split("dh = dlogits @ W2.T\n")
    second = "dh = dlogits @ W2_T\n" + second
    nb = layouts.frame(first, second, base.CMP_CALLS, base.TRAIN.replace("dW2 = h.T", "W2_T = W2.T\n        dW2 = h.T"))
    verdicts, _ = grade(load(tmp_path, nb), problem)
    assert verdicts["h"].status == "error"
    message = verdicts["h"].diagnosis.message
    assert "W2_T" in message and "cell 12" in message and "training cell" in message


def test_syntax_error_shows_the_code(tmp_path, problem):
    nb = layouts.frame(base.EX1.replace("db2 = dlogits.sum(0)", "db2 = dlogits.sum(0))"), base.CMP_CALLS)
    verdicts, graded = grade(load(tmp_path, nb), problem)
    message = verdicts["b2"].diagnosis.message
    assert "SyntaxError" in message and "db2 = dlogits.sum(0))" in message and "cell 9, line 15" in message


def test_every_exercise_has_a_row_in_the_table_and_the_json(pytester):
    base.write(layouts.frame("x = 1"), pytester.path / "empty.ipynb")
    result = run_inprocess(pytester, "--backprop", "--backprop-impl=empty.ipynb", "--backprop-examples=0",
                           "--backprop-steps=0", "--backprop-json=report.json")
    out = result.stdout.str()
    assert "LookupError" not in out and "your code raised" not in out
    for ex in ("ex1", "ex2", "ex3"):
        assert f"{ex} skipped: no Exercise {ex[2:]} cell found" in out and f"backprop:{ex}" in out
    report = json.loads((pytester.path / "report.json").read_text())
    assert {c["exercise"] for c in report["checks"]} == {"ex1", "ex2", "ex3"}
    assert {c["status"] for c in report["checks"]} == {"skip"}


def test_a_plain_script_assigning_C_is_warned_about_with_its_statement(tmp_path, problem):
    script = tmp_path / "own.py"
    script.write_text("C = torch.randn((27, 10))\n" + base.EX1 + "\n")
    verdicts, graded = grade(load_implementation(str(script), tmp_path), problem)
    warning = next(w for w in graded.warnings if w.code == "reassigned_name")
    assert "own.py:1" in warning.message and "C = torch.randn((27, 10))" in warning.message
    assert "for C in range" not in warning.message


def test_a_fused_cross_entropy_that_goes_on_down_the_backward_is_exercise_1_and_2(tmp_path, problem):
    rest = base.EX1.split("dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes\n")[1]
    cell = "dlogits = F.softmax(logits, 1)\ndlogits[range(n), Yb] -= 1\ndlogits /= n\n" + rest
    impl = load(tmp_path, layouts.frame(cell))
    assert impl.cells_of("ex1") == [9] and impl.cells_of("ex2") == [9]
    verdicts, _ = grade(impl, problem)
    assert all(verdicts[t].status == "pass" for t in layouts.GRADIENTS[layouts.GRADIENTS.index("logits"):])
    assert grade(impl, problem, "ex2")[0]["logits"].status == "pass"


def test_plotting_lines_in_an_exercise_cell_do_nothing(tmp_path, problem):
    ex1 = base.EX1.replace("dh = dlogits @ W2.T", "plt.figure(figsize=(8, 8))\nplt.imshow(dlogits.detach(), cmap='gray')\n"
                           "dh = dlogits @ W2.T")
    verdicts, graded = grade(load(tmp_path, layouts.frame(ex1, base.CMP_CALLS)), problem)
    assert statuses(verdicts) == {"pass"} and not [w for w in graded.warnings if w.code == "statement_error"]


def test_a_cell_pasted_with_one_leading_space_on_its_first_line_only(tmp_path, problem):
    lines = base.EX1.splitlines()
    cell = " " + lines[0] + "\n" + "\n".join(" " + ln for ln in lines[1:5]) + "\n" + "\n".join(lines[5:])
    verdicts, graded = grade(load(tmp_path, layouts.frame(cell, base.CMP_CALLS)), problem)
    assert statuses(verdicts) == {"pass"}
