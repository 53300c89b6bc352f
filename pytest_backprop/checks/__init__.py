"""The built-in checks of a ``--backprop`` session: run each exercise once and keep its verdicts
(:mod:`~pytest_backprop.checks.session`), and the Exercise 4 training check."""
