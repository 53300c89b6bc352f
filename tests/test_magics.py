"""``%load_ext pytest_backprop``: the ``%%backprop`` cell magic and the ``%backprop`` line magic, in an
in-process IPython shell (fast) and once in a real Jupyter kernel (nbclient + ipykernel) on a notebook
built here, whose verdicts are compared with ``pytest --backprop`` on the same notebook file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("IPython")

from pytest_backprop.magics import BackpropReport, _words_path, check_cell  # noqa: E402

_spec = importlib.util.spec_from_file_location("backprop_test_notebooks_m", Path(__file__).parent / "data" / "notebooks.py")
nbdata = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbdata)

#: The student's own set-up: their forward pass in their namespace (the kit never reads it).
SETUP = "\n".join([
    "import torch",
    "import torch.nn.functional as F",
    "from reference_model.data import load_words",
    "words = list(load_words(None).words)",
    *nbdata.DATA.splitlines()[2:],
    nbdata.CMP_DEF, nbdata.INIT, nbdata.BATCH,
    nbdata.FORWARD.rsplit("\n", 1)[0],  # without the bare `loss` (no output)
])
WRONG_DPROBS = nbdata.EX1.replace("dprobs = (1.0 / probs) * dlogprobs", "dprobs = (1.0 / probs) * dlogprobs * 2")
WRONG_EX2 = nbdata.EX2.replace("dlogits /= n", "")


@pytest.fixture(scope="module")
def ip():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "pytest_backprop")
    return shell


@pytest.fixture
def shell(ip):
    """A fresh session (cell 1 is ``%load_ext``, cell 2 the student's forward pass)."""
    ip.reset(new_session=True)
    for source in ("%load_ext pytest_backprop", SETUP):
        assert ip.run_cell(source, store_history=True).success
    return ip


def run(shell, source: str):
    return shell.run_cell(source, store_history=True)


def by_key(report: BackpropReport) -> dict:
    return {v.key: v for v in report.verdicts}


# --- %%backprop ----------------------------------------------------------------------------------

def test_correct_exercise_1_cell_is_all_ok_and_runs_as_usual(shell):
    result = run(shell, "%%backprop\n" + nbdata.EX1)
    report = result.result
    assert isinstance(report, BackpropReport) and report.ok
    assert len(report.verdicts) == 26 and {v.status for v in report.verdicts} == {"pass"}
    assert report.title == "Exercise 1 (cell 3)"
    assert "dC" in shell.user_ns and "dlogprobs" in shell.user_ns  # the cell ran in the user's namespace


def test_a_mistake_names_the_cells_line_and_the_hint(shell):
    report = run(shell, "%%backprop\n" + WRONG_DPROBS).result
    v = by_key(report)["ex1::probs"]
    assert (v.status, v.diagnosis.code) == ("fail", "scale")
    assert (v.location.cell, v.location.line) == (3, 5)  # the %%backprop line is the cell's line 1
    assert by_key(report)["ex1::counts"].diagnosis.code == "inherited"
    text = repr(report)
    assert "dprobs [scale]: dprobs is 2 × the true gradient" in text
    assert "your line: cell 3, line 5: dprobs = (1.0 / probs) * dlogprobs * 2" in text
    assert "more fail only because an earlier gradient is wrong [inherited]: fix dprobs first" in text
    page = report._repr_html_()
    assert "<table>" in page and "#f8d7da" in page and "#d4edda" in page
    assert "your line: <code>cell 3, line 5: dprobs = (1.0 / probs) * dlogprobs * 2</code>" in page
    assert "backprop through: <code>logprobs = probs.log()</code>" in page
    assert "font-size:smaller" in page  # inherited rows: their one line, greyed


def test_a_later_cell_shows_its_own_gradients_graded_with_the_earlier_ones(shell):
    lines = WRONG_DPROBS.splitlines()
    cut = next(i for i, ln in enumerate(lines) if ln.startswith("dh ="))
    run(shell, "\n".join(lines[:cut]))  # the first half, without the magic
    report = run(shell, "%%backprop\n" + "\n".join(lines[cut:])).result
    assert [v.tensor for v in report.verdicts][:3] == ["h", "W2", "b2"]
    codes = {v.diagnosis.code for v in report.verdicts}
    assert "inherited" in codes and codes <= {"inherited", "ok"}  # the mistake is dprobs, in cell 3
    assert "inherited from dprobs" in report.verdicts[0].diagnosis.message


def test_exercise_given_or_detected_for_exercises_2_and_3(shell):
    wrong = run(shell, "%%backprop ex2\n" + WRONG_EX2).result
    assert [(v.key, v.status) for v in wrong.verdicts] == [("ex2::logits", "fail")]
    assert wrong.title == "Exercise 2 (cell 3)"
    right = run(shell, "%%backprop ex2\n" + nbdata.EX2).result
    assert right.ok and [v.key for v in right.verdicts] == ["ex2::logits"]
    run(shell, nbdata.EX1)  # Exercise 3 reads dhpreact from the student's namespace when it runs
    ex3 = run(shell, "%%backprop\n" + nbdata.EX3).result  # detected: it writes dhprebn in one go
    assert ex3.ok and [v.key for v in ex3.verdicts] == ["ex3::hprebn"]
    assert run(shell, "%%backprop ex3\n" + nbdata.EX3).result.title == "Exercise 3 (cell 7)"


def test_a_cell_that_raises_gets_a_clear_verdict(shell, capsys):
    source = "%%backprop ex2\ndlogits = F.softmax(logits, 1)\ndlogits[range(n), Yb] -= 1\ndlogits /= batch_sz"
    result = run(shell, source)
    report = result.result
    assert isinstance(report, BackpropReport)  # the magic ran after the cell's NameError, no crash
    assert any("your cell raised when it ran: NameError" in n for n in report.notes)
    v = by_key(report)["ex2::logits"]
    assert v.status == "error" and v.diagnosis.code == "exception"
    assert "cell 3, line 4" in v.diagnosis.message and "batch_sz" in v.diagnosis.message
    assert "NameError" in capsys.readouterr().out  # IPython's own traceback is shown as usual


def test_earlier_cells_constants_and_definitions_count(shell):
    run(shell, "SCALE = 1.0 / 32\ndef softmax_grad(logits, Yb):\n    g = F.softmax(logits, 1)\n"
               "    g[range(len(Yb)), Yb] -= 1\n    return g")
    report = run(shell, "%%backprop\ndlogits = softmax_grad(logits, Yb) * SCALE").result
    assert report.ok and [v.key for v in report.verdicts] == ["ex2::logits"]


def test_the_kits_forward_values_not_the_students(shell):
    """A student's forward with other values (their own n_hidden 64 run) cannot pass a wrong formula."""
    run(shell, "probs = probs.detach() * 0 + 1")  # not a set-up the kit reads
    report = run(shell, "%%backprop\n" + nbdata.EX1).result
    assert report.ok


def test_a_cell_without_gradients_says_so(shell):
    report = run(shell, "%%backprop\nx = 1 + 1").result
    assert report.verdicts == [] and "assigns no gradient" in report.notes[0]
    assert "%%backprop ex1" in repr(report)


def test_bad_magic_lines_are_usage_errors(shell, capsys):
    assert run(shell, "%%backprop ex9\nx = 1").result is None
    assert "invalid choice: 'ex9'" in capsys.readouterr().err
    assert run(shell, "%backprop --steps many").result is None
    assert "--steps: expected a number" in capsys.readouterr().err
    assert run(shell, "%backprop --names missing.txt").result is None
    assert "no such file: missing.txt" in capsys.readouterr().err
    run(shell, "%backprop --help")
    out = capsys.readouterr().out
    assert "--no-properties" in out and "--examples" in out and "--steps" in out


def test_names_txt_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _words_path(None) is None  # the embedded names
    (tmp_path / "names.txt").write_text("emma\nolivia\n")
    assert _words_path(None) == str(tmp_path / "names.txt")


def test_a_backprop_exN_line_is_a_tag_for_the_notebook_loader():
    from pytest_backprop.usercode.notebook import NotebookImplementation

    impl = NotebookImplementation.from_cells(["x = 1", "%%backprop ex3\n" + nbdata.EX3, "%%backprop\n" + nbdata.EX3])
    assert impl.cells_of("ex3") == [2]  # the tag wins over the detection (cell 3 is not tagged)
    assert "backprop:ex3" in impl.cells[1].tags and not impl.cells[2].tags


def test_check_cell_without_a_shell():
    report = check_cell(["x = 1", "%%backprop\n" + WRONG_EX2])
    assert [(v.key, v.diagnosis.code) for v in report.verdicts] == [("ex2::logits", "scale")]


# --- %backprop -----------------------------------------------------------------------------------

def test_line_magic_checks_everything_with_progress(shell, capsys, tmp_path):
    run(shell, nbdata.EX1)
    run(shell, "%%backprop ex2\n" + WRONG_EX2)
    capsys.readouterr()
    report = run(shell, f"%backprop --examples 1 --steps 2 --json {tmp_path / 'r.json'}").result
    out = capsys.readouterr().out
    assert "backprop: checking the gradients" in out
    assert "backprop: property checks" in out and "backprop::properties::ex1" in out
    assert "backprop: Exercise 4" in out and "backprop::ex4::sgd: passed" in out
    keys = by_key(report)
    assert keys["ex2::logits"].status == "fail" and keys["ex4::sgd"].status == "pass"
    assert keys["ex3::hprebn"].status == "skip" and "prop-ex1::all" in keys
    assert all(keys[f"ex1::{t}"].status == "pass" for t in ("logprobs", "C"))
    assert json.loads((tmp_path / "r.json").read_text())["checks"] == report.to_json()
    assert run(shell, "%backprop --quick --quiet").result.verdicts[-1].key == "ex3::hprebn"  # no ex4, no properties
    assert "backprop: checking" not in capsys.readouterr().out


def test_line_magic_gives_pytests_verdicts(shell, tmp_path, pytester):
    """The same cells through ``%backprop`` and through ``pytest --backprop`` on a notebook: same rows."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    for source in (WRONG_DPROBS, "%%backprop ex2\n" + WRONG_EX2, "%%backprop\n" + nbdata.EX3):
        run(shell, source)
    report = run(shell, "%backprop --examples 0 --steps 2 --quiet").result
    nb = new_notebook()
    nb.cells = [new_code_cell(s) for s in shell.history_manager.input_hist_raw[1:]]
    nbformat.write(nb, str(tmp_path / "student.ipynb"))
    cli = _pytest_json(pytester, tmp_path / "student.ipynb", "--backprop-examples=0", "--backprop-steps=2")
    assert _rows(report.to_json()) == _rows(cli["checks"])
    assert {r[1] for r in _rows(cli["checks"])} >= {"scale", "inherited", "ok"}


def _pytest_json(pytester: pytest.Pytester, notebook: Path, *args: str) -> dict:
    """``pytest --backprop --backprop-impl=NOTEBOOK`` (the real plugin, in process: fast) and its JSON report."""
    target = pytester.path / notebook.name
    if target != notebook:
        target.write_bytes(notebook.read_bytes())
    result = pytester.runpytest("-p", "no:cacheprovider", "--backprop", f"--backprop-impl={notebook.name}",
                                "--backprop-json=cli.json", *args)
    assert (pytester.path / "cli.json").is_file(), result.stdout.str()[-3000:]
    return json.loads((pytester.path / "cli.json").read_text())


def _rows(checks: list[dict]) -> list[tuple]:
    """What must be identical: each row's status, code, message, line and cell (the magic's messages
    call the notebook file "this notebook")."""
    def message(text: str) -> str:
        return text.replace("student.ipynb", "this notebook").replace("executed.ipynb", "this notebook")

    return [(c["exercise"] + "::" + c["tensor"], c["diagnosis"]["code"], c["status"], message(c["diagnosis"]["message"]),
             c["location"] and (c["location"]["cell"], c["location"]["line"], c["location"]["source"]))
            for c in checks]


# --- a real kernel ---------------------------------------------------------------------------------

def test_in_a_real_jupyter_kernel(tmp_path, monkeypatch, pytester):
    """One kernel session: a mistake in Exercise 1, ``%%backprop ex2``/``ex3`` cells, a cell that raises,
    then ``%backprop``, whose JSON must be ``pytest --backprop``'s on the executed notebook file."""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # the kernel's history stays here
    spec = tmp_path / "jupyter" / "kernels" / "backprop-test"  # this interpreter, whatever else is installed
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"], "display_name": "test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    raising = "%%backprop ex3\ndhprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0)) * undefined_factor"
    cells = ["%load_ext pytest_backprop", SETUP, "%%backprop\n" + WRONG_DPROBS, "%%backprop ex2\n" + nbdata.EX2,
             "%%backprop ex3\n" + nbdata.EX3, raising, "%backprop --examples 0 --steps 2 --quiet --json magic.json",
             "import gc\nprint('FROZEN', gc.get_freeze_count())"]  # what the plugin froze is collectable again
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="backprop-test", allow_errors=True,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))

    def result(i: int) -> dict:
        outputs = [o for o in nb.cells[i].outputs if o.output_type == "execute_result"]
        assert outputs, f"cell {i + 1} shows no report: {nb.cells[i].outputs}"
        return outputs[-1].data

    assert [c.execution_count for c in nb.cells] == list(range(1, len(cells) + 1))
    mistake = result(2)
    assert "dprobs [scale]" in mistake["text/plain"] and "cell 3, line 5: dprobs = (1.0 / probs) * dlogprobs * 2" in mistake["text/plain"]
    assert "<table>" in mistake["text/html"] and "dprobs is 2 × the true gradient" in mistake["text/html"]
    assert "Exercise 2 (cell 4)" in result(3)["text/plain"] and "1 pass, 0 fail" in result(3)["text/plain"]
    assert "Exercise 3 (cell 5)" in result(4)["text/plain"] and "1 pass, 0 fail" in result(4)["text/plain"]
    raised = result(5)["text/plain"]
    assert "your cell raised when it ran: NameError" in raised and "ERROR [exception]" in raised
    assert any(o.output_type == "error" for o in nb.cells[5].outputs)  # the cell's own traceback, as usual
    assert [o.text for o in nb.cells[-1].outputs if o.output_type == "stream"] == ["FROZEN 0\n"]
    magic = json.loads((tmp_path / "magic.json").read_text())
    cli = _pytest_json(pytester, tmp_path / "executed.ipynb", "--backprop-examples=0", "--backprop-steps=2")
    assert _rows(magic["checks"]) == _rows(cli["checks"])
    assert magic["dataset"] == cli["dataset"]


def test_importing_the_package_and_the_extension_stays_torch_free():
    code = ("import sys, pytest_backprop, pytest_backprop.magics; "
            "assert callable(pytest_backprop.load_ipython_extension); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_every_magic_and_train_option_is_documented():
    from pytest_backprop.magics import cell_parser, line_parser
    from reference_model.train import _parser

    page = (Path(__file__).resolve().parents[1] / "docs" / "notebooks-magic.md").read_text()
    for parser in (line_parser(), cell_parser(), _parser()):
        flags = [f for action in parser._actions for f in action.option_strings if f.startswith("--")]
        missing = [f for f in flags if f"`{f}" not in page and f"{f} " not in page]
        assert not missing, f"{parser.prog}: not in docs/notebooks-magic.md: {missing}"
    assert "`ex1`, `ex2`, `ex3`" in page
