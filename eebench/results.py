"""One JSON file per cell, written atomically; the schema is documented in README.md."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def cell_path(run_dir: Path, cell_id: str) -> Path:
    return run_dir / "cells" / f"{cell_id}.json"


def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file then rename: a crash never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
    os.replace(tmp, path)


def read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(run_dir: Path, cell_id: str, config_hash: str) -> bool:
    result = read_result(cell_path(run_dir, cell_id))
    return bool(result) and result.get("config_hash") == config_hash


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    return [r for p in sorted((run_dir / "cells").glob("*.json")) if (r := read_result(p))]
