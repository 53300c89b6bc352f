"""``python -m pytest_backprop.gradescope``: the grading command line (see :mod:`pytest_backprop.grading.gradescope`).

No torch imported. Example::

    python -m pytest_backprop.gradescope --ensure results.json --log pytest.log
"""

from .grading.gradescope import *  # noqa: F401,F403
from .grading.gradescope import main

if __name__ == "__main__":
    raise SystemExit(main())
