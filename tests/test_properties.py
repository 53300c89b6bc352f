"""Property checks: the reference passes; hard-coded sizes, wrong dims, missing upstream factors,
keepdim bugs and naive softmaxes are found and shrunk to a small case."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_inprocess, solution_with, write_script

from pytest_backprop.properties.checks import (
    Search,
    batchnorm_property,
    cross_entropy_property,
    line_property,
    whole_backward,
)
from pytest_backprop.properties.explain import SizeFinding, size_findings
from pytest_backprop.usercode.loaders import load_implementation
from pytest_backprop.usercode.perline import line_functions
from reference_model import backward_lines
from reference_model.model import Config
from pytest_backprop.problems.lecture import GRADIENT_ORDER

LECTURE = Config()


def search(examples: int = 4) -> Search:
    return Search(examples=examples, seed=1234, timeout=30)


@pytest.fixture(scope="module")
def reference():
    return load_implementation("reference_model.backward", REPO)


def module(tmp_path: Path, source: str, name: str = "student_mod.py"):
    path = tmp_path / name
    path.write_text(source)
    return load_implementation(str(path), tmp_path)


def test_reference_passes_every_property(reference):
    for verdict in (whole_backward(reference, search=search()),
                    whole_backward(reference, search=search(), broadcast=True),
                    cross_entropy_property(reference, search=search()),
                    batchnorm_property(reference, search=search())):
        assert verdict.status == "pass", verdict.diagnosis.message
    assert verdict.exercise == "prop-ex3" and verdict.tensor == "hprebn"


def test_reference_per_line_functions_pass():
    for output, fn in line_functions(backward_lines).items():
        verdict = line_property(fn, output, search=search(2))
        assert verdict.status == "pass", f"{output}: {verdict.diagnosis.message}"


def test_hardcoded_32_is_found_and_named(tmp_path):
    script = tmp_path / "hardcoded.py"
    script.write_text(solution_with("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0 / 32"))
    impl = load_implementation(str(script), tmp_path)
    verdict = whole_backward(impl, search=search(), lecture=LECTURE, lecture_passed=True)
    assert verdict.status == "fail"
    assert verdict.diagnosis.code == "hardcoded_shape"
    assert verdict.diagnosis.message.startswith("passes at n=32, fails at n=2: 32 is written into your code: "
                                                f"`dlogprobs[range(n), Yb] = -1.0 / 32` ({script}:8)")
    assert verdict.tensor == "logprobs" and verdict.details["size"] == "batch_size"
    assert verdict.details["found"] == [{"value": 32, "location": f"{script}:8",
                                         "source": "dlogprobs[range(n), Yb] = -1.0 / 32"}]
    assert "n=2" in verdict.details["case"]  # the shrunk case


def test_without_a_passing_lecture_the_plain_diagnosis_is_kept(tmp_path):
    script = tmp_path / "hardcoded.py"
    script.write_text(solution_with("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0 / 32"))
    verdict = whole_backward(load_implementation(str(script), tmp_path), search=search(), lecture_passed=False)
    assert verdict.status == "fail" and verdict.diagnosis.code != "hardcoded_shape"
    assert verdict.diagnosis.message.startswith("fails at n=2")


def test_gradients_failing_at_the_lecture_are_not_counted_twice(tmp_path):
    script = tmp_path / "wrong_w2.py"
    script.write_text(solution_with("dW2 = h.T @ dlogits", "dW2 = 2 * h.T @ dlogits"))
    impl = load_implementation(str(script), tmp_path)
    assert whole_backward(impl, search=search(3)).tensor == "W2"  # on its own, the property finds it
    verdict = whole_backward(impl, search=search(3), lecture=LECTURE, lecture_failures={"W2"})
    assert verdict.status == "pass", verdict.diagnosis.message
    everything = whole_backward(impl, search=search(3), lecture_failures=set(GRADIENT_ORDER))
    assert everything.status == "skip"


def test_size_findings_name_the_size_and_its_pattern():
    failing = Config(batch_size=2, vocab_size=2, n_embd=1, n_hidden=1, block_size=1)
    (found,) = size_findings(LECTURE, failing, lambda c: c.vocab_size != 27)
    assert (found.attr, found.label, found.lecture, found.pattern) == ("vocab_size", "vocab_size", 27, "all")
    assert size_findings(LECTURE, failing, lambda c: False) == []
    odd = size_findings(LECTURE, failing, lambda c: c.batch_size % 2 == 1 or c.vocab_size == 2)
    assert [f.attr for f in odd] == ["vocab_size"]  # n=2 alone passes: batch size is not blamed
    assert size_findings(LECTURE, Config(batch_size=3), lambda c: c.batch_size % 2 == 1)[0].pattern == "odd"
    (one,) = size_findings(LECTURE, failing, lambda c: c.n_hidden == 1)
    assert one.pattern == "size_one" and one.failing == (1,) and 64 in one.passing
    pow2 = SizeFinding("batch_size", 32, (3, 5, 6, 7), (2, 4, 8, 16, 32))
    assert pow2.pattern == "not_power_of_two" and pow2.describe() == "fails at n=3, 5, 6, 7; passes at n=2, 4, 8, 16, 32"


def test_a_correct_ex1_script_passes(ex1_solution):
    impl = load_implementation(str(ex1_solution), REPO)
    assert whole_backward(impl, search=search(3)).status == "pass"


def test_missing_upstream_multiplication_in_a_line_fails():
    def backward_h(dh, h):
        return 1.0 - h ** 2  # forgot "* dh": passes with an upstream of ones, never with a random one

    verdict = line_property(backward_h, "h", search=search())
    assert verdict.status == "fail" and verdict.exercise == "prop-lines" and verdict.tensor == "h"
    assert "n=2" in verdict.details["case"]


def test_wrong_dim_sum_in_a_line_is_found():
    def backward_probs(dprobs, counts, counts_sum_inv):
        # sums over dim 0 and transposes: the right shape only when n == vocab_size
        return {"counts": counts_sum_inv * dprobs, "counts_sum_inv": (counts * dprobs).sum(0, keepdim=True).T}

    verdict = line_property(backward_probs, "probs", search=search())
    assert verdict.status == "fail"
    assert verdict.diagnosis.code in ("shape", "mismatch", "exception")


def test_logit_maxes_routing_matters_per_line():
    def backward_logit_maxes(dlogit_maxes, logits):
        return torch.ones_like(logits) / logits.shape[1] * dlogit_maxes  # spreads instead of routing to the max

    verdict = line_property(backward_logit_maxes, "logit_maxes", search=search())
    assert verdict.status == "fail"


def test_broadcast_tier_catches_a_keepdim_bug(ex1_solution):
    # the lecture-style solution writes db1 = dhprebn.sum(0): right for b1 (H,), wrong for b1 (1, H)
    impl = load_implementation(str(ex1_solution), REPO)
    verdict = whole_backward(impl, search=search(8), broadcast=True)
    assert verdict.status == "fail" and verdict.exercise == "bcast-ex1"
    assert verdict.diagnosis.code == "broadcast"
    assert verdict.diagnosis.message.startswith("with parameters ")
    assert verdict.details["pattern"] in verdict.diagnosis.message
    assert verdict.tensor in ("b1", "b2", "bngain", "bnbias")


def test_broadcast_tier_per_line_names_the_pattern():
    verdict = line_property(backward_lines.backward_logits, "logits", search=search(8), broadcast=True)
    assert verdict.status == "fail" and verdict.diagnosis.code == "broadcast"
    assert "b2 (1, V)" in verdict.diagnosis.message


NAIVE_CE = """
def cross_entropy_backward(logits, Yb):
    n = logits.shape[0]
    counts = logits.exp()
    dlogits = counts / counts.sum(1, keepdim=True)
    dlogits[range(n), Yb] -= 1
    return dlogits / n
