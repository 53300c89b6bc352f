"""Problems derived from a forward function: the line table, the spec, the lecture's problem, and a
clear error naming the line for every forward the kit cannot derive from."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO

from pytest_backprop.problems import ProblemError, load_spec, problem_from_spec
from pytest_backprop.problems.lecture import LECTURE, LINES, lecture_inputs
from pytest_backprop.problems.spec import default_ranges
from pytest_backprop.problems.table import backward_order

LECTURE_MD = REPO.parent / "shared" / "LECTURE.md"


# --- the lecture's problem -------------------------------------------------------------------------

def lecture_spec_text() -> tuple[list[str], list[str]]:
    """The 20 forward lines and the 26 gradient names, as ../shared/LECTURE.md writes them."""
    if not LECTURE_MD.is_file():
        pytest.skip("../shared/LECTURE.md is not present")
    text = LECTURE_MD.read_text()
    section = text[text.index("## The expanded forward pass"):]
    block = section.split("```")[1]
    lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in block.splitlines() if ln.strip()]
    order_text = section[section.index("checking order:") + len("checking order:"):section.index("Students name")]
    order = [w.strip(" .\n") for w in order_text.replace("\n", " ").split(",")]
    return lines, order


def test_derived_table_is_the_lectures_twenty_lines():
    """Outputs and sources from LECTURE.md's text; inputs found in it independently (by regex, in order)."""
    lines, order = lecture_spec_text()
    assert len(lines) == 20 and len(order) == 26
    assert [l.source for l in LINES] == lines
    assert [l.output for l in LINES] == [ln.split(" = ", 1)[0] for ln in lines]
    for line, text in zip(LINES, lines):
        names = list(dict.fromkeys(re.findall(r"(?<![.\w])[A-Za-z_]\w*", text.split(" = ", 1)[1])))
        assert line.inputs == tuple(n for n in names if n in order), line.source
        assert line.constants == tuple(n for n in names if n in ("n", "Xb", "Yb")), line.source
    assert LECTURE.order == tuple(order)


def test_lecture_leaves_constants_and_graph():
    assert LECTURE.leaves == ("C", "W1", "b1", "bngain", "bnbias", "W2", "b2")
    assert LECTURE.constants == ("n", "Xb", "Yb")
    assert LECTURE.loss == "loss" and LINES[-1].output == "loss"
    assert [l.output for l in LECTURE.consumers("counts")] == ["counts_sum", "probs"]
    assert [l.output for l in LECTURE.consumers("hprebn")] == ["bnmeani", "bndiff"]
    assert LECTURE.producer("W1") is None and LECTURE.producer("probs").inputs == ("counts", "counts_sum_inv")
    model_lines = (REPO / "reference_model" / "model.py").read_text().splitlines()
    assert LECTURE.line_of["emb"].location.endswith(f"model.py:{model_lines.index('    emb = C[Xb]') + 1}")


def test_default_order_differs_from_the_lectures_only_where_the_lecture_chose():
    """The lecture's ORDER is kept; the derived default rule lists bnraw before bnbias (reading order)."""
    default = backward_order(LECTURE.lines, LECTURE.order)
    swapped = list(LECTURE.order)
    i, j = swapped.index("bnbias"), swapped.index("bnraw")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert default == tuple(swapped) != LECTURE.order


@pytest.mark.parametrize("spec", [LECTURE, load_spec(REPO / "examples" / "problems" / "two_layer_relu.py")],
                         ids=["lecture", "two_layer_relu"])
def test_every_order_lists_a_gradient_after_the_lines_that_read_it(spec):
    for order in (spec.order, backward_order(spec.lines, spec.order)):
        position = {name: i for i, name in enumerate(order)}
        assert sorted(order) == sorted(spec.leaves + spec.table.intermediates)
        for line in spec.lines:
            for name in line.inputs:
                assert line.output == spec.loss or position[line.output] < position[name], (line.source, name)


def test_lecture_make_inputs_draws_what_the_lecture_draws():
    """make_inputs with the dataset: bit for bit the parameters-then-batch of lecture_params_and_batch."""
    from reference_model.data import build_splits, load_words
    from reference_model.model import Config, lecture_params_and_batch

    ds = build_splits(load_words(None))
    config = Config(vocab_size=ds.vocab_size)
    params, Xb, Yb = lecture_params_and_batch(ds.Xtr, ds.Ytr, config)
    inputs = LECTURE.inputs(config.sizes(), seed=config.seed, dataset=ds)
    assert list(inputs) == [*params, "n", "Xb", "Yb"] and inputs["n"] == 32
    assert all(torch.equal(inputs[k], params[k]) for k in params)
    assert torch.equal(inputs["Xb"], Xb) and torch.equal(inputs["Yb"], Yb)
    with pytest.raises(ProblemError, match="block_size 3 .* the sizes ask for 4"):
        LECTURE.inputs({**config.sizes(), "block_size": 4}, dataset=ds)


