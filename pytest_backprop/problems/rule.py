"""The tolerance rule's constants, torch-free (the report header names the rule before torch is needed).

See :mod:`pytest_backprop.problems.tolerance` for the rule itself.

Example::

    from pytest_backprop.problems.rule import RULE
    RULE   # 'no worse than 10x PyTorch's own float32 error vs a float64 truth (floor 16 eps x max|grad|)'
"""

K = 10
FLOOR = 16
#: The measured rule in one line (the ``--backprop`` report header: the kit always knows the truth there).
RULE = f"no worse than {K}x PyTorch's own float32 error vs a float64 truth (floor {FLOOR} eps x max|grad|)"
