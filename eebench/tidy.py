"""Cell results as one tidy table: one row per cell × φ, with its configuration, metrics and provenance.

``eebench export`` writes it (csv, parquet, json) and ``eebench.stats`` aggregates it for the
leaderboard. ``COLUMNS`` fixes every column's order and dtype, so each format reads back equal
(``eebench.export.read_table``). Results written before a field existed leave it empty.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

TEXT, NUMBER, INTEGER, FLAG = "str", "float64", "Int64", "boolean"

#: column -> dtype, in the table's order: configuration, metrics, provenance
COLUMNS: dict[str, str] = {
    # configuration (labels as the leaderboard shows them; *_name the plugin; *_params as JSON)
    "suite": TEXT, "cell_id": TEXT, "config_hash": TEXT,
    "dataset": TEXT, "dataset_name": TEXT, "dataset_config": TEXT,
    "backbone": TEXT, "backbone_name": TEXT, "backbone_params": TEXT, "backbone_recipe": TEXT,
    "method": TEXT, "method_name": TEXT, "method_params": TEXT, "calibrator": TEXT, "calibrator_params": TEXT,
    "budget": TEXT, "budget_name": TEXT, "budget_params": TEXT,
    "seed": INTEGER, "phi": NUMBER,
    # metrics of the φ policy (chosen on calibration, evaluated on test), and of the cell
    "test_accuracy": NUMBER, "test_cost": NUMBER, "calibration_accuracy": NUMBER, "calibration_cost": NUMBER,
    "planned_cost": NUMBER, "policy_rule": TEXT,
    "backbone_test_accuracy": NUMBER, "hull_end_test_accuracy": NUMBER, "hull_end_test_cost": NUMBER,
    "train_size": INTEGER, "calibration_size": INTEGER, "test_size": INTEGER, "calibration_split": TEXT,
    # provenance
    "eebench_version": TEXT, "git_commit": TEXT, "git_dirty": FLAG, "plugin_packages": TEXT,
    "device": TEXT, "threads": INTEGER, "cpu_model": TEXT, "cpu_cores": INTEGER,
    "gpu_name": TEXT, "gpu_driver": TEXT, "cuda": TEXT,
    "torch": TEXT, "torchvision": TEXT, "timm": TEXT, "numpy": TEXT, "pandas": TEXT, "python": TEXT,
    "base_backbone_key": TEXT, "schema_version": INTEGER,
}
#: not exported: each φ policy's per-sample test correctness (``eebench.samples``), for paired bootstraps
OUTCOMES = "test_correct"


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _get(mapping: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(part)
    return mapping


def _cell(result: dict[str, Any]) -> dict[str, Any]:
    """The columns every φ row of a cell shares."""
    config, provenance = result.get("config") or {}, result.get("provenance") or {}
    libraries, git, gpu = provenance.get("libraries") or {}, provenance.get("git"), provenance.get("gpu") or {}
    calibrator = _get(config, "method", "calibrator")
    return {
        "suite": result.get("suite"), "cell_id": result.get("cell_id"), "config_hash": result.get("config_hash"),
        "dataset": result["dataset"], "dataset_name": _get(config, "dataset", "name"),
        "dataset_config": _json(_get(config, "dataset")),
        "backbone": result["backbone"], "backbone_name": _get(config, "backbone", "name"),
        "backbone_params": _json(_get(config, "backbone", "params")),
        "backbone_recipe": _json(_get(config, "backbone", "recipe")),
        "method": result["method"], "method_name": _get(config, "method", "name"),
        "method_params": _json(_get(config, "method", "params")), "calibrator": result.get("calibrator"),
        "calibrator_params": _json(calibrator.get("params")) if isinstance(calibrator, dict) else None,
        "budget": result["budget"].get("label"), "budget_name": result["budget"].get("name"),
        "budget_params": _json(result["budget"].get("params")), "seed": result["seed"],
        "backbone_test_accuracy": result.get("backbone_test_accuracy"),
        "hull_end_test_accuracy": _get(result, "hull_end", "test_accuracy"),
        "hull_end_test_cost": _get(result, "hull_end", "test_cost"),
        "train_size": _get(result, "sizes", "train"), "calibration_size": _get(result, "sizes", "calibration"),
        "test_size": _get(result, "sizes", "test"), "calibration_split": result.get("calibration_split"),
        "eebench_version": provenance.get("eebench"),
        "git_commit": git.get("commit") if isinstance(git, dict) else None,
        "git_dirty": git.get("dirty") if isinstance(git, dict) else None,
        "plugin_packages": _json(provenance.get("plugin_packages")),
        "device": provenance.get("device"), "threads": provenance.get("threads"),
        "cpu_model": _get(provenance, "cpu", "model"), "cpu_cores": _get(provenance, "cpu", "cores"),
        "gpu_name": gpu.get("name"), "gpu_driver": gpu.get("driver"), "cuda": gpu.get("cuda"),
        "torch": libraries.get("torch") or provenance.get("torch"), "torchvision": libraries.get("torchvision"),
        "timm": libraries.get("timm"), "numpy": libraries.get("numpy"), "pandas": libraries.get("pandas"),
        "python": libraries.get("python") or provenance.get("python"),
        "base_backbone_key": _get(provenance, "base_backbone", "key"),
        "schema_version": result.get("schema_version"),
    }


def _phi(entry: dict[str, Any] | None) -> dict[str, Any]:
    """The metric columns of one ``accuracy_at`` entry (empty when the method cannot run that cheaply)."""
    entry = entry or {}
    return {"test_accuracy": entry.get("accuracy"), "test_cost": entry.get("test_cost"),
            "calibration_accuracy": entry.get("calibration_accuracy"),
            "calibration_cost": entry.get("calibration_cost"), "planned_cost": entry.get("planned_cost"),
            "policy_rule": entry.get("rule")}


def table(results: Iterable[dict[str, Any]], targets: Sequence[float] | None = None,
          outcomes: bool = False) -> pd.DataFrame:
    """One row per result × φ: each result's own ``accuracy_at`` targets, or ``targets`` (a target a result
    lacks gives a row with empty metrics). ``outcomes`` adds the ``test_correct`` column (packed bits)."""
    rows = []
    for result in results:
        shared = _cell(result)
        keys = [f"{t:g}" for t in targets] if targets is not None else \
            sorted(result["accuracy_at"], key=float)
        bits = _get(result, "test_outcomes", "accuracy_at") or {}
        for key in keys:
            row = {**shared, "phi": float(key), **_phi(result["accuracy_at"].get(key))}
            if outcomes:
                row[OUTCOMES] = bits.get(key)
            rows.append(row)
    columns = {**COLUMNS, **({OUTCOMES: "object"} if outcomes else {})}
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns)