def test_lecture_make_inputs_without_data_works_at_any_sizes():
    inputs = LECTURE.inputs({"batch_size": 2, "vocab_size": 3, "n_embd": 1, "n_hidden": 1, "block_size": 1}, seed=5)
    truth = LECTURE.truth(inputs, dtype=torch.float64)
    assert truth.grads["C"].shape == (3, 1) and truth.grads["logits"].shape == (2, 3)
    assert abs(truth.loss - float(LECTURE.run(inputs)["loss"])) < 1e-5


def test_problems_carry_their_spec():
    from pytest_backprop.problems import build_problem, resolve_words

    p = build_problem(resolve_words(None))
    assert p.spec is LECTURE
    assert p.globals() == {"batch_size": 32, "vocab_size": 27, "n_embd": 10, "n_hidden": 64, "block_size": 3}
    assert set(p.inputs) == {*LECTURE.leaves, *LECTURE.constants}
    assert torch.equal(LECTURE.run(lecture_inputs(p.params, p.Xb, p.Yb))["loss"], p["loss"])


# --- problems from files -------------------------------------------------------------------------

HEADER = '''\
import torch

SIZES = {"n": 4, "d": 3}


def make_inputs(sizes, generator):
    return {"x": torch.randn((sizes["n"], sizes["d"]), generator=generator),
            "w": torch.randn(sizes["d"], generator=generator), "n": sizes["n"]}


'''


def write_problem(tmp_path: Path, forward: str, *, header: str = HEADER) -> Path:
    path = tmp_path / "prob.py"
    path.write_text(header + textwrap.dedent(forward))
    return path


def line_number(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == text)


def test_a_non_differentiable_line_reads_only_constants(tmp_path):
    spec = load_spec(write_problem(tmp_path, """
        def forward(x, w, n):
            z = x * w
            mask = (z > 0).float()
            a = z * mask
            return a.sum() / n
    """))
    z, mask, a, loss = spec.lines
    assert (z.inputs, z.constants) == (("x", "w"), ())
    assert (mask.inputs, mask.constants) == ((), ("z",)) and not mask.differentiable
    assert (a.inputs, a.constants) == (("z",), ("mask",))
    assert loss.output == "loss" and loss.source == "loss = a.sum() / n" and loss.constants == ("n",)
    assert spec.leaves == ("x", "w") and spec.constants == ("n",)
    assert spec.order == ("a", "z", "x", "w")
    assert [l.output for l in spec.consumers("z")] == ["a"]
    truth = spec.truth(spec.inputs(seed=1), dtype=torch.float64)
    x, w = truth.values["x"], truth.values["w"]
    assert torch.allclose(truth.grads["x"], (x * w > 0).double() * w / 4)


def test_sizes_ranges_and_names(tmp_path):
    assert default_ranges({"n": 32, "k": 1, "m": 2}) == {"n": (2, 64), "k": (1, 2), "m": (2, 4)}
    spec = load_spec(write_problem(tmp_path, """
        NAME = "dot"
        SIZE_RANGES = {"n": (1, 9)}

        def forward(x, w, n):
            z = x @ w
            return z.sum()
    """))
    assert spec.name == "dot" and spec.size_ranges == {"n": (1, 9), "d": (2, 6)}
    assert spec.inputs({"n": 7})["x"].shape == (7, 3)
    with pytest.raises(ProblemError, match="unknown size name 'm' for the problem 'dot'"):
        spec.inputs({"m": 2})
    with pytest.raises(ProblemError, match="a size is a positive int"):
        problem_from_spec(spec, {"n": 0})


def test_loading_by_path_and_by_module_name(tmp_path, monkeypatch):
    path = write_problem(tmp_path, """
        def forward(x, w, n):
            z = x @ w
            return z.sum()
    """)
    spec = load_spec(path)
    assert spec is load_spec(str(path)) is load_spec("prob.py", rootdir=tmp_path) is load_spec(spec.origin)
    assert spec.origin == str(path.resolve()) and spec.name == "prob"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "prob", raising=False)
    assert load_spec("prob").origin == "prob" and load_spec("prob").lines[0].source == "z = x @ w"
    assert load_spec("reference_model.model") is LECTURE
    with pytest.raises(ProblemError, match="no problem file nothere.py"):
        load_spec("nothere.py", rootdir=tmp_path)
    with pytest.raises(ProblemError, match="no module named 'no_such_problem_module'"):
        load_spec("no_such_problem_module")
    (tmp_path / "empty.py").write_text("import torch\n")
    with pytest.raises(ProblemError, match="lacks SIZES, make_inputs, forward"):
        load_spec(tmp_path / "empty.py")


