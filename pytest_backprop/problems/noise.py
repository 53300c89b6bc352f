"""The float64 noise floor: how far a correct float64 derivation may be from autograd.

The tolerance rule (:mod:`pytest_backprop.problems.tolerance`) scales PyTorch's own float32 error down to
float64. That error can be luckily tiny where a true gradient is a cancellation (db1 is exactly 0;
at n = 2 everything below batchnorm nearly is), while a correct derivation is a few ulps of the
*terms* that cancel away. So in float64 every tolerance is widened to the larger of the rule's times
:data:`FLOAT64_SLACK` and :func:`noise_floor`. Real mistakes are off by a sizable fraction of those
terms, far above either.

The terms are found by running backprop with every Jacobian replaced by its absolute value
(``|J|^T``), so that nothing cancels. It is derived from each line's own expression, for any
forward pass, one operation at a time:

- an operation whose Jacobian entries are its operands' values -- ``*``, ``/``, ``@``, the base of
  ``**``, and calls such as ``matmul``, ``mm``, ``bmm``, ``einsum``, ``mul``, ``div``, ``pow``,
  ``linear``, ``prod`` (:data:`PRODUCTS`) -- is evaluated on the absolute values of its operands;
- the gradient an operation passes to an operand is made non-negative before it goes on wherever
  it may be negative (below a ``-``, a ``/``'s denominator, a negative power, a call not known to
  keep the sign, :data:`SIGN_PRESERVING`), so that two uses of one tensor in a line
  (``x*w - x*v``) add up instead of cancelling.

This is exact for elementwise functions, sums, means, differences, indexing, views, ``max``
selections and products (every line of the lecture's table: the floor is the one the kit computed
by hand before, bit for bit), and an upper bound where operations compose. One call whose own
Jacobian mixes signs within one output (``softmax``, ``layer_norm``, ``logsumexp`` as a single
call) can still cancel inside that call: write such steps as separate lines, as the lecture does.
"""

from __future__ import annotations

import ast
from types import CodeType, ModuleType
from typing import Any, Mapping

import torch

from .forward import DEFAULT_ENV
from .table import Line, LineTable

#: Factor on the rule's float64 tolerance, and ulps per term of the noise floor.
FLOAT64_SLACK = 1024
EPS64 = torch.finfo(torch.float64).eps
DTYPE = torch.float64

#: Calls whose Jacobian entries are their operands' values: evaluated on |operands|.
PRODUCTS = frozenset({
    "matmul", "mm", "bmm", "mv", "dot", "vdot", "inner", "outer", "ger", "einsum", "tensordot", "kron",
    "linear", "bilinear", "addmm", "addmv", "addbmm", "baddbmm", "mul", "multiply", "div", "divide",
    "true_divide", "prod", "cumprod",
})
#: Calls whose base (the tensor, not the exponent) is evaluated as |base|.
POWERS = frozenset({"pow", "float_power"})
#: Calls whose gradient has the sign of the incoming one: reductions, reshapes, selections and
#: increasing elementwise maps. Anything else may flip signs, so its operands' gradients are made absolute.
SIGN_PRESERVING = frozenset({
    "sum", "mean", "nansum", "cumsum", "max", "min", "amax", "amin", "view", "view_as", "reshape", "reshape_as",
    "expand", "expand_as", "broadcast_to", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose",
    "t", "contiguous", "clone", "repeat", "tile", "narrow", "select", "index_select", "gather", "take",
    "take_along_dim", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "where", "masked_fill", "clamp",
    "clip", "to", "float", "double", "half", "type_as", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p",
    "sqrt", "tanh", "sigmoid", "relu", "leaky_relu", "elu", "softplus", "atan", "asinh", "erf", "logaddexp",
})
#: Attributes that read a tensor without a gradient flowing (``emb.shape[0]``).
NOT_DIFFERENTIATED = frozenset({"shape", "ndim", "dtype", "device", "size", "dim", "numel", "requires_grad",
                                "is_floating_point", "data"})

_ABS = "__backprop_noise_abs__"  # |x| forward, |g| backward
_POS = "__backprop_noise_pos__"  # x forward, |g| backward