"""


def test_naive_softmax_overflows_on_extreme_logits(tmp_path):
    verdict = cross_entropy_property(module(tmp_path, NAIVE_CE), search=search(20), lecture_passed=True)
    assert verdict.status == "fail" and verdict.exercise == "prop-ex2"
    assert verdict.diagnosis.code == "nonfinite"
    assert "subtract each row's max" in verdict.diagnosis.message


HARDCODED_BN = """
def batchnorm_backward(dhpreact, bngain, bnvar_inv, bnraw):
    n = 32
    return bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
"""


def test_fused_batchnorm_with_hardcoded_n_fails_small_batches(tmp_path):
    verdict = batchnorm_property(module(tmp_path, HARDCODED_BN), search=search(), lecture=LECTURE, lecture_passed=True)
    assert verdict.status == "fail" and verdict.diagnosis.code == "hardcoded_shape"
    assert verdict.diagnosis.message.startswith("passes at n=32, fails at n=")


def test_failures_say_how_to_reproduce(tmp_path):
    verdict = cross_entropy_property(module(tmp_path, NAIVE_CE), search=Search(examples=20, seed=99))
    assert "99" in verdict.details["reproduce"] or "derandomized" in verdict.details["reproduce"]


# --- through the real plugin ---------------------------------------------------------------------

def test_plugin_reports_hardcoded_shape_and_runs_the_broadcast_tier(pytester):
    write_script(pytester, solution_with("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0 / 32"))
    pytester.makeini("[pytest]\nbackprop_broadcast = true\n")
    result = run_inprocess(pytester, "--backprop", "--backprop-impl=student.py", "--backprop-examples=3",
                           "--backprop-json=report.json", "-p", "no:cacheprovider", "-k", "properties")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*backprop::properties::ex1*", "*passes at n=32, fails at n=2: 32 is written into your "
                                 "code: `dlogprobs[[]range(n), Yb[]] = -1.0 / 32` (student.py:8)*"])
    report = json.loads((pytester.path / "report.json").read_text())
    props = {c["exercise"]: c for c in report["checks"] if c["exercise"] in ("prop-ex1", "bcast-ex1")}
    assert set(props) == {"prop-ex1", "bcast-ex1"}
    assert props["prop-ex1"]["diagnosis"]["code"] == "hardcoded_shape"
    assert props["prop-ex1"]["details"]["case"].startswith("Case(n=2")


def collected(pytester, *args) -> list[str]:
    items, _ = pytester.inline_genitems("--backprop", "--backprop-impl=reference_model.backward_lines", *args)
    return [item.nodeid for item in items]


def test_plugin_collects_properties_for_what_the_implementation_offers(pytester):
    ids = collected(pytester)
    assert "backprop::properties::ex1" in ids and "backprop::properties::lines::loss" in ids
    assert sum(i.startswith("backprop::properties::lines::") for i in ids) == 20
    assert not any("broadcast" in i for i in ids)
    wide = collected(pytester, "--backprop-broadcast")
    assert [i for i in wide if "::broadcast::" in i] == [
        "backprop::properties::broadcast::ex1", "backprop::properties::broadcast::hprebn",
        "backprop::properties::broadcast::hpreact", "backprop::properties::broadcast::logits"]
    assert not any("properties" in i for i in collected(pytester, "--backprop-examples=0"))


# --- measured causes: each hint only for the cause it checked ----------------------------------

def prop(tmp_path: Path, edit_from: str, edit_to: str, examples: int = 8):
    script = tmp_path / "student.py"
    script.write_text(solution_with(edit_from, edit_to))
    return script, whole_backward(load_implementation(str(script), tmp_path), search=search(examples),
                                  lecture=LECTURE, lecture_passed=True)


def test_float32_tensor_of_hardcoded_shape_is_one_verdict_naming_both(tmp_path):
    """`torch.zeros((32, 27))`: 32 and 27 are named at their line, the float32 tensor is said plainly,
    and no second story ("fails in float64 at the same sizes") sits next to the n=2 case."""
    script, v = prop(tmp_path, "dlogprobs = torch.zeros_like(logprobs)", "dlogprobs = torch.zeros((32, 27))")
    assert (v.status, v.diagnosis.code, v.tensor) == ("fail", "hardcoded_shape", "logprobs")
    message = v.diagnosis.message
    assert message.startswith("passes at n=32, fails at n=2; passes at vocab_size=27, fails at vocab_size=2: "
                              f"32 and 27 are written into your code: `dlogprobs = torch.zeros((32, 27))` ({script}:7)")
    assert f"your code also creates float32 tensors (torch.zeros at {script}:7)" in message
    assert "same sizes" not in message and "[type]" not in message
    assert v.details["float32"] is True and {f["value"] for f in v.details["found"]} == {32, 27}
    assert "n=2" in v.details["case"]


def test_float32_intermediate_exact_at_powers_of_two_is_precision(tmp_path):
    """`torch.tensor(1.0 / n)` rounds 1/n to float32: exact at n=32 (a power of two), wrong at n=3."""
    script, v = prop(tmp_path, "dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)",
                     "dhprebn += torch.tensor(1.0 / n) * (torch.ones_like(hprebn) * dbnmeani)")
    assert (v.status, v.diagnosis.code, v.tensor) == ("fail", "precision", "hprebn")
    message = v.diagnosis.message
    assert message.startswith("your code creates float32 tensors whatever the inputs' dtype: `dhprebn += "
                              f"torch.tensor(1.0 / n) * (torch.ones_like(hprebn) * dbnmeani)` ({script}:32)")
    assert "The same case passes when new tensors default to float64 (checked)" in message
    assert "fails at n=3, 5, 6, 7; passes at n=2, 4, 8, 16, 32" in message and "power of two" in message
    assert "written into your code" not in message


def test_torch_where_with_python_numbers_is_precision(tmp_path):
    script, v = prop(tmp_path, "dlogprobs = torch.zeros_like(logprobs)\ndlogprobs[range(n), Yb] = -1.0 / n",
                     "dlogprobs = torch.where(F.one_hot(Yb, logprobs.shape[1]).bool(), -1.0 / n, 0.0)")
    assert v.diagnosis.code == "precision"
    assert f"`dlogprobs = torch.where(F.one_hot(Yb, logprobs.shape[1]).bool(), -1.0 / n, 0.0)` ({script}:7)" in (
        v.diagnosis.message)
    assert "in a float64 run dlogprobs comes out float32" in v.diagnosis.message


def test_squeeze_breaking_only_at_size_1_is_size_one(tmp_path):
    script, v = prop(tmp_path, "db1 = dhprebn.sum(0)", "db1 = dhprebn.sum(0, keepdim=True).squeeze()")
    assert (v.diagnosis.code, v.tensor) == ("size_one", "b1")
    assert v.diagnosis.message.startswith("passes at n_hidden=2, 3, 4, 5, 8, 64, fails only at n_hidden=1: your code "
                                          "calls `.squeeze()` without a dimension")
    assert f"`db1 = dhprebn.sum(0, keepdim=True).squeeze()` ({script}:35)" in v.diagnosis.message
    assert "written into your code" not in v.diagnosis.message


def test_a_size_not_written_as_a_number_is_size_specific(tmp_path):
    _, v = prop(tmp_path, "dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0 / 2**5")
    assert (v.diagnosis.code, v.details["size"]) == ("size_specific", "batch_size")
    assert "fails at every n tried but 32, yet 32 is not written into your code as a number" in v.diagnosis.message
    assert "fails at n=2, 3, 4, 5, 6, 7, 8, 16; passes at n=32" in v.diagnosis.message


def test_a_hardcoded_block_size_in_a_loop_is_quoted(tmp_path):
    script, v = prop(tmp_path, "for j in range(Xb.shape[1]):", "for j in range(3):")
    assert (v.diagnosis.code, v.details["size"]) == ("hardcoded_shape", "block_size")
    assert v.diagnosis.message.startswith(f"passes at block_size=3, fails at block_size=1: 3 is written into your "
                                          f"code: `for j in range(3):` ({script}:39)")


def test_explicit_float32_failing_at_the_lecture_sizes_reports_those_sizes(tmp_path):
    """`.float()` fails the lecture's own sizes in float64 whatever the default dtype: the verdict is
    about those sizes (its case is n=32), not about the shrunk n=2 case."""
    _, v = prop(tmp_path, "dh = dlogits @ W2.T", "dh = (dlogits @ W2.T).float()")
    assert v.diagnosis.message.startswith("passes the lecture's check in float32 but fails in float64 at the "
                                          "lecture's sizes (n=32, vocab_size=27")
    assert "your code makes float32 tensors: `dh = (dlogits @ W2.T).float()`" in v.diagnosis.message
    assert v.details["case"].startswith("Case(n=32")


def test_per_line_function_with_a_hardcoded_size_quotes_its_line(tmp_path):
    path = tmp_path / "lines_mod.py"
    path.write_text("def backward_loss(dloss, logprobs, Yb, n):\n"
                    "    import torch\n"
                    "    d = torch.zeros_like(logprobs)\n"
                    "    d[range(n), Yb] = -1.0 / 32\n"
                    "    return d * dloss\n")
    spec = importlib.util.spec_from_file_location("lines_mod", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from pytest_backprop.problems.instance import build_problem
    from reference_model.data import load_words

    values = build_problem(load_words(None)).truth.values
    v = line_property(mod.backward_loss, "loss", search=search(), lecture_values=values, lecture=LECTURE)
    assert v.diagnosis.code == "hardcoded_shape"
    assert f"32 is written into your code: `d[range(n), Yb] = -1.0 / 32` ({path}:4)" in v.diagnosis.message


HARDCODED_CE = """
import torch.nn.functional as F

