"""Renderings of one list of verdicts: the terminal table and summary, the JSON report, plots."""
