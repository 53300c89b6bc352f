"""The float64 noise floor, derived for any line table: it is the hand-made floor on the lecture's
table bit for bit, and it is backprop through exact absolute Jacobians (checked against
``torch.autograd.functional.jacobian``) where a naive "VJP, then abs" would cancel."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import EXAMPLES

from pytest_backprop.problems import load_spec
from pytest_backprop.problems.forward import line_vjp, run_line
from pytest_backprop.problems.lecture import LECTURE
from pytest_backprop.problems.noise import EPS64, FLOAT64_SLACK, noise_floor

UNIT = FLOAT64_SLACK * EPS64
SMALL_LECTURE = {"batch_size": 3, "vocab_size": 4, "n_embd": 2, "n_hidden": 3, "block_size": 2}


def floor_by(table, values, grads, abs_vjp) -> dict[str, torch.Tensor]:
    """The floor's recurrence (an oracle, written out) with a given per-line ``|J|^T level``."""
    noise = {table.loss: torch.full((), UNIT, dtype=torch.float64)}
    for line in reversed(table.differentiable_lines):
        level = noise.get(line.output, torch.zeros((), dtype=torch.float64))
        if line.output in grads:
            level = level + UNIT * grads[line.output].abs()
        for name, part in abs_vjp(line, values, level).items():
            noise[name] = noise[name] + part if name in noise else part
    return {name: noise.get(name, torch.zeros(())) + UNIT * g.abs() for name, g in grads.items()}


def exact_abs_vjp(line, values, level):
    """``|J|^T level`` from the line's full Jacobian."""
    inputs = tuple(values[k].detach().double() for k in line.inputs)

    def f(*args):
        namespace = {k: values[k] for k in line.constants}
        namespace.update(zip(line.inputs, args))
        return run_line(line, namespace)

    out = f(*inputs)
    level = level.expand_as(out).reshape(-1)
    jacobians = torch.autograd.functional.jacobian(f, inputs)
    return {k: (j.abs().reshape(out.numel(), -1).T @ level).reshape(x.shape)
            for k, j, x in zip(line.inputs, jacobians, inputs)}


def naive_abs_vjp(line, values, level):
    """The VJP with the signed values, then abs: what a rule without |inputs| would compute."""
    return {k: v.abs() for k, v in line_vjp(line, values, level).items()}


def hand_rule_abs_vjp(line, values, level):
    """The lecture's floor as the kit computed it by hand: |inputs| on the six product lines."""
    absolute = line.output in {"hprebn", "bndiff2", "bnraw", "hpreact", "logits", "probs"}
    ns = {k: values[k] for k in line.constants}
    leaves = {k: (values[k].detach().abs() if absolute else values[k].detach()).clone().requires_grad_(True)
              for k in line.inputs}
    ns.update(leaves)
    with torch.enable_grad():
        out = run_line(line, ns)
        parts = torch.autograd.grad((out * level).sum(), list(leaves.values()), allow_unused=True)
    return {k: p.abs() for k, p in zip(leaves, parts)}


def truth64(spec, sizes=None, **data):
    t = spec.truth(spec.inputs(sizes, seed=7, **data), dtype=torch.float64)
    return t.values, t.grads


def as_floats(floor: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.abs().max()) if v.numel() else 0.0 for k, v in floor.items()}


@pytest.mark.parametrize("sizes", [None, SMALL_LECTURE, {**SMALL_LECTURE, "batch_size": 2}], ids=["lecture", "small", "n=2"])
def test_the_lectures_floor_is_the_hand_made_one_bit_for_bit(sizes):
    from reference_model.data import build_splits, load_words

    data = {"dataset": build_splits(load_words(None))} if sizes is None else {}
    values, grads = truth64(LECTURE, sizes, **data)
    assert noise_floor(LECTURE.table, values, grads) == as_floats(floor_by(LECTURE.table, values, grads, hand_rule_abs_vjp))


@pytest.mark.parametrize("spec, sizes", [(LECTURE, SMALL_LECTURE),
                                         (load_spec(EXAMPLES / "problems" / "two_layer_relu.py"), {"n": 5})],
                         ids=["lecture", "two_layer_relu"])
def test_the_floor_is_backprop_through_exact_absolute_jacobians(spec, sizes):
    values, grads = truth64(spec, sizes)
    exact = as_floats(floor_by(spec.table, values, grads, exact_abs_vjp))
    assert noise_floor(spec.table, values, grads) == pytest.approx(exact, rel=1e-12, abs=0)


FORWARD = '''\
import torch

SIZES = {"n": 6, "d": 4}


def make_inputs(sizes, generator):
    n, d = sizes["n"], sizes["d"]
    return {"x": torch.randn((n, d), generator=generator), "w": torch.randn(d, generator=generator),
            "v": torch.randn(d, generator=generator), "n": n}


def forward(x, w, v, n):
'''


def spec_with(tmp_path, body: str):
    path = tmp_path / "cancel.py"
    path.write_text(FORWARD + textwrap.indent(textwrap.dedent(body), "    "))
    return load_spec(path)


def test_a_product_inside_a_reduction_needs_absolute_values(tmp_path):
    """Check of the rule: dw = sum_i x_i ds_i cancels when signed; the floor is the size of its terms."""
    spec = spec_with(tmp_path, """
        s = (x * w).sum(1) + (x / v).mean(1)
        t = torch.tanh(s - x.sum(1))
        return t.mean() + v.sum() / n
    """)
    values, grads = truth64(spec)
    floor = noise_floor(spec.table, values, grads)
    assert floor == pytest.approx(as_floats(floor_by(spec.table, values, grads, exact_abs_vjp)), rel=1e-12, abs=0)
    naive = as_floats(floor_by(spec.table, values, grads, naive_abs_vjp))
    assert naive["w"] < floor["w"] and naive["v"] < floor["v"]


def test_a_tensor_used_twice_in_a_line_adds_its_terms(tmp_path):
    """x*w - x*v: the exact |J| is |w - v|, the terms are |w| + |v|; the floor bounds the terms."""
    spec = spec_with(tmp_path, """
        y = x * w - x * v
        return y.pow(2).mean()
    """)
    values, grads = truth64(spec)

    def terms(line, values, level):
        if line.output != "y":
            return exact_abs_vjp(line, values, level)
        x, w, v = (values[k].abs() for k in ("x", "w", "v"))
        return {"x": level * (w + v), "w": (level * x).sum(0), "v": (level * x).sum(0)}

    by_terms, exact = floor_by(spec.table, values, grads, terms), floor_by(spec.table, values, grads, exact_abs_vjp)
    assert noise_floor(spec.table, values, grads) == pytest.approx(as_floats(by_terms), rel=1e-12, abs=0)
    assert bool((by_terms["x"] >= exact["x"]).all()) and bool((by_terms["x"] > exact["x"] * 1.01).any())
