"""Means with 95 % confidence intervals, paired differences against a reference, the Zero-Time-Waste
columns, and the per-sample outcomes they rest on: real runs of tiny suites, numbers checked against
formulas computed here from the cell files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import t as student_t

from eebench.cli import main
from eebench.leaderboard import render
from eebench.samples import pack, unpack
from eebench.stats import BOOTSTRAP, T_SEEDS, bootstrap_mean, mean_interval, proportion_interval

ROOT = Path(__file__).resolve().parents[1]


def cells(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "cells").glob("*.json"))]


def by_method(run: Path) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for result in cells(run):
        out.setdefault(result["method"], {})[result["seed"]] = result
    return out


def table_rows(board: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table that follows the line starting with ``header``."""
    lines = board.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    table = []
    for line in lines[start + 1:]:
        if not line.startswith("|") and table:
            break
        if line.startswith("|") and not line.startswith("|---"):
            table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def t_text(values: list[float], scale: float = 100.0, unit: str = "%", sign: str = "") -> str:
    """mean ± t(0.975, n−1)·s/√n, formatted as the board does."""
    data = np.asarray(values, dtype=float)
    half = student_t.ppf(0.975, len(data) - 1) * data.std(ddof=1) / math.sqrt(len(data))
    return f"{scale * data.mean():{sign}.1f} ± {scale * half:.1f}{unit}"


# ------------------------------------------------------------------------------ intervals themselves


def test_student_t_interval_is_the_textbook_one() -> None:
    values = [0.80, 0.84, 0.83]
    interval = mean_interval(values)
    half = student_t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert interval.kind == T_SEEDS and interval.n == 3
    assert interval.mean == pytest.approx(np.mean(values)) and interval.half_width == pytest.approx(half)


def test_one_seed_bootstrap_matches_the_binomial_spread_and_is_deterministic() -> None:
    interval = proportion_interval(0.85, 2000)
    normal = 1.96 * math.sqrt(0.85 * 0.15 / 2000)
    assert interval.kind == BOOTSTRAP and interval.low < 0.85 < interval.high
    assert interval.half_width == pytest.approx(normal, rel=0.1)
    assert proportion_interval(0.85, 2000) == interval  # a fixed seed: the same board twice
    assert mean_interval([0.85], [2000]) == interval
    assert mean_interval([0.85]).half_width is None  # no sample count: no interval
    assert math.isnan(mean_interval([0.8, None]).mean)  # a seed without a number: no mean


def test_packed_outcomes_round_trip() -> None:
    correct = np.random.default_rng(3).random(1001) < 0.7
    assert (unpack(pack(correct), 1001) == correct).all()


# ------------------------------------------------------------------------------ per-sample outcomes


def test_each_policys_per_sample_outcomes_reproduce_its_accuracy(smoke_run: Path, two_seed_run: Path) -> None:
    for result in [*cells(smoke_run / "run"), *cells(two_seed_run / "run")]:
        outcomes, size = result["test_outcomes"], result["sizes"]["test"]
        assert outcomes["samples"] == size
        assert sorted(outcomes["accuracy_at"]) == sorted(result["accuracy_at"])
        for key, entry in result["accuracy_at"].items():
            bits = outcomes["accuracy_at"][key]
            assert (bits is None) == (entry is None)
            if entry is not None:
                assert unpack(bits, size).mean() == pytest.approx(entry["accuracy"], abs=1e-12)
        assert unpack(outcomes["hull_end"], size).mean() == pytest.approx(result["hull_end"]["test_accuracy"])
        assert unpack(outcomes["no_exit"], size).mean() == pytest.approx(result["no_exit"]["test_accuracy"])


# ------------------------------------------------------------------------------ the leaderboard


def test_several_seeds_show_mean_and_student_t_interval_with_n(two_seed_run: Path) -> None:
    board = (two_seed_run / "boards" / "two-seeds.md").read_text()
    results = by_method(two_seed_run / "run")
    rows = {row[0].replace(" ⚠", ""): row for row in table_rows(board, "| method | φ=0.50 | φ=1.00 |")}
    for method, seeds in results.items():
        row = rows[method]
        assert row[1] == t_text([seeds[s]["accuracy_at"]["0.5"]["accuracy"] for s in (0, 1)])
        assert row[2] == t_text([seeds[s]["accuracy_at"]["1"]["accuracy"] for s in (0, 1)])
        assert row[-1] == "2"
    base = rows["backbone (no early exit)"]
    assert base[2] == t_text([results["E2CM"][s]["backbone_test_accuracy"] for s in (0, 1)]) and base[-1] == "2"
    assert "Student-t over the n seeds" in board and "bootstrap over test samples" in board.split("## Notes")[1]


def test_zero_time_waste_columns_are_the_calibrated_policies_at_25_to_100_percent(two_seed_run: Path) -> None:
    board = (two_seed_run / "boards" / "two-seeds.md").read_text()
    rows = {row[0]: row for row in table_rows(board, "| method | 25 % | 50 % | 75 % | 100 % | n |")}
    for method, seeds in by_method(two_seed_run / "run").items():
        for result in seeds.values():
            assert {"0.25", "0.5", "0.75", "1"} <= set(result["accuracy_at"])  # evaluated though not a suite target
        expected = []
        for key in ("0.25", "0.5", "0.75", "1"):
            entries = [seeds[s]["accuracy_at"][key] for s in (0, 1)]
            expected.append("—" if None in entries else t_text([e["accuracy"] for e in entries]))
        assert rows[method][1:] == [*expected, "2"]


