"""The grading markers' names and help lines, importable without the Gradescope reporter.

The plugin registers these in every pytest run (so that ``--strict-markers`` accepts them), also
with ``--backprop`` off; importing :mod:`pytest_backprop.gradescope` for that would cost every
run ~5 ms (P1 in docs/performance.md).
"""

from __future__ import annotations

from typing import Any

POINTS_MARKER = "backprop_points"
HIDDEN_MARKER = "backprop_hidden"
MARKERS = (
    f"{POINTS_MARKER}(points): points this test is worth in --backprop-gradescope results (default 1)",
    f"{HIDDEN_MARKER}(visibility='hidden'): hide this test from students in --backprop-gradescope results "
    "(visibility: hidden, after_due_date or after_published)",
)


def add_marker_lines(config: Any) -> None:
    """Add the marker help lines to the config (what ``gradescope.register_markers`` does).

    Example::

        def pytest_configure(config):
            add_marker_lines(config)
    """
    for line in MARKERS:
        config.addinivalue_line("markers", line)
