"""`eebench export`: one tidy row per cell × φ with configuration, metrics and provenance; every format
reads back equal."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from eebench.cli import main
from eebench.export import read_table, run_table
from eebench.tidy import COLUMNS


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_export_round_trips(two_seed_run: Path, tmp_path: Path, fmt: str, capsys) -> None:
    run = two_seed_run / "run"
    out = tmp_path / f"table.{fmt}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    assert f"16 rows (4 cells × φ) written to {out}" in capsys.readouterr().out
    expected = run_table(run)
    pd.testing.assert_frame_equal(read_table(out), expected)
    if fmt == "parquet":
        pd.testing.assert_frame_equal(pd.read_parquet(out), expected)  # self-describing: no help needed
    if fmt == "json":
        pd.testing.assert_frame_equal(pd.read_json(out, orient="table"), expected)


def test_export_has_a_row_per_cell_and_phi_with_config_metrics_and_provenance(two_seed_run: Path) -> None:
    run = two_seed_run / "run"
    frame = run_table(run)
    assert list(frame.columns) == list(COLUMNS)
    for path in sorted((run / "cells").glob("*.json")):
        result = json.loads(path.read_text())
        rows = frame[frame["cell_id"] == result["cell_id"]]
        assert sorted(rows["phi"]) == sorted(float(k) for k in result["accuracy_at"]) == [0.25, 0.5, 0.75, 1.0]
        for _, row in rows.iterrows():
            entry = result["accuracy_at"][f"{row['phi']:g}"]
            assert row["test_accuracy"] == entry["accuracy"] and row["test_cost"] == entry["test_cost"]
            assert row["calibration_accuracy"] == entry["calibration_accuracy"]
            assert row["calibration_cost"] == entry["calibration_cost"]
            assert (row["suite"], row["dataset"], row["backbone"], row["method"], row["seed"]) == (
                "two-seeds", "fashion-mnist", "resnet20", result["method"], result["seed"])
            assert row["method_name"] == result["config"]["method"]["name"]
            assert json.loads(row["method_params"]) == result["config"]["method"]["params"]
            assert (row["budget"], json.loads(row["budget_params"])) == ("1 epoch", {"epochs": 1})
            assert row["git_commit"] == result["provenance"]["git"]["commit"]
            assert row["torch"] == result["provenance"]["libraries"]["torch"] and row["device"] == "cpu"
            assert pd.isna(row["gpu_name"])


def test_export_of_a_folder_without_results_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"eebench: error: {tmp_path}: RUN_DIR: no cells/ folder; expected a run directory written by "
                   "'eebench run'"]
