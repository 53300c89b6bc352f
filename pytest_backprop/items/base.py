"""What every built-in test item shares: the failure they raise, and where verdicts travel."""

from __future__ import annotations

from ..verdict import VERDICT_PROPERTY, WARNINGS_PROPERTY  # noqa: F401 -- re-exported for the items


class BackpropFailure(Exception):
    """Raised by a gradient item whose verdict is fail or error; carries the rendered verdict."""
