"""The JSON report (``--backprop-json``): a rendering of the verdicts (contract in docs/reference.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..verdict import Diagnosis, Verdict


def report_json(meta: dict[str, Any], verdicts: Iterable[Verdict], warnings: Iterable[Diagnosis]) -> dict[str, Any]:
    """The JSON report (contract in docs/reference.md)."""
    return {**meta, "checks": [v.to_json() for v in verdicts],
            "warnings": [{"code": w.code, "message": w.message} for w in warnings]}


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write the JSON report, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")

