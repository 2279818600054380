"""``eebench export``: a run directory's results as one tidy table file (csv, parquet or json).

One row per cell × φ (``eebench.tidy``: configuration, metrics, provenance columns), the newest result per
(dataset, backbone, method, budget, seed) as on the leaderboard. JSON is pandas' ``orient="table"`` (a
schema, then one object per row); ``read_table`` reads any of the three back into the same frame.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from eebench.errors import EebenchError
from eebench.results import load_results
from eebench.tidy import COLUMNS, table

FORMATS = ("csv", "parquet", "json")


def _parquet_engine(key: str) -> None:
    try:
        import pyarrow  # noqa: F401 -- pandas' parquet engine
    except ImportError as exc:
        raise EebenchError("writing parquet needs pyarrow, which is not installed; expected `pip install pyarrow` "
                           "or another --format (csv, json)", where="command line", key=key) from exc


def run_table(run_dir: Path) -> pd.DataFrame:
    """The tidy table of every finished result under ``run_dir/cells``."""
    if not (run_dir / "cells").is_dir():
        raise EebenchError("no cells/ folder; expected a run directory written by 'eebench run'", where=str(run_dir),
                           key="RUN_DIR")
    results = load_results(run_dir)
    if not results:
        raise EebenchError("no finished cell results; expected JSON files written by 'eebench run'",
                           where=str(run_dir / "cells"), key="RUN_DIR")
    return table(sorted(results, key=lambda r: str(r.get("cell_id"))))


def write_table(frame: pd.DataFrame, path: Path, fmt: str) -> Path:
    """Write ``frame`` as ``fmt`` at ``path`` (one line naming the file when it cannot be written)."""
    if fmt == "parquet":
        _parquet_engine("--format")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_json(path, orient="table", index=False, indent=1, force_ascii=False)
    except OSError as exc:
        raise EebenchError(f"cannot write the export ({exc.strerror or exc}); expected a writable file path",
                           where=str(path), key="--out") from exc
    return path


def read_table(path: Path, fmt: str | None = None) -> pd.DataFrame:
    """An exported table read back with its columns' dtypes (``tidy.COLUMNS``)."""
    fmt = fmt or path.suffix.lstrip(".")
    if fmt == "csv":
        frame = pd.read_csv(path)
    elif fmt == "parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_json(path, orient="table")
    return frame.astype({name: dtype for name, dtype in COLUMNS.items() if name in frame})
