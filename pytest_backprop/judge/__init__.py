"""Judging gradients: compare with the truth under the tolerance rule, diagnose why an answer is
wrong, blame across gradients, and turn it all into :class:`~pytest_backprop.verdict.Verdict` records.
The public assertions (``assert_grad_matches``, ``cmp``, ``check_backward``) live here too."""
