"""Shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(result: dict, out: str | Path) -> Path:
    """Writes a benchmark's result as JSON (creating the folder) and says where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path