# --- what the kit cannot derive from: the message names the line ---------------------------------

FORWARD_ERRORS = [
    ("decorated", """
        @torch.no_grad()
        def forward(x, w, n):
            z = x @ w
            return z.sum()
    """, "@torch.no_grad()", "must not be decorated"),
    ("*args", """
        def forward(x, *rest):
            z = x.sum()
            return z
    """, "def forward(x, *rest):", "forward takes *args or **kwargs"),
    ("defaults", """
        def forward(x, w, n=4):
            z = x @ w
            return z.sum()
    """, "def forward(x, w, n=4):", "forward's arguments have defaults"),
    ("loop", """
        def forward(x, w, n):
            z = x @ w
            for i in range(2):
                z = z * 2
            return z.sum()
    """, "for i in range(2):", "a loop"),
    ("if", """
        def forward(x, w, n):
            z = x @ w
            if n > 2:
                z = z * 2
            return z.sum()
    """, "if n > 2:", "an if"),
    ("two assignments", """
        def forward(x, w, n):
            a = b = x @ w
            return a.sum()
    """, "a = b = x @ w", "two assignments in one line"),
    ("tuple target", """
        def forward(x, w, n):
            a, b = x @ w, w.sum()
            return a.sum()
    """, "a, b = x @ w, w.sum()", "a tuple target"),
    ("two statements on a line", """
        def forward(x, w, n):
            z = x @ w; y = z * 2
            return y.sum()
    """, "z = x @ w; y = z * 2", "two statements on one line"),
    ("augmented assignment", """
        def forward(x, w, n):
            z = x @ w
            z += 1
            return z.sum()
    """, "z += 1", "augmented assignment"),
    ("assigned twice", """
        def forward(x, w, n):
            z = x @ w
            z = z * 2
            return z.sum()
    """, "z = z * 2", "`z` is already assigned on "),
    ("argument reassigned", """
        def forward(x, w, n):
            x = x * 2
            return (x @ w).sum()
    """, "x = x * 2", "`x` is an argument of forward"),
    ("undefined name", """
        def forward(x, w, n):
            z = x @ v
            return z.sum()
    """, "z = x @ v", "reads `v`, which is not an argument"),
    ("read before assigned", """
        def forward(x, w, n):
            z = y * 2
            y = x @ w
            return z.sum()
    """, "z = y * 2", "reads `y` before the line that assigns it"),
    ("in-place operation", """
        def forward(x, w, n):
            z = (x @ w).add_(1)
            return z.sum()
    """, "z = (x @ w).add_(1)", "an in-place operation `.add_()`"),
    ("comprehension", """
        def forward(x, w, n):
            z = torch.stack([x[i] @ w for i in range(n)])
            return z.sum()
    """, "z = torch.stack([x[i] @ w for i in range(n)])", "a loop inside an expression"),
    ("conditional expression", """
        def forward(x, w, n):
            z = x @ w if n > 1 else x.sum(1)
            return z.sum()
    """, "z = x @ w if n > 1 else x.sum(1)", "an if inside an expression"),
    ("a call as a statement", """
        def forward(x, w, n):
            z = x @ w
            print(z)
            return z.sum()
    """, "print(z)", "an expression whose value is not assigned"),
    ("no return", """
        def forward(x, w, n):
            z = x @ w
            loss = z.sum()
    """, "loss = z.sum()", "must end in `return <scalar loss>`"),
    ("dead line", """
        def forward(x, w, n):
            z = x @ w
            unused = x * 2
            return z.sum()
    """, "unused = x * 2", "which no later line reads"),
    ("returns a tuple", """
        def forward(x, w, n):
            z = x @ w
            return z, w
    """, "return z, w", "not a collection"),
    ("non-scalar return", """
        def forward(x, w, n):
            z = x @ w
            return z
    """, "return z", "must return a scalar loss; `z` has shape (4,)"),
    ("a line that raises", """
        def forward(x, w, n):
            z = x @ x
            return z.sum()
    """, "z = x @ x", "raised RuntimeError"),
    ("unused leaf", """
        def forward(x, w, n):
            z = x.sum(1)
            return z.sum()
    """, "def forward(x, w, n):", "forward takes the float tensor `w` but no line reads it"),
    ("no gradient", """
        def forward(x, w, n):
            i = w.argmax()
            z = x[:, i]
            return z.sum()
    """, "def forward(x, w, n):", "`w` gets no gradient"),
]


@pytest.mark.parametrize("forward, bad_line, message", [c[1:] for c in FORWARD_ERRORS], ids=[c[0] for c in FORWARD_ERRORS])
def test_a_forward_the_kit_cannot_derive_from_names_its_line(tmp_path, forward, bad_line, message):
    path = write_problem(tmp_path, forward)
    with pytest.raises(ProblemError) as info:
        load_spec(path)
    text = str(info.value)
    assert message in text
    assert f"prob.py:{line_number(path, bad_line)}: `{bad_line}`" in text


