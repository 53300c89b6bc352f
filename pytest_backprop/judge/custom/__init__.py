"""Checking custom autograd code: ``check_backward(MyFunction.apply, x, w, reference=...)``.

One call checks what an engineer's Function can get wrong: the forward (against a reference),
the gradients (against the reference re-run in float64 under the measured rule, or finite
differences in float64 without one; both aware of kinks), and the ways real code calls a
Function: a second backward on the same graph, two forwards before one backward, every pattern of
``requires_grad`` among the inputs, and non-contiguous layouts. Modules: :mod:`.calls` (running
the Function, short failures), :mod:`.truth` (reference truths and comparisons), :mod:`.finite`
(finite differences, kinks), :mod:`.variants` (the other ways of calling), :mod:`.api`.
"""

from .api import CHECKS, OPTIONAL, check_backward
from .calls import CheckFailure

__all__ = ["CHECKS", "CheckFailure", "OPTIONAL", "check_backward"]
