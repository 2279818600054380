"""The smoke suite end to end: result files, their schema, the leaderboard and its figure."""

from __future__ import annotations

import json
from pathlib import Path

from eebench.cli import main
from eebench.results import SCHEMA_VERSION


def results(smoke_run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((smoke_run / "run" / "cells").glob("*.json"))]


def test_result_json_carries_provenance_and_curve(smoke_run: Path) -> None:
    (result,) = results(smoke_run)
    assert result["schema_version"] == SCHEMA_VERSION == 2 and len(result["config_hash"]) == 16
    provenance = result["provenance"]
    assert provenance["torch"] and provenance["device"] == "cpu" and provenance["threads"] >= 1
    assert set(provenance["seconds"]) == {"data", "backbone", "fit", "trace_calibration", "trace_test", "calibrate"}
    assert provenance["plugins"]["method"].startswith("eebench ")
    assert result["spend"]["samples"] == result["sizes"]["train"] == 1000
    curve = result["curve"]
    assert len(curve["test"]["cost"]) == len(curve["thresholds"]) >= 1
    assert all(0.0 <= a <= 1.0 for a in curve["test"]["accuracy"])
    costs = result["exits"]["cumulative_normalised"]
    assert costs == sorted(costs) and costs[-1] > 1.0  # overheads of all exits on top of the backbone
    assert result["no_exit"]["test_cost"] == 1.0
    assert abs(result["no_exit"]["test_accuracy"] - result["backbone_test_accuracy"]) < 1e-12
    assert "1" in result["accuracy_at"]  # φ = 1.00 is always computed, by the same rule
    for target, at in result["accuracy_at"].items():
        assert at is None or at["planned_cost"] <= float(target) + 1e-12
        assert at is None or abs(at["calibration_cost"] - at["planned_cost"]) < 0.01  # the realised mixture


def test_leaderboard_has_every_row_at_every_target(smoke_run: Path) -> None:
    board = (smoke_run / "boards" / "smoke.md").read_text()
    header = next(line for line in board.splitlines() if line.startswith("| method"))
    for target in ("φ=0.25", "φ=0.50", "φ=1.00"):
        assert target in header
    e2cm = next(line for line in board.splitlines() if line.startswith("| E²CM |"))
    backbone = next(line for line in board.splitlines() if line.startswith("| backbone (no early exit) |"))
    assert e2cm.count("%") >= 3 and "—" not in e2cm.split("|")[2]
    (result,) = results(smoke_run)
    # one seed: mean ± the half-width of a bootstrap interval over test samples, and n = 1
    assert f"| {100 * result['backbone_test_accuracy']:.1f} ± " in backbone and backbone.endswith("| 1 |")
    assert f"| {100 * result['accuracy_at']['0.5']['accuracy']:.1f} ± " in e2cm and e2cm.endswith("| 1 |")
    assert "bootstrap over test samples" in board
    figure = smoke_run / "boards" / "smoke" / "fashion-mnist-resnet20.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(smoke/fashion-mnist-resnet20.png)" in board


def test_leaderboard_command_regenerates_the_same_table(smoke_run: Path, tmp_path: Path) -> None:
    assert main(["leaderboard", str(smoke_run / "run"), "--leaderboards", str(tmp_path)]) == 0
    original = [line for line in (smoke_run / "boards" / "smoke.md").read_text().splitlines() if line.startswith("|")]
    again = [line for line in (tmp_path / "smoke.md").read_text().splitlines() if line.startswith("|")]
    assert original == again


def test_rerun_reuses_every_cell(smoke_run: Path, capsys) -> None:
    root = Path(__file__).resolve().parents[1]
    code = main(["run", str(root / "suites" / "smoke.yaml"), "--out", str(smoke_run / "run"),
                 "--leaderboards", str(smoke_run / "boards")])
    assert code == 0
    assert "0 cells run, 1 reused" in capsys.readouterr().out


def test_a_stale_cell_of_an_edited_suite_is_not_averaged_in(smoke_run: Path, tmp_path: Path) -> None:
    """A rerun after editing the suite leaves the old cell on disk; only the newest result per
    (dataset, backbone, method, budget, seed) is shown, and `run` shows only its own cells."""
    import os
    import shutil

    from eebench.results import load_results

    run = tmp_path / "run"
    shutil.copytree(smoke_run / "run", run)
    (current,) = sorted((run / "cells").glob("*.json"))
    stale = json.loads(current.read_text())
    stale["config_hash"] = "0" * 16
    stale["accuracy_at"] = {k: (v and {**v, "accuracy": 0.0123}) for k, v in stale["accuracy_at"].items()}
    stale_path = run / "cells" / "stale-cell.json"
    stale_path.write_text(json.dumps(stale))
    os.utime(stale_path, (1, 1))  # written long before the current cell
    assert [r["config_hash"] for r in load_results(run)] == [json.loads(current.read_text())["config_hash"]]
    assert [r["config_hash"] for r in load_results(run, {"stale-cell"})] == ["0" * 16]
    assert main(["leaderboard", str(run), "--leaderboards", str(tmp_path / "boards")]) == 0
    board = (tmp_path / "boards" / "smoke.md").read_text().splitlines()
    (row,) = [line for line in board if line.startswith("| E²CM |") and "%" in line]  # one row, not one per result
    assert "1.2" not in row and row.endswith("| 1 |")  # n = 1: the stale cell is not a second seed
