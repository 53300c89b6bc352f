"""The public assertions: ``assert_grad_matches`` and the lecture's ``cmp``, built on :func:`compare`."""

from __future__ import annotations

import sys
from typing import Any, Mapping

import torch

from ..usercode.run import describe_type
from .compare import compare, describe_failure
from .diagnose import diagnose
from .lecture_truth import lecture_truth


def _truth_of(t: Any) -> Any:
    """``t.grad`` when ``t`` is a forward tensor holding its gradient, else ``t`` itself (the truth).

    A tensor that requires grad but has no ``.grad`` is a forward tensor whose gradient was never
    computed: using its values as the truth would be silently wrong, so that is an error.
    """
    if not isinstance(t, torch.Tensor):
        return t
    readable = t.is_leaf or t.retains_grad  # .grad of any other tensor is never populated (and warns)
    if readable and t.grad is not None:
        return t.grad
    if t.requires_grad:
        raise ValueError("the tensor to compare with has no .grad: call .retain_grad() on it before "
                         "loss.backward() (or pass the true gradient itself)")
    return t


def assert_grad_matches(actual: Any, expected: torch.Tensor, *, name: str | None = None, exact: bool = False,
                        rtol: float | None = None, atol: float | None = None) -> None:
    """Assert that a hand-written gradient matches the truth, with a hint when it does not.

    ``expected`` is the true gradient, or a tensor whose ``.grad`` holds it (the lecture's ``t``).
    Shapes must be equal (no broadcasting: a (64,) answer for a (1, 64) tensor fails). With
    ``exact=True`` the values must be bitwise equal; otherwise the tolerance rule applies (or the
    given ``rtol``/``atol``): the measured rule for the kit's tensors (``makemore_forward``), and
    ``torch.testing.assert_close``'s defaults for any other tensor. The message names the rule, and
    hints speak of the lecture (n, Bessel's correction, ...) only for the lecture's tensors.

    Example::

        def test_counts_sum_inv(makemore_forward):
            f = makemore_forward
            dcounts_sum_inv = (f["counts"] * f.grads["probs"]).sum(1, keepdim=True)
            assert_grad_matches(dcounts_sum_inv, f.grads["counts_sum_inv"], name="counts_sum_inv")
    """
    __tracebackhide__ = True
    truth = _truth_of(expected)
    if not isinstance(truth, torch.Tensor):
        raise TypeError(f"expected must be a tensor (or a tensor with .grad), got {describe_type(expected)}")
    label = name or "tensor"
    result = compare(actual, truth, rtol=rtol, atol=atol, exact=exact)
    if result.problem is None and result.approximate:
        return
    hint = diagnose(label, result)
    lines = [describe_failure(label, result)]
    if hint.code not in ("mismatch", "shape", "type", "dtype"):
        lines.append(f"hint [{hint.code}]: {hint.message}")
    raise AssertionError("\n".join(lines))


def cmp(s: str, dt: Any, t: torch.Tensor, *, namespace: Mapping[str, Any] | None = None) -> bool:
    """Drop-in for the lecture's ``cmp``: prints ``name | exact | approximate | maxdiff`` plus a verdict
    and the rule that decided it.

    ``t`` is the forward tensor whose ``.grad`` holds the truth (or the true gradient itself).
    Returns True when the gradient passes the tolerance rule. In the lecture's notebook (the
    caller's globals hold ``C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb`` and ``n``, or pass them
    as ``namespace``) the kit rebuilds its float64 truth for those values and uses the measured
    rule: float noise never fails (``db1``), small real mistakes do (1/n for 1/(n-1)). Elsewhere
    ``torch.testing.assert_close``'s defaults decide.

    Example::

        cmp('logprobs', dlogprobs, logprobs)
        # logprobs        | exact: True  | approximate: True  | maxdiff: 0.0 | ok, atol=3.9e-07 (measured rule)
    """
    if namespace is None:
        caller = sys._getframe(1)
        namespace = {**caller.f_globals, **caller.f_locals}
    truth = lecture_truth(s, t, namespace)
    result = compare(dt, truth if truth is not None else _truth_of(t))
    rule = result.tolerance.describe()
    if result.problem is not None:
        print(f"{s:15s} | exact: False | approximate: False | maxdiff: n/a | FAIL: {describe_failure(s, result)}")
        return False
    verdict = "ok" if result.approximate else "FAIL"
    print(f"{s:15s} | exact: {str(result.exact):5s} | approximate: {str(result.approximate):5s} | "
          f"maxdiff: {result.maxdiff} | {verdict}, {rule}")
    return bool(result.approximate)
