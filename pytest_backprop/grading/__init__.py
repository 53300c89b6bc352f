"""Grading: points, hidden checks and Gradescope's ``results.json`` (no torch imported here)."""
