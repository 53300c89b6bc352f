"""A suite of custom autograd Functions with realistic backward bugs, each with its corrected twin,
plus correct controls (kinks, ties, overflow that is the true value). Used by tests/test_custom_suite.py
and benchmarks/custom_autograd.py.

Each :class:`Case` says how an engineer would test the Function: its reference (plain torch ops,
or None for finite differences), a hypothesis strategy for its inputs (the kit's default value
mix), fixed inputs (for gradcheck and for ``assert_close`` after ``out.sum().backward()``), and for a
bug, the check of check_backward that must catch it and a regex its message must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import hypothesis.strategies as st
import torch
import torch.nn.functional as F

from pytest_backprop.strategies import shapes, tensors

F64 = torch.float64


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # the bug class, or "control"
    fn: Callable[..., Any]
    reference: Callable[..., Any] | None
    inputs: st.SearchStrategy[tuple[torch.Tensor, ...]]
    fixed: Callable[..., tuple[torch.Tensor, ...]]  # fixed(seed=0): seeded randn inputs
    caught_by: tuple[str, ...] = ()  # the check(s) of check_backward that must catch it (empty: correct)
    message: str = ""  # a regex the failure message must match
    equivalent: Callable[..., Any] | None = None  # plain torch ops, for tools that need them (default: reference)

    @property
    def plain(self) -> Callable[..., Any]:
        """The same function in plain torch ops (the reference, or the equivalent of a Function checked by
        finite differences)."""
        return self.reference or self.equivalent  # type: ignore[return-value]

    @property
    def buggy(self) -> bool:
        return bool(self.caught_by)


# --- input strategies --------------------------------------------------------------------------

def one(min_dims: int = 1, max_dims: int = 3, max_side: int = 4) -> st.SearchStrategy[tuple[torch.Tensor, ...]]:
    return st.tuples(tensors(shapes(min_dims=min_dims, max_dims=max_dims, max_side=max_side)))


@st.composite
def matmul_pair(draw: Any, *, batched: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, i) or (b, t, i) and w (i, o)."""
    b, i, o = (draw(st.integers(1, 4)) for _ in range(3))
    lead = (b, draw(st.integers(1, 3))) if batched else (b,)
    return draw(tensors((*lead, i))), draw(tensors((i, o)))


@st.composite
def with_bias(draw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, n) and a bias b (n,)."""
    b, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return draw(tensors((b, n))), draw(tensors((n,)))


@st.composite
def images(draw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W) and a per-channel scale (C,)."""
    n, c, h, w = (draw(st.integers(1, 3)) for _ in range(4))
    return draw(tensors((n, c, h, w))), draw(tensors((c,)))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed + sum(shape)))


def fixed_one(*shape: int) -> Callable[..., tuple[torch.Tensor, ...]]:
    return lambda seed=0: (randn(*shape, seed=seed),)


def fixed_pair(a: tuple[int, ...], b: tuple[int, ...]) -> Callable[..., tuple[torch.Tensor, ...]]:
    return lambda seed=0: (randn(*a, seed=2 * seed + 1), randn(*b, seed=2 * seed + 2))


# --- matmul: y = x @ w ---------------------------------------------------------------------------

class Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = grad @ w.T
        if ctx.needs_input_grad[1]:
            gw = x.T @ grad
        return gx, gw


class LinearTransposedW(Linear):
    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w.T, grad.T @ x  # bug: dW is (x.T @ grad).T


class LinearNeedsGradSwapped(Linear):
    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[1]:  # bug: the flags of x and w swapped
            gx = grad @ w.T
        if ctx.needs_input_grad[0]:
            gw = x.T @ grad
        return gx, gw


class BatchedLinear(torch.autograd.Function):
    """y = x @ w for x (..., i): the backward flattens the leading dims."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gw = x.reshape(-1, x.shape[-1]).T @ grad.reshape(-1, grad.shape[-1])
        return grad @ w.T, gw


class BatchedLinearView(BatchedLinear):
    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gw = x.view(-1, x.shape[-1]).T @ grad.view(-1, grad.shape[-1])  # bug: .view needs contiguous memory
        return grad @ w.T, gw


class LinearAsStrided(Linear):
    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        xt = x.as_strided((x.shape[1], x.shape[0]), (1, x.shape[1]))  # bug: x.T, if x were contiguous
        return grad @ w.T, xt @ grad


# --- elementwise ---------------------------------------------------------------------------------

class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class SquareNoUpstream(Square):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x  # bug: forgets the upstream gradient


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        out = torch.zeros_like(x)
        out += 3 * x ** 2 * grad
        return out


class CubeFloat32Buffer(Cube):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        out = torch.zeros(x.shape)  # bug: float32 whatever x's dtype (float64 precision is lost)
        out += 3 * x ** 2 * grad
        return out


class Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class TwiceFloat32Output(Twice):
    @staticmethod
    def forward(ctx, x):
        return (x * 2).float()  # bug: a float32 output for any input


class Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y * (1 - y)


class SigmoidInPlace(Sigmoid):
    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y.mul_(1 - y)  # bug: overwrites the saved output (and the caller's tensor)


class SigmoidOnClass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x)
        SigmoidOnClass.saved = y  # bug: state on the class, shared by every call
        return y

    @staticmethod
    def backward(ctx, grad):
        y = SigmoidOnClass.saved
        return grad * y * (1 - y)


class WarmupScale(torch.autograd.Function):
    """y = 3x; the backward is right on every call."""

    @staticmethod
    def forward(ctx, x):
        return 3 * x

    @staticmethod
    def backward(ctx, grad):
        return 3 * grad


class WarmupScaleCounting(WarmupScale):
    calls = 0

    @staticmethod
    def backward(ctx, grad):
        WarmupScaleCounting.calls += 1  # bug: a warm-up factor counted on the class
        return 3 * grad * min(1.0, WarmupScaleCounting.calls / 1000)


class Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class ReluInPlaceForward(Relu):
    @staticmethod
    def forward(ctx, x):
        y = x.clamp_(min=0)  # bug: clamps the caller's tensor (no ctx.mark_dirty, no clone)
        ctx.save_for_backward(y)
        return y.clone()


class ReluAtZeroIsOne(Relu):
    """A subgradient choice: 1 at x = 0 (autograd says 0). Both are right."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x >= 0)


