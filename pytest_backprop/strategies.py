"""Public hypothesis strategies (re-exported from :mod:`pytest_backprop.properties.strategies`).

Example::

    from pytest_backprop.strategies import makemore_cases, tensors
"""

from .properties.strategies import *  # noqa: F401,F403
from .properties.strategies import __all__  # noqa: F401
