"""Shared helpers for the test suite.

Plugin behaviour is tested as users run it: ``pytester.runpytest_subprocess`` with the installed
plugin (entry point ``backprop``). Paths below point at the repository's example implementations.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SHARED_NAMES = REPO.parent / "shared" / "names.txt"

try:  # hypothesis profiles: derandomized under CI, so the suite is deterministic
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("dev", deadline=None, print_blob=True)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def ex1_solution() -> Path:
    """The lecture-style straight-line Exercise 1 solution script."""
    return EXAMPLES / "ex1_solution.py"


@pytest.fixture
def shared_names() -> Path:
    """../shared/names.txt (the lecture's dataset); the test is skipped when it is absent."""
    if not SHARED_NAMES.is_file():
        pytest.skip("../shared/names.txt is not present")
    return SHARED_NAMES


#: Only the per-gradient items: no hypothesis properties, no Exercise-4 training check.
GRADIENTS_ONLY = ("--backprop", "--backprop-examples=0", "--backprop-steps=0")


def run_kit(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """``pytest --backprop`` in a subprocess, restricted to the per-gradient items."""
    return pytester.runpytest_subprocess(*GRADIENTS_ONLY, *args)


def write_script(pytester: pytest.Pytester, source: str, name: str = "student.py") -> Path:
    """Write a user implementation into the pytester directory and return its path."""
    path = pytester.path / name
    path.write_text(source)
    return path


def solution_with(edit_from: str, edit_to: str, count: int = 1) -> str:
    """The example Exercise 1 solution with one textual edit (a single mutation)."""
    source = (EXAMPLES / "ex1_solution.py").read_text()
    assert source.count(edit_from) >= 1, f"edit target not found: {edit_from!r}"
    return source.replace(edit_from, edit_to, count)
