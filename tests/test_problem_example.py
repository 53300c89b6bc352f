"""The instructors' example problem (examples/problems/two_layer_relu.py): the kit derives its
table, truth and tolerances, the correct backward passes the kit's comparison, the buggy one fails
exactly where its mistakes are."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLES

from pytest_backprop.judge.compare import compare
from pytest_backprop.problems import Problem, load_spec, problem_from_spec

FOLDER = EXAMPLES / "problems"
SPEC = load_spec(FOLDER / "two_layer_relu.py")


def run_script(name: str, problem: Problem) -> dict[str, torch.Tensor]:
    """Run a d<name> script on the problem's forward values; its gradients by tensor name."""
    namespace = {**problem.cache(), **problem.globals()}
    path = FOLDER / name
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 -- the example's own code
    return {name: namespace["d" + name] for name in problem.spec.order if "d" + name in namespace}


def verdicts(grads: dict[str, torch.Tensor], problem: Problem) -> dict[str, bool]:
    return {name: compare(grads[name], problem.grads[name]).approximate is True for name in problem.spec.order}


def test_the_table_is_derived_from_the_forward():
    assert [(l.output, l.inputs, l.constants) for l in SPEC.lines] == [
        ("z1", ("x", "W1", "b1"), ()),
        ("a1", ("z1",), ()),
        ("z2", ("a1", "W2", "b2"), ()),
        ("zmax", ("z2",), ()),
        ("shifted", ("z2", "zmax"), ()),
        ("e", ("shifted",), ()),
        ("esum", ("e",), ()),
        ("logp", ("shifted", "esum"), ()),
        ("loss", ("logp",), ("n", "y")),
    ]
    assert SPEC.lines[4].source == "shifted = z2 - zmax"
    assert SPEC.name == "two-layer ReLU MLP"
    assert SPEC.leaves == ("x", "W1", "b1", "W2", "b2") and SPEC.constants == ("y", "n")
    assert SPEC.order == ("logp", "esum", "e", "shifted", "zmax", "z2", "a1", "W2", "b2", "z1", "x", "W1", "b1")
    assert [l.output for l in SPEC.consumers("shifted")] == ["e", "logp"]
    assert SPEC.size_ranges == {"n": (1, 16), "d": (2, 10), "h": (2, 12), "c": (2, 8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_truth_and_tolerances(dtype):
    p = problem_from_spec(SPEC, dtype=dtype)
    assert set(p.grads) == set(p.tolerances) == set(SPEC.order)
    assert p.grads["W1"].dtype == dtype and p.truth64.grads["W1"].dtype == torch.float64
    inputs = SPEC.inputs()
    leaves = {k: inputs[k].detach().double().requires_grad_(True) for k in SPEC.leaves}
    loss = SPEC.forward(**{**inputs, **leaves})  # the forward itself, called as Python
    loss.backward()
    for name in SPEC.leaves:
        assert torch.allclose(p.truth64.grads[name], leaves[name].grad, atol=1e-15, rtol=0), name
    assert all(t.atol > 0 for t in p.tolerances.values())
    if dtype == torch.float64:
        assert all("noise floor" in t.origin for t in p.tolerances.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [{}, {"n": 1, "c": 2}, {"n": 16, "d": 2, "h": 12, "c": 8}], ids=["default", "small", "large"])
def test_the_correct_backward_passes_and_the_buggy_one_fails_where_its_mistakes_are(dtype, sizes):
    p = problem_from_spec(SPEC, sizes, dtype=dtype, seed=3)
    assert all(verdicts(run_script("two_layer_relu_backward.py", p), p).values())
    buggy = verdicts(run_script("two_layer_relu_buggy.py", p), p)
    # db2 has the wrong shape; dz1 forgot the ReLU mask, and everything below it inherits that
    assert {name for name, ok in buggy.items() if not ok} == {"b2", "z1", "x", "W1", "b1"}
    assert compare(run_script("two_layer_relu_buggy.py", p)["b2"], p.grads["b2"]).problem == "shape"