def test_paired_differences_against_the_reference_over_seeds(two_seed_run: Path) -> None:
    board = (two_seed_run / "boards" / "two-seeds.md").read_text()
    results = by_method(two_seed_run / "run")
    (row,) = table_rows(board, "| method | φ=0.50 | φ=1.00 | n |")  # the reference has no row of its own
    assert row[0] == "E2CM" and row[-1] == "2"
    for cell, key in zip(row[1:3], ("0.5", "1"), strict=True):
        differences = [results["E2CM"][s]["accuracy_at"][key]["accuracy"]
                       - results["SDN"][s]["accuracy_at"][key]["accuracy"] for s in (0, 1)]
        text = t_text(differences, unit="", sign="+")
        interval = mean_interval(differences)
        assert cell == (f"**{text}**" if interval.low > 0 or interval.high < 0 else text)
    assert "Paired differences vs the reference SDN" in board


def test_one_seed_pairs_by_a_bootstrap_over_the_same_test_samples(two_seed_run: Path, tmp_path: Path) -> None:
    run = two_seed_run / "run"
    seed0 = {r["cell_id"] for r in cells(run) if r["seed"] == 0}
    board = render(run, tmp_path, "one-seed", [0.5], cell_ids=seed0, reference="SDN").read_text()
    results = by_method(run)
    ours, theirs = results["E2CM"][0], results["SDN"][0]
    size = ours["sizes"]["test"]
    a = unpack(ours["test_outcomes"]["accuracy_at"]["0.5"], size).astype(int)
    b = unpack(theirs["test_outcomes"]["accuracy_at"]["0.5"], size).astype(int)
    interval = bootstrap_mean(a - b)
    assert interval.mean == pytest.approx(ours["accuracy_at"]["0.5"]["accuracy"]
                                          - theirs["accuracy_at"]["0.5"]["accuracy"])
    # the paired bootstrap's spread is that of the per-sample differences, not of two independent accuracies
    assert interval.half_width == pytest.approx(1.96 * (a - b).std() / math.sqrt(size), rel=0.15)
    (row,) = table_rows(board, "| method | φ=0.50 | φ=1.00 | n |")
    text = f"{100 * interval.mean:+.1f} ± {100 * interval.half_width:.1f}"
    assert row[1] in (text, f"**{text}**") and row[-1] == "1"
    assert "one seed: bootstrap over test samples" in board


def test_a_reference_that_is_not_a_method_label_is_refused(tmp_path: Path, capsys) -> None:
    from test_cli import TINY

    for reference, labels in (("nope", "'e2cm'"), ("e2cm", "'E2CM'")):
        methods = [{"name": "e2cm", "label": "E2CM"}] if reference == "e2cm" else TINY["methods"]
        path = tmp_path / "suite.yaml"
        path.write_text(yaml.safe_dump({**TINY, "methods": methods, "reference": reference}, allow_unicode=True))
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"eebench: error: {path}: reference: '{reference}' is not a "
                                                   "method label of this suite") and labels in err[0], err


def test_leaderboard_command_takes_the_reference_of_the_run_or_refuses_an_unknown_one(two_seed_run: Path,
                                                                                       tmp_path: Path, capsys) -> None:
    assert main(["leaderboard", str(two_seed_run / "run"), "--leaderboards", str(tmp_path)]) == 0
    board = (tmp_path / "two-seeds.md").read_text()
    assert "Paired differences vs the reference SDN" in board and "| method | 25 % |" in board
    assert main(["leaderboard", str(two_seed_run / "run"), "--leaderboards", str(tmp_path),
                 "--reference", "BranchyNet"]) == 2
    err = capsys.readouterr().err
    assert "--reference: no result of a method labelled 'BranchyNet'; expected one of E2CM, SDN" in err


def test_turning_ztw_columns_on_computes_a_cell_again(smoke_run: Path, tmp_path: Path, capsys) -> None:
    """A finished cell lacking a cost target the suite now asks for is not done."""
    shutil.copytree(smoke_run / "run", tmp_path / "run")
    suite = yaml.safe_load((ROOT / "suites" / "smoke.yaml").read_text())
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump({**suite, "ztw_columns": True}, allow_unicode=True))
    argv = ["run", str(path), "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "boards")]
    assert main(argv) == 0
    assert "1 cells run, 0 reused" in capsys.readouterr().out
    (result,) = cells(tmp_path / "run")
    assert set(result["accuracy_at"]) == {"0.25", "0.5", "0.75", "1"}
    assert main(argv) == 0
    assert "0 cells run, 1 reused" in capsys.readouterr().out
    board = (tmp_path / "boards" / "smoke.md").read_text()
    assert "| method | 25 % | 50 % | 75 % | 100 % | n |" in board


def test_results_without_provenance_or_outcomes_still_render(smoke_run: Path, tmp_path: Path) -> None:
    """A result written before this version (no git, libraries, hardware, per-sample outcomes) loads and
    renders; its one-seed interval comes from its accuracy and test size alone."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run / "run", run)
    (path,) = sorted((run / "cells").glob("*.json"))
    old = json.loads(path.read_text())
    for key in ("git", "plugin_packages", "libraries", "cpu", "gpu"):
        del old["provenance"][key]
    del old["test_outcomes"]
    path.write_text(json.dumps(old))
    board = render(run, tmp_path / "boards", "smoke", [0.25, 0.5], reference="E²CM").read_text()
    e2cm = next(line for line in board.splitlines() if line.startswith("| E²CM |"))
    expected = proportion_interval(old["accuracy_at"]["0.5"]["accuracy"], old["sizes"]["test"])
    assert f"| {100 * expected.mean:.1f} ± {100 * expected.half_width:.1f}% |" in e2cm
    assert "checkout: not recorded" in board and "All 1 cells share this provenance." in board