class _Magnitude(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.abs()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()


class _PositiveGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()


def _magnitude(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            return _Magnitude.apply(x)
        return x.abs() if (x.is_floating_point() or x.dtype not in (torch.bool, torch.uint8)) else x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return abs(x)
    return x


def _positive_grad(x: Any) -> Any:
    return _PositiveGrad.apply(x) if isinstance(x, torch.Tensor) and x.requires_grad else x


def _uses(node: ast.AST, differentiable: frozenset[str]) -> list[str]:
    """The differentiable names ``node`` reads where a gradient flows (not in ``x.shape`` or an index)."""
    if isinstance(node, ast.Name):
        return [node.id] if node.id in differentiable else []
    if isinstance(node, ast.Attribute) and node.attr in NOT_DIFFERENTIATED:
        return []
    if isinstance(node, ast.Subscript):
        return _uses(node.value, differentiable)
    return [name for child in ast.iter_child_nodes(node) for name in _uses(child, differentiable)]


def _call(node: ast.expr, helper: str) -> ast.expr:
    return ast.Call(ast.Name(helper, ast.Load()), [node], [])


class _AbsoluteJacobian:
    """Rewrites one expression so that its backward is ``|J|^T`` (see the module's docstring).

    Walking down from the output, it knows whether the gradient arriving at a node is known to be
    non-negative; only where it may not be, and where that matters (a compound operand, or a tensor
    used twice), is the gradient made absolute (``_POS``). Operands of products get ``|value|``:
    a tensor used once is replaced by its absolute value in the namespace (``leaf_abs``), anything
    else is wrapped (``_ABS``).
    """

    def __init__(self, differentiable: frozenset[str], modules: set[str], uses: list[str]) -> None:
        self.differentiable, self.modules = differentiable, modules
        self.once = {name for name in uses if uses.count(name) == 1}
        self.leaf_abs: set[str] = set()

    def _differentiable(self, node: ast.AST) -> bool:
        return bool(_uses(node, self.differentiable))

    def rewrite(self, node: ast.expr, nonneg: bool) -> ast.expr:
        """``node`` rewritten; ``nonneg``: the gradient arriving at it is known to be >= 0."""
        if not self._differentiable(node):
            return node
        if isinstance(node, ast.Name):
            return node if nonneg or node.id in self.once else _call(node, _POS)
        if not nonneg:
            return _call(self.rewrite(node, True), _POS)
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, (ast.Mult, ast.MatMult, ast.Div)):
                node.left, node.right = self._operand(node.left), self._operand(node.right)
            elif isinstance(node.op, ast.Pow):
                node.left, node.right = self._operand(node.left), self.rewrite(node.right, False)
            else:
                keeps_sign = isinstance(node.op, ast.Add)
                node.left, node.right = self.rewrite(node.left, True), self.rewrite(node.right, keeps_sign)
        elif isinstance(node, ast.UnaryOp):
            node.operand = self.rewrite(node.operand, isinstance(node.op, ast.UAdd))
        elif isinstance(node, ast.Call):
            self._rewrite_call(node)
        elif isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
            node.value = self.rewrite(node.value, True)  # transposes, .values, indexing keep the sign
        elif isinstance(node, (ast.Tuple, ast.List)):
            node.elts = [self.rewrite(e, True) for e in node.elts]
        return node

    def _operand(self, node: ast.expr) -> ast.expr:
        """An operand of a product: evaluated as ``|value|``, its gradient absolute."""
        if isinstance(node, ast.Constant):
            return ast.Constant(abs(node.value)) if isinstance(node.value, (int, float)) else node
        if isinstance(node, ast.Starred):
            return node
        if isinstance(node, ast.Name) and node.id in self.once:
            self.leaf_abs.add(node.id)
            return node
        inner = self.rewrite(node, True) if self._differentiable(node) else node
        return _call(inner, _ABS)

    def _rewrite_call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        method = isinstance(func, ast.Attribute) and not (isinstance(func.value, ast.Name) and func.value.id in self.modules)
        if name in PRODUCTS or name in POWERS:
            operands = ([func.value] if method else []) + list(node.args)
            rewritten = [self._operand(o) if (name in PRODUCTS or i == 0) else self.rewrite(o, False)
                         for i, o in enumerate(operands)]
            if method:
                func.value, rewritten = rewritten[0], rewritten[1:]
            node.args = rewritten
            node.keywords = [ast.keyword(k.arg, self.rewrite(k.value, False)) for k in node.keywords]
            return
        keeps_sign = name in SIGN_PRESERVING
        if method:
            func.value = self.rewrite(func.value, keeps_sign)
        node.args = [self.rewrite(a, keeps_sign) for a in node.args]
        node.keywords = [ast.keyword(k.arg, self.rewrite(k.value, keeps_sign)) for k in node.keywords]


_CODE: dict[tuple[str, tuple[str, ...], int], tuple[CodeType, frozenset[str]]] = {}


def absolute_jacobian_code(line: Line) -> tuple[CodeType, frozenset[str]]:
    """The line's assignment rewritten so that autograd through it computes ``|J|^T``, and the
    inputs to replace by their absolute values (cached per line).

    Example::

        code, leaf_abs = absolute_jacobian_code(table.line_of["logits"])   # leaf_abs: {'h', 'W2'}
    """
    env = line.env if line.env is not None else DEFAULT_ENV
    key = (line.source, line.inputs, id(env))
    if key not in _CODE:
        statement = ast.parse(line.source).body[0]
        assert isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None
        differentiable = frozenset(line.inputs)
        names = {n.id for n in ast.walk(statement.value) if isinstance(n, ast.Name)}
        modules = {n for n in names if isinstance(env.get(n), ModuleType)}
        rewriter = _AbsoluteJacobian(differentiable, modules, _uses(statement.value, differentiable))
        value = rewriter.rewrite(statement.value, True)
        tree = ast.Module([ast.Assign([ast.Name(line.output, ast.Store())], value)], [])
        code = compile(ast.fix_missing_locations(tree), f"<noise floor: {line.source}>", "exec")
        _CODE[key] = (code, frozenset(rewriter.leaf_abs))
    return _CODE[key]


def _abs_vjp(line: Line, values: Mapping[str, Any], level: torch.Tensor) -> dict[str, torch.Tensor]:
    """``|J|^T level`` for one line (``level`` >= 0)."""
    code, leaf_abs = absolute_jacobian_code(line)
    namespace: dict[str, Any] = {k: values[k] for k in line.constants}
    leaves = {k: (values[k].detach().abs() if k in leaf_abs else values[k].detach()).clone().requires_grad_(True)
              for k in line.inputs}
    namespace.update(leaves)
    namespace[_ABS], namespace[_POS] = _magnitude, _positive_grad
    with torch.enable_grad():
        exec(code, line.env if line.env is not None else DEFAULT_ENV, namespace)  # noqa: S102
        out = namespace[line.output]
        # a scalar objective: autograd.grad without grad_outputs (that path imports sympy, ~0.3 s)
        parts = torch.autograd.grad((out * level).sum(), list(leaves.values()), allow_unused=True)
    return {k: (p.abs() if p is not None else torch.zeros_like(leaves[k])) for k, p in zip(leaves, parts)}


def noise_floor(table: LineTable, values: Mapping[str, Any], grads: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How far a correct float64 derivation may be from autograd, per gradient.

    Rounding error analysis of backprop, with ``FLOAT64_SLACK`` ulps per term: each tensor's
    gradient carries ``FLOAT64_SLACK * eps64 * |gradient|`` plus the error its consumers pass on;
    both go back through each line's absolute Jacobian (``|J|^T``, so nothing cancels). The floor
    of a gradient is its largest element. Where a true gradient is a cancellation (db1 is exactly
    0; at n=2 everything below batchnorm is nearly 0) the floor is the size of the terms that
    cancel, not the noise-sized result.

    Example::

        floor = noise_floor(problem.spec.table, problem.truth64.values, problem.truth64.grads)
        floor["b1"]   # ~1e-13 x sum|dhprebn|, although db1 is 0
    """
    unit = FLOAT64_SLACK * EPS64
    noise: dict[str, torch.Tensor] = {table.loss: torch.full((), unit, dtype=DTYPE)}
    for line in reversed(table.differentiable_lines):
        out = line.output
        level = noise[out] if out in noise else torch.zeros((), dtype=DTYPE)
        if out in grads:
            level = level + unit * grads[out].abs().to(DTYPE)
        for name, part in _abs_vjp(line, values, level.to(values[out].dtype)).items():
            noise[name] = part.to(DTYPE) if name not in noise else noise[name] + part.to(DTYPE)
    return {name: _absmax((noise[name] if name in noise else 0.0) + unit * grad.abs().to(DTYPE))
            for name, grad in grads.items()}


def _absmax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0