def test_make_inputs_must_return_every_input_of_forward(tmp_path):
    path = write_problem(tmp_path, """
        def forward(x, w, n, k):
            z = x @ w * k
            return z.sum()
    """)
    with pytest.raises(ProblemError) as info:
        load_spec(path)
    site = line_number(path, "def make_inputs(sizes, generator):")
    assert f"prob.py:{site}: `def make_inputs(sizes, generator):`: make_inputs returns no k" in str(info.value)


SIZE_ERRORS = [
    ("unknown size in SIZE_RANGES", 'SIZES = {"n": 4, "d": 3}\nSIZE_RANGES = {"n": (2, 8),\n               "m": (1, 3)}\n',
     '"m": (1, 3)}', "unknown size name 'm' in SIZE_RANGES (SIZES defines n, d)"),
    ("range without the default", 'SIZES = {"n": 4, "d": 3}\nSIZE_RANGES = {"n": (5, 8)}\n',
     'SIZE_RANGES = {"n": (5, 8)}', "does not contain the default SIZES['n'] = 4"),
    ("a size that is not a positive int", 'SIZES = {"n": 4, "d": 0}\n', 'SIZES = {"n": 4, "d": 0}',
     "SIZES['d'] = 0: a size is a name and a positive int"),
    ("a size make_inputs never reads", 'SIZES = {"n": 4, "d": 3, "k": 2}\n', "def make_inputs(sizes, generator):",
     "SIZES defines 'k', which make_inputs never reads"),
]


@pytest.mark.parametrize("sizes, bad_line, message", [c[1:] for c in SIZE_ERRORS], ids=[c[0] for c in SIZE_ERRORS])
def test_size_mistakes_name_their_line(tmp_path, sizes, bad_line, message):
    header = HEADER.replace('SIZES = {"n": 4, "d": 3}\n', sizes)
    path = write_problem(tmp_path, """
        def forward(x, w, n):
            z = x @ w
            return z.sum()
    """, header=header)
    with pytest.raises(ProblemError) as info:
        load_spec(path)
    assert message in str(info.value)
    assert f"prob.py:{line_number(path, bad_line)}: `{bad_line}`" in str(info.value)


def test_make_inputs_reading_an_unknown_size_names_its_line(tmp_path):
    header = HEADER.replace('"n": sizes["n"]}', '"n": sizes["m"]}')
    path = write_problem(tmp_path, """
        def forward(x, w, n):
            z = x @ w
            return z.sum()
    """, header=header)
    with pytest.raises(ProblemError) as info:
        load_spec(path)
    bad = '"w": torch.randn(sizes["d"], generator=generator), "n": sizes["m"]}'
    assert f"prob.py:{line_number(path, bad)}" in str(info.value)
    assert "reads the size 'm', which SIZES does not define (SIZES defines n, d)" in str(info.value)


def test_an_input_whose_kind_changes_with_the_sizes_is_an_error(tmp_path):
    header = HEADER.replace('"w": torch.randn(sizes["d"], generator=generator)',
                            '"w": torch.randn(sizes["d"], generator=generator) if sizes["n"] > 2 else 3')
    spec = load_spec(write_problem(tmp_path, """
        def forward(x, w, n):
            z = x @ w
            return z.sum()
    """, header=header))
    assert spec.leaves == ("x", "w")
    with pytest.raises(ProblemError, match="returned w as int at sizes .* but it was a float tensor"):
        spec.inputs({"n": 2})


def test_order_must_name_every_gradient_after_its_readers(tmp_path):
    forward = """
        def forward(x, w, n):
            z = x @ w
            return z.sum()
    """
    spec = load_spec(write_problem(tmp_path, forward))
    assert spec.order == ("z", "x", "w")
    for order, message in [('("z", "x")', "ORDER misses w"), ('("x", "z", "w")', "ORDER lists x before z")]:
        folder = tmp_path / message.split()[-1]
        folder.mkdir()
        path = write_problem(folder, f"ORDER = {order}\n" + textwrap.dedent(forward))
        with pytest.raises(ProblemError) as info:
            load_spec(path)
        assert message in str(info.value) and f"prob.py:{line_number(path, f'ORDER = {order}')}" in str(info.value)
    good = tmp_path / "good"
    good.mkdir()
    assert load_spec(write_problem(good, 'ORDER = ("z", "w", "x")\n' + textwrap.dedent(forward))).order == ("z", "w", "x")


def test_the_lecture_meta_read_without_importing_is_the_specs():
    from pytest_backprop.problems.lecture import LECTURE
    from pytest_backprop.problems.meta import lecture_meta

    assert lecture_meta() == {"name": LECTURE.name, "origin": LECTURE.origin}
