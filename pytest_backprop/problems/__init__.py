"""Problems: a forward pass written once, and what derives from it (line table, autograd truth,
tolerances, noise floor). The lecture's MLP is the default problem; any other is loaded with
:func:`load_spec` from a file or module that defines ``SIZES``, ``make_inputs`` and ``forward``.

Example::

    from pytest_backprop.problems import build_problem, load_spec, problem_from_spec, resolve_words
    p = build_problem(resolve_words(None))
    p.grads["logits"].shape   # (32, 27)
    q = problem_from_spec(load_spec("examples/problems/two_layer_relu.py"))
    q.spec.order[:3]          # ('logp', 'esum', 'e')
"""

from .errors import ProblemError
from .instance import Problem, build_problem, problem_from_batch, problem_from_inputs, problem_from_spec, resolve_words
from .spec import ProblemSpec, load_spec

__all__ = ["Problem", "ProblemError", "ProblemSpec", "build_problem", "load_spec", "problem_from_batch",
           "problem_from_inputs", "problem_from_spec", "resolve_words"]
