"""Hypothesis property checks: the user's backward on generated sizes, values and broadcasting
patterns (:mod:`~pytest_backprop.properties.checks`), and the public strategies
(:mod:`~pytest_backprop.properties.strategies`, also importable as ``pytest_backprop.strategies``)."""

from .checks import (
                     Search,
                     batchnorm_property,
                     case_problem,
                     cross_entropy_property,
                     line_property,
                     whole_backward,
)

__all__ = ["Search", "batchnorm_property", "case_problem", "cross_entropy_property", "line_property",
           "whole_backward"]
