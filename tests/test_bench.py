"""``eebench bench``: each finished cell's network rebuilt from its saved state and timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_tree

from eebench.cli import main

QUICK = ["--batch-sizes", "1,32", "--samples", "64", "--batch1-samples", "8", "--repeats", "2"]


def _results(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "cells").glob("*.json"))]


def test_bench_times_every_policy_and_draws_the_measured_speed_table(smoke_run: Path, tmp_path: Path) -> None:
    run = copy_tree(smoke_run / "run", tmp_path / "run")
    boards = tmp_path / "boards"
    assert (run / "states").is_dir() and (run / "suite.json").is_file()
    assert main(["bench", str(run), *QUICK, "--targets", "0.5", "--leaderboards", str(boards)]) == 0
    (result,) = _results(run)
    latency = result["latency"]
    assert latency["settings"]["batch_sizes"] == [1, 32]
    assert set(latency["backbone"]) == {"1", "32"}
    policy = latency["policies"]["0.5"]
    assert set(policy["modes"]) == {"batch1", "compact@32", "masked@32"}
    for timing in policy["modes"].values():
        assert timing["ms_per_sample"] > 0 and timing["speedup"] > 0
        assert timing["speedup_iqr"][0] <= timing["speedup"] <= timing["speedup_iqr"][1]
    # the policy's MACs on the timed samples agree with the leaderboard's test cost of that policy
    assert policy["mac_cost"] == pytest.approx(result["accuracy_at"]["0.5"]["test_cost"], abs=0.15)
    assert sum(policy["exit_counts"]) == 64
    board = (boards / "smoke.md").read_text()
    assert "Measured speed" in board and "| E²CM | 0.50 |" in board
    assert "eebench bench" in board.splitlines()[4]  # the command line that drew it


def test_bench_refuses_bad_options_and_missing_states_in_one_line(smoke_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    run = copy_tree(smoke_run / "run", tmp_path / "run")
    assert main(["bench", str(run), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
    assert main(["bench", str(run), "--repeats", "0", "--leaderboards", str(tmp_path / "b")]) == 2
    assert "--repeats" in capsys.readouterr().err
    for state in (run / "states").glob("*.pt"):
        state.unlink()
    assert main(["bench", str(run), *QUICK, "--leaderboards", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eebench: error: ") and "no saved state" in err[-1]
    assert main(["bench", str(tmp_path / "nowhere")]) == 2


def test_a_suites_latency_block_times_its_cells_after_the_run(smoke_run: Path, tmp_path: Path) -> None:
    """``latency:`` in a suite makes ``eebench run`` time every cell it finished (the same code as bench)."""
    import yaml
    from conftest import ROOT

    suite = yaml.safe_load((ROOT / "suites" / "smoke.yaml").read_text())
    suite["latency"] = {"batch_sizes": [1, 16], "targets": [0.5], "samples": 32, "batch1_samples": 4, "repeats": 1,
                        "masked": False}
    path = tmp_path / "timed.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    run = tmp_path / "run"
    assert main(["run", str(path), "--out", str(run), "--leaderboards", str(tmp_path / "boards")]) == 0
    (result,) = _results(run)
    assert set(result["latency"]["policies"]["0.5"]["modes"]) == {"batch1", "compact@16"}
    assert "Measured speed" in (tmp_path / "boards" / "smoke.md").read_text()
