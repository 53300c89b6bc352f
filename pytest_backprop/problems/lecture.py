"""The lecture's problem (:mod:`reference_model.model`), loaded like any other, and the names the
kit has always used for it, now derived from its ``forward``.

Example::

    from pytest_backprop.problems.lecture import LECTURE, LINES, GRADIENT_ORDER
    len(LINES), len(GRADIENT_ORDER)       # (20, 26)
    LECTURE.producer("probs").source      # 'probs = counts * counts_sum_inv'
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

import reference_model.model as model

from .forward import Truth, line_vjp, run_line
from .spec import ProblemSpec, load_spec
from .table import Line

__all__ = [
    "CONSTANTS", "GRADIENT_ORDER", "LECTURE", "LINES", "LINE_OF", "Line", "PARAMETERS", "Truth", "autograd_truth",
    "consumers", "forward_expanded", "gradient_names", "lecture_inputs", "line_vjp", "producer", "run_line",
]

LECTURE: ProblemSpec = load_spec(model)

LINES: tuple[Line, ...] = LECTURE.lines
LINE_OF: Mapping[str, Line] = LECTURE.line_of
#: The 26 tensors that get a gradient, in the lecture's checking order (backward order).
GRADIENT_ORDER: tuple[str, ...] = LECTURE.order
PARAMETERS: tuple[str, ...] = LECTURE.leaves
CONSTANTS: tuple[str, ...] = LECTURE.constants


def consumers(tensor: str) -> tuple[Line, ...]:
    """The lines that read ``tensor``; its gradient is the sum of their contributions.

    Example::

        [l.output for l in consumers("counts")]   # ['counts_sum', 'probs']
    """
    return LECTURE.consumers(tensor)


def producer(tensor: str) -> Line | None:
    """The line that computes ``tensor``, or None for a parameter."""
    return LECTURE.producer(tensor)


def gradient_names() -> Iterator[str]:
    """The 26 gradient names in backward order (same as :data:`GRADIENT_ORDER`)."""
    return iter(GRADIENT_ORDER)


def lecture_inputs(params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> dict[str, Any]:
    """The lecture forward's inputs from parameters and a batch: the parameters, then n, Xb, Yb.

    Example::

        LECTURE.run(lecture_inputs(params, Xb, Yb))["loss"]
    """
    return {**params, "n": int(Xb.shape[0]), "Xb": Xb, "Yb": Yb}


def forward_expanded(params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> dict[str, Any]:
    """Run the 20 lines of :data:`LINES` and return every tensor by name (``loss`` included).

    Tensors keep whatever autograd history ``params`` gives them.
    """
    return LECTURE.run(lecture_inputs(params, Xb, Yb))


def autograd_truth(params: Mapping[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor, *,
                   dtype: torch.dtype = torch.float32) -> Truth:
    """Autograd's gradients of the 26 tensors: ``retain_grad`` on every line, then ``loss.backward()``.

    Example::

        t = autograd_truth(params, Xb, Yb)
        t.grads["counts_sum_inv"].shape   # torch.Size([32, 1])
    """
    return LECTURE.truth(lecture_inputs(params, Xb, Yb), dtype=dtype)
