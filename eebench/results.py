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


def finished(run_dir: Path, cell_id: str, config_hash: str, device: str | None = None) -> bool:
    """A result for this config exists (and, when ``device`` is given, was computed on that device type:
    CPU and CUDA numbers differ, so a rerun on the other device recomputes the cell)."""
    result = read_result(cell_path(run_dir, cell_id))
    if not result or result.get("config_hash") != config_hash:
        return False
    return device is None or _device_type(result.get("provenance", {}).get("device")) == _device_type(device)


def _device_type(name: str | None) -> str:
    return str(name or "cpu").split(":", 1)[0]


def load_results(run_dir: Path, cell_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Results under ``run_dir/cells``: those of ``cell_ids`` when given, else every cell, keeping only the
    newest result per (dataset, backbone, method, budget, seed) so an edited suite rerun into the same
    directory never averages stale cells in as if they were seeds."""
    paths = sorted((run_dir / "cells").glob("*.json"))
    loaded = [(p, r) for p in paths if (cell_ids is None or p.stem in cell_ids) and (r := read_result(p))]
    newest: dict[tuple, Path] = {}
    for path, result in loaded:
        identity = (result.get("dataset"), result.get("backbone"), result.get("method"),
                    json.dumps(result.get("budget"), sort_keys=True), result.get("seed"))
        if identity not in newest or path.stat().st_mtime > newest[identity].stat().st_mtime:
            newest[identity] = path
    kept = set(newest.values())
    return [result for path, result in loaded if path in kept]
