"""Hint codes: why a gradient is wrong, in the lecture's words.

``diagnose`` looks only at one comparison (the answer and its truth). Blame across gradients
(``inherited``) and per-line hints (``missing_branch``) are added by :mod:`pytest_backprop.blame`.
"""

from __future__ import annotations

import torch

from .compare import Comparison, describe_failure
from .verdict import Diagnosis


def diagnose(name: str, result: Comparison) -> Diagnosis:
    """The hint for one failed (or passed) comparison of ``d<name>``.

    Example::

        diagnose("bnbias", compare(dbnbias_flat, truth)).code   # 'keepdim'
    """
    if result.problem == "type" or result.problem == "dtype":
        return Diagnosis("type", describe_failure(name, result))
    if result.problem == "shape":
        return Diagnosis("shape", describe_failure(name, result))
    if result.approximate:
        return Diagnosis("ok", "matches autograd" + (" exactly" if result.exact else " within the tolerance rule"))
    if result.nonfinite and bool(torch.isfinite(result.truth).all()):
        return Diagnosis("nonfinite", f"d{name} contains NaN or inf where the true gradient is finite: "
                                      "look for a division by zero, log of 0 or exp overflow")
    return Diagnosis("mismatch", describe_failure(name, result))
