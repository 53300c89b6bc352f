"""The static scans hints quote the user's source with (pytest_backprop.usercode.scan): numbers in
code (not comments or strings), float32-creating calls, bare squeezes, the cells that run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pytest_backprop.usercode.base import SourceSpan
from pytest_backprop.usercode.loaders import load_implementation
from pytest_backprop.usercode.scan import (
    bare_squeezes,
    find_numbers,
    float32_makers,
    function_span,
    parse_span,
    spans_for,
)

_spec = importlib.util.spec_from_file_location("backprop_test_notebooks", Path(__file__).parent / "data" / "notebooks.py")
nbdata = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbdata)


def lines(found):
    return [(f.value, f.location.describe(), f.location.source) for f in found]


def test_numbers_in_code_not_in_comments_or_strings():
    span = SourceSpan('x = torch.zeros((32, 27))  # 64 rows\ns = "64"\ny = -64.0\nz = 1e-5 * 64.5', "s.py")
    assert lines(find_numbers([span], {27, 64})) == [
        (27, "s.py:1", "x = torch.zeros((32, 27))  # 64 rows"), (64.0, "s.py:3", "y = -64.0")]
    assert find_numbers([span], {3}) == []


def test_locations_follow_the_span_file_line_or_cell():
    script_cell = SourceSpan("a = 1\nb = a / 32", "nb.py", None, first_line=10)
    cell = SourceSpan("b = a / 32", "nb.ipynb", cell=7)
    assert [f.location.describe() for f in find_numbers([script_cell, cell], {32})] == ["nb.py:11", "cell 7, line 1"]


def test_constants_of_cells_that_do_not_run_count_only_when_read():
    running = [SourceSpan("dlogprobs[range(n), Yb] = -1.0 / BATCH", "nb.ipynb", cell=9)]
    context = [SourceSpan("BATCH = 32\nUNUSED = 32\nbatch_size = 32", "nb.ipynb", cell=3)]
    assert lines(find_numbers(running, {32}, context=context)) == [(32, "cell 3, line 1", "BATCH = 32")]
    # the kit supplies batch_size itself: an earlier `batch_size = 32` never reaches the code
    read_supplied = [SourceSpan("for k in range(batch_size): pass", "nb.ipynb", cell=9)]
    assert find_numbers(read_supplied, {32}, context=context) == []


def test_notebook_only_lines_do_not_hide_the_rest():
    tree = parse_span(SourceSpan("%matplotlib inline\nx = 1 / 32\ntorch.all??", None, cell=3))
    assert tree is not None and tree.body[0].lineno == 2
    assert parse_span(SourceSpan("def broken(:\n", "s.py")) is None
    assert find_numbers([SourceSpan("def broken(:\n  return 32", "s.py")], {32}) == []  # no guess


def test_float32_makers():
    source = ("a = torch.zeros((32, 27))\n"
              "b = torch.zeros_like(logprobs)\n"
              "c = torch.tensor(1.0 / n)\n"
              "d = torch.where(mask, -1.0 / n, 0.0)\n"
              "e = torch.where(mask, probs - 1, probs)\n"
              "f = torch.ones(3, dtype=h.dtype)\n"
              "g = h.float()\n"
              "i = torch.ones(3, dtype=torch.float32)\n")
    assert [(f.value, f.location.line) for f in float32_makers([SourceSpan(source, "s.py")])] == [
        ("torch.zeros", 1), ("torch.tensor", 3), ("torch.where", 4), (".float()", 7), ("dtype=torch.float32", 8)]


def test_bare_squeezes():
    span = SourceSpan("a = x.squeeze()\nb = x.squeeze(0)\nc = x.squeeze(dim=1)", "s.py")
    assert [f.location.line for f in bare_squeezes([span])] == [1]


def test_function_span_points_at_the_file():
    from reference_model import backward_lines

    (span,) = function_span(backward_lines.backward_probs)
    assert span.text.startswith("def backward_probs") and span.file.endswith("backward_lines.py")
    assert Path(backward_lines.__file__).read_text().splitlines()[span.first_line - 1].startswith("def backward_probs")
    assert function_span(len) == []


def test_spans_for_a_notebook_are_its_exercise_cells(tmp_path):
    impl = load_implementation(str(nbdata.write(nbdata.lecture_notebook(), tmp_path / "nb.ipynb")), tmp_path)
    running, rest = spans_for(impl, "ex1")
    assert [s.cell for s in running] == impl.cells_of("ex1")
    assert {s.cell for s in rest}.isdisjoint(impl.cells_of("ex1")) and rest


def test_spans_for_a_script_split_into_cells(tmp_path):
    path = tmp_path / "split.py"
    path.write_text("# %%\nbatch_size = 32\n\n# %%\n" + (Path(__file__).parents[1] / "examples" / "ex1_solution.py").read_text())
    impl = load_implementation(str(path), tmp_path)
    running, rest = spans_for(impl, "ex1")
    assert running and all("dlogprobs" in s.text for s in running)
    assert [s.text.strip() for s in rest] == ["batch_size = 32"]
    assert find_numbers(running, {32}, context=rest) == []  # the forward cell's constant is not the exercise's