def cross_entropy_backward(logits, Yb, n):
    dlogits = F.softmax(logits, 1)
    dlogits[range(n), Yb] -= 1
    return dlogits / 32
"""


def test_exercise2_hardcoded_n_quotes_its_line(tmp_path):
    v = cross_entropy_property(module(tmp_path, HARDCODED_CE), search=search(10), lecture_passed=True)
    assert v.exercise == "prop-ex2" and v.diagnosis.code == "hardcoded_shape"
    assert "32 is written into your code: `return dlogits / 32` (" in v.diagnosis.message
    assert v.diagnosis.message.startswith("passes at n=32, fails at n=")


def test_notebook_constant_of_an_earlier_cell_is_quoted_with_its_cell(tmp_path):
    spec = importlib.util.spec_from_file_location("backprop_test_notebooks", Path(__file__).parent / "data" / "notebooks.py")
    nbdata = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nbdata)
    ex1 = nbdata.EX1.replace("-1.0/n", "-1.0/BATCH")
    assert ex1 != nbdata.EX1
    nb = nbdata.lecture_notebook(ex1=ex1, extra_before_ex1=("BATCH = 32",))
    impl = load_implementation(str(nbdata.write(nb, tmp_path / "nb.ipynb")), tmp_path)
    v = whole_backward(impl, search=search(), lecture=LECTURE, lecture_passed=True)
    assert v.diagnosis.code == "hardcoded_shape"
    (found,) = v.details["found"]
    assert found["source"] == "BATCH = 32" and found["location"].startswith("cell ")
