"""One JSON file per cell, written atomically; the schema is documented in README.md.

A cell file is either a finished result or a failed-cell record (``"status": "failed"`` with
its ``error``). Only finished results count as done: a failed record, a file that is not
JSON, or JSON that is not a result (a list, a missing key) is unfinished and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 2  # 2: accuracy_at holds the calibration-chosen φ policy; budget limits and utilisation; failed cells
FAILED = "failed"
COLLAPSE_FACTOR = 1.5  # an exit whose forced test accuracy is at most this × chance is flagged "collapsed"
#: keys every finished result has (what resuming and the leaderboard read)
RESULT_KEYS = frozenset({"config_hash", "dataset", "backbone", "method", "budget", "seed", "provenance", "sizes",
                         "backbone_macs", "backbone_test_accuracy", "exits", "spend", "curve", "accuracy_at",
                         "hull_end", "calibration_split"})


class CellResult(BaseModel):
    """A finished cell's result, the typed form of its JSON file (schema ``SCHEMA_VERSION``, documented in
    README.md). Nested blocks stay plain JSON objects: the leaderboard and third-party tools read them."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    cell_id: str
    config_hash: str
    config: dict[str, Any]
    suite: str
    dataset: str
    backbone: str
    method: str
    budget: dict[str, Any]
    seed: int
    calibrator: str
    calibration_split: str
    notes: str
    provenance: dict[str, Any]
    sizes: dict[str, int]
    backbone_macs: float
    backbone_test_accuracy: float | None
    exits: dict[str, Any]
    variants: list[str]
    spend: dict[str, Any]
    curve: dict[str, Any]
    accuracy_at: dict[str, dict[str, Any] | None]
    hull_end: dict[str, Any]
    no_exit: dict[str, Any]
    operating_points: list[dict[str, Any]]
    fit_info: dict[str, Any]
    latency: dict[str, Any] | None = None  # measured speed (``eebench bench``), when timed
    test_outcomes: dict[str, Any] | None = None  # per-sample test correctness of each policy (eebench.samples)

    def to_json_dict(self) -> dict[str, Any]:
        data = self.model_dump()
        for optional in ("latency", "test_outcomes"):
            if data[optional] is None:
                del data[optional]
        return data


#: keys every failed-cell record has
FAILURE_KEYS = frozenset({"status", "cell_id", "config_hash", "dataset", "backbone", "method", "budget", "seed",
                          "error"})


def cell_path(run_dir: Path, cell_id: str) -> Path:
    return run_dir / "cells" / f"{cell_id}.json"


def safe_cell_path(run_dir: Path, cell_id: str) -> Path:
    """The fallback file name of a cell whose own name the filesystem refuses (too long, say)."""
    return run_dir / "cells" / f"cell-{hashlib.sha256(cell_id.encode()).hexdigest()[:20]}.json"


_UMASK: int | None = None


def _file_mode() -> int:
    """0o666 less the process umask, the mode a plain ``open(path, "w")`` would give."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def write_atomic(path: Path, payload: dict[str, Any] | str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a
    result. The temporary file is unique to this writer and removed if anything fails."""
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=1, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def save_cell(run_dir: Path, cell_id: str, payload: dict[str, Any] | str) -> Path:
    """Write a cell's file under its id, else under a hash-based name (a name too long for the
    filesystem); returns the path written. Raises OSError when neither can be written (disk full,
    permissions): the caller keeps the result and says where it could not be written."""
    path = cell_path(run_dir, cell_id)
    try:
        write_atomic(path, payload)
        return path
    except OSError as first:
        fallback = safe_cell_path(run_dir, cell_id)
        try:
            write_atomic(fallback, payload)
        except OSError as second:
            raise OSError(second.errno, f"{first.strerror or first}; and under {fallback.name}: "
                                        f"{second.strerror or second}", str(path)) from second
        return fallback


def read_result(path: Path) -> dict[str, Any] | None:
    """A cell file's content when it is a JSON object, else None (unreadable, not JSON, a list...)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def is_failure(content: Any) -> bool:
    return isinstance(content, dict) and content.get("status") == FAILED and FAILURE_KEYS <= set(content)


def is_result(content: Any) -> bool:
    """A finished result: an object with every key the leaderboard reads, not a failed record."""
    return (isinstance(content, dict) and content.get("status", "finished") != FAILED
            and RESULT_KEYS <= set(content) and isinstance(content.get("budget"), dict)
            and isinstance(content.get("accuracy_at"), dict))


def finished(run_dir: Path, cell_id: str, config_hash: str, device: str | None = None,
             targets: Iterable[float] | None = None) -> bool:
    """A finished result for this config exists (and, when ``device`` is given, was computed on that
    device type: CPU and CUDA numbers differ, so a rerun on the other device recomputes the cell; when
    ``targets`` are given, it evaluated each of them: a suite whose targets grew, or that turned
    ``ztw_columns`` on, computes the cell again). A failed-cell record or a damaged file is not finished."""
    for path in (cell_path(run_dir, cell_id), safe_cell_path(run_dir, cell_id)):
        result = read_result(path)
        if not is_result(result) or result.get("config_hash") != config_hash:
            continue
        if targets is not None and any(f"{t:g}" not in result["accuracy_at"] for t in targets):
            continue
        provenance = result.get("provenance")
        recorded = provenance.get("device") if isinstance(provenance, dict) else None
        if device is None or _device_type(recorded) == _device_type(device):
            return True
    return False


def _device_type(name: str | None) -> str:
    return str(name or "cpu").split(":", 1)[0]


def _identity(result: dict[str, Any]) -> tuple:
    budget = result.get("budget")
    budget = {k: budget.get(k) for k in ("name", "params")} if isinstance(budget, dict) else budget
    return (result.get("dataset"), result.get("backbone"), result.get("method"),
            json.dumps(budget, sort_keys=True, default=str), result.get("seed"))


def _load(run_dir: Path, cell_ids: set[str] | None) -> list[tuple[Path, dict[str, Any]]]:
    """Finished results and failed records under ``run_dir/cells``, newest per identity."""
    loaded = []
    for path in sorted((run_dir / "cells").glob("*.json")):
        content = read_result(path)
        if not (is_result(content) or is_failure(content)):
            continue  # damaged: not shown, recomputed by the next run
        cell_id = content.get("cell_id") or path.stem
        if cell_ids is None or cell_id in cell_ids or path.stem in cell_ids:
            loaded.append((path, content))
    newest: dict[tuple, Path] = {}
    for path, result in loaded:
        identity = _identity(result)
        if identity not in newest or path.stat().st_mtime > newest[identity].stat().st_mtime:
            newest[identity] = path
    kept = set(newest.values())
    return [(path, result) for path, result in loaded if path in kept]


def load_results(run_dir: Path, cell_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Finished results under ``run_dir/cells``: those of ``cell_ids`` when given, else every cell, keeping
    only the newest result per (dataset, backbone, method, budget, seed) so an edited suite rerun into the
    same directory never averages stale cells in as if they were seeds. Failed-cell records are left out
    (see ``load_failures``), as are damaged files."""
    return [result for _, result in _load(run_dir, cell_ids) if is_result(result)]


def load_failures(run_dir: Path, cell_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Failed-cell records (``"status": "failed"``) that no newer finished result replaced."""
    return [result for _, result in _load(run_dir, cell_ids) if is_failure(result)]