class Abs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.abs()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sign(x)


class Exp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y


class SignedLog1p(torch.autograd.Function):
    """sign(x) * log1p(|x|): smooth, derivative 1 / (1 + |x|) (autograd of the reference says 0 at x = 0)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x) * torch.log1p(x.abs())

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (1 + x.abs())


class SignedLog1pNoAbs(SignedLog1p):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (1 + x)  # bug: wrong for negative x


# --- reductions and broadcasting -------------------------------------------------------------------

class RowMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean(-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.unsqueeze(-1).expand(ctx.shape) / ctx.shape[-1]


class RowMeanNoUnsqueeze(RowMean):
    @staticmethod
    def backward(ctx, grad):
        return grad.expand(ctx.shape) / ctx.shape[-1]  # bug: without unsqueeze(-1) it broadcasts along rows


class MeanAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean()

    @staticmethod
    def backward(ctx, grad):
        return grad.expand(ctx.shape) / max(1, torch.Size(ctx.shape).numel())


class MeanAllNoDivide(MeanAll):
    @staticmethod
    def backward(ctx, grad):
        return grad.expand(ctx.shape)  # bug: the 1/N of the mean is missing


class AddBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b):
        return x + b

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.sum(0)


class AddBiasWrongDim(AddBias):
    @staticmethod
    def backward(ctx, grad):
        return grad, grad.sum(1)  # bug: b broadcasts over dim 0, not 1


class ChannelScale(torch.autograd.Function):
    """x (N, C, H, W) times a per-channel scale s (C,)."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        return grad * s.view(1, -1, 1, 1), (grad * x).sum((0, 2, 3))


class ChannelScaleView(ChannelScale):
    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        n, c = x.shape[:2]
        return grad * s.view(1, -1, 1, 1), (grad * x).view(n, c, -1).sum((0, 2))  # bug: .view on channels_last


# --- softmax family --------------------------------------------------------------------------------

class LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        m = x.amax(-1, keepdim=True)
        y = (x - m).exp().sum(-1).log() + m.squeeze(-1)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return grad.unsqueeze(-1) * (x - y.unsqueeze(-1)).exp()


class LogSumExpNaive(LogSumExp):
    @staticmethod
    def forward(ctx, x):
        y = x.exp().sum(-1).log()  # bug: exp overflows for large x (no max subtracted)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return grad.unsqueeze(-1) * x.exp() / x.exp().sum(-1, keepdim=True)


class Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return y * (grad - (grad * y).sum(-1, keepdim=True))


class LayerNorm(torch.autograd.Function):
    """Layer norm over the last dim (no affine), eps 1e-5."""

    @staticmethod
    def forward(ctx, x):
        mean = x.mean(-1, keepdim=True)
        rstd = ((x - mean) ** 2).mean(-1, keepdim=True).add(1e-5).rsqrt()
        xhat = (x - mean) * rstd
        ctx.save_for_backward(xhat, rstd)
        return xhat

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd = ctx.saved_tensors
        return rstd * (grad - grad.mean(-1, keepdim=True) - xhat * (grad * xhat).mean(-1, keepdim=True))


class RowMax(torch.autograd.Function):
    """max over the last dim; the gradient goes to the first maximum (ties are a kink)."""

    @staticmethod
    def forward(ctx, x):
        values, index = x.max(-1)
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return values

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out = torch.zeros(ctx.shape, dtype=grad.dtype)
        return out.scatter(-1, index.unsqueeze(-1), grad.unsqueeze(-1))


def _row_mean_reference(x: torch.Tensor) -> torch.Tensor:
    return x.mean(-1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-5)


def _signed_log1p(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def _pairs(name: str, kind: str, bug: Any, twin: Any, reference: Any, inputs: Any, fixed: Any,
           caught_by: tuple[str, ...], message: str) -> list[Case]:
    return [Case(f"{name} (bug)", kind, bug.apply, reference, inputs, fixed, caught_by, message),
            Case(f"{name} (fixed)", kind, twin.apply, reference, inputs, fixed)]


MATMUL = lambda x, w: x @ w  # noqa: E731
SQUARE = lambda x: x * x  # noqa: E731

CASES: list[Case] = [
    *_pairs("batched linear .view", "contiguity", BatchedLinearView, BatchedLinear, MATMUL,
            matmul_pair(batched=True), fixed_pair((2, 3, 4), (4, 5)), ("layouts",), r"non-contiguous.*view"),
    *_pairs("linear as_strided", "contiguity", LinearAsStrided, Linear, MATMUL, matmul_pair(),
            fixed_pair((3, 4), (4, 5)), ("layouts",), r"\(non-contiguous\)"),
    *_pairs("channel scale .view", "contiguity", ChannelScaleView, ChannelScale, lambda x, s: x * s.view(1, -1, 1, 1),
            images(), fixed_pair((2, 3, 2, 2), (3,)), ("layouts",), r"channels_last"),
    *_pairs("linear needs_input_grad", "needs_input_grad", LinearNeedsGradSwapped, Linear, MATMUL, matmul_pair(),
            fixed_pair((3, 4), (4, 5)), ("requires_grad",), r"when only \w+ requires grad"),
    *_pairs("sigmoid state on class", "class state", SigmoidOnClass, Sigmoid, torch.sigmoid, one(),
            fixed_one(3, 4), ("interleaved",), r"second forward"),
    *_pairs("sigmoid in-place backward", "in-place on saved tensor", SigmoidInPlace, Sigmoid, torch.sigmoid, one(),
            fixed_one(3, 4), ("backward", "retain_graph"), r"modified in place|second backward"),
    *_pairs("relu in-place forward", "in-place on input", ReluInPlaceForward, Relu, torch.relu, one(),
            fixed_one(3, 4), ("forward",), r"modified in place by forward"),
    *_pairs("logsumexp naive exp", "overflow", LogSumExpNaive, LogSumExp, lambda x: torch.logsumexp(x, -1), one(),
            fixed_one(3, 4), ("outputs",), r"output 0"),
    *_pairs("signed log1p", "kink in the reference", SignedLog1pNoAbs, SignedLog1p, _signed_log1p, one(),
            fixed_one(3, 4), ("gradients",), r"differ from the reference"),
    *_pairs("linear dW transposed", "wrong transpose", LinearTransposedW, Linear, MATMUL, matmul_pair(),
            fixed_pair((3, 4), (4, 5)), ("backward", "gradients"), r"shape|transposed"),
    *_pairs("square without upstream", "missing upstream multiply", SquareNoUpstream, Square, SQUARE, one(),
            fixed_one(3, 4), ("gradients",), r"differ from the reference"),
    *_pairs("row mean no unsqueeze", "wrong reduction/keepdim", RowMeanNoUnsqueeze, RowMean, _row_mean_reference,
            one(min_dims=2, max_dims=2), fixed_one(3, 3), ("backward", "gradients"), r"shape|differ"),
    *_pairs("mean without 1/N", "constant factor", MeanAllNoDivide, MeanAll, torch.mean, one(),
            fixed_one(3, 4), ("gradients",), r"× the true gradient"),
    *_pairs("bias summed over dim 1", "broadcasting", AddBiasWrongDim, AddBias, lambda x, b: x + b, with_bias(),
            fixed_pair((3, 3), (3,)), ("backward", "gradients"), r"shape|differ"),
    *_pairs("cube float32 buffer", "dtype (precision)", CubeFloat32Buffer, Cube, lambda x: x ** 3, one(),
            fixed_one(3, 4), ("gradients",), r"measured rule"),
    *_pairs("twice float32 output", "dtype (output)", TwiceFloat32Output, Twice, lambda x: x * 2, one(),
            fixed_one(3, 4), ("outputs",), r"dtype torch.float32"),
    *_pairs("warm-up counted on class", "non-determinism", WarmupScaleCounting, WarmupScale, lambda x: 3 * x, one(),
            fixed_one(3, 4), ("deterministic",), r"second call"),
    Case("relu, finite differences at 0", "control", Relu.apply, None, one(), fixed_one(3, 4), equivalent=torch.relu),
    Case("relu with 1 at 0 vs autograd's 0", "control", ReluAtZeroIsOne.apply, torch.relu, one(), fixed_one(3, 4)),
    Case("abs", "control", Abs.apply, None, one(), fixed_one(3, 4), equivalent=torch.abs),
    Case("exp (inf is the truth)", "control", Exp.apply, torch.exp, one(), fixed_one(3, 4)),
    Case("softmax", "control", Softmax.apply, lambda x: torch.softmax(x, -1), one(), fixed_one(3, 4)),
    Case("layer norm", "control", LayerNorm.apply, _layer_norm, one(), fixed_one(3, 4)),
    Case("row max with ties", "control", RowMax.apply, lambda x: x.amax(-1), one(), fixed_one(3, 4)),
]

BUGGY = [c for c in CASES if c.buggy]
CORRECT = [c for c in CASES if not c.buggy]
