"""Each exit's own accuracy (every sample forced to leave there), and the leaderboard's collapse flag."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import copy_tree

from eebench.leaderboard import render
from eebench.results import COLLAPSE_FACTOR
from eebench.trace import ExitTrace, exit_accuracy


def test_an_exit_predicting_one_class_is_flagged_collapsed_and_a_real_one_is_not() -> None:
    labels = torch.arange(10).repeat(30)  # 300 samples, 10 balanced classes: chance 10 %
    constant = torch.full_like(labels, 3)  # exit 0: one class for every sample
    mostly = torch.where(torch.arange(300) % 5 == 0, (labels + 1) % 10, labels)  # exit 1: 80 % right
    trace = ExitTrace(preds=torch.stack([constant, mostly, labels]), scores=torch.rand(3, 300), labels=labels)
    accuracy = exit_accuracy(trace)
    assert accuracy.chance == 0.1
    assert accuracy.forced == [0.1, 0.8, 1.0]
    assert accuracy.collapsed(["ic0", "ic1", "final"]) == ["ic0"]
    assert accuracy.to_dict(["ic0", "ic1", "final"])["collapsed"] == ["ic0"]
    assert accuracy.collapsed(["only one name"]) == ["exit 0"]  # names that do not fit: numbered
    skewed = torch.cat([torch.zeros(200, dtype=torch.long), torch.arange(1, 11).repeat(10)])  # class 0: 2/3
    assert exit_accuracy(ExitTrace(preds=skewed[None], scores=torch.rand(1, 300), labels=skewed)).chance == 200 / 300


def test_results_record_forced_accuracy_and_the_board_flags_a_collapsed_exit(smoke_run: Path, tmp_path: Path) -> None:
    run = copy_tree(smoke_run / "run", tmp_path / "run")
    [path] = sorted((run / "cells").glob("*.json"))
    result = json.loads(path.read_text())
    exits = result["exits"]
    assert len(exits["forced_test_accuracy"]) == len(exits["names"])
    assert all(0.0 <= a <= 1.0 for a in exits["forced_test_accuracy"])
    # the last exit on its own is the plain backbone: what every exit switched off gives
    assert abs(exits["forced_test_accuracy"][-1] - result["no_exit"]["test_accuracy"]) < 1e-12
    board = render(run, tmp_path / "boards", "smoke", [0.25, 0.5])
    text = board.read_text()
    assert "Each exit on its own" in text and "⚠" not in text.split("Each exit on its own")[0]
    # the same result with its first exit at chance: flagged in the table row and in the per-exit list
    exits["forced_test_accuracy"][0] = exits["chance"] * COLLAPSE_FACTOR
    exits["collapsed"] = [exits["names"][0]]
    path.write_text(json.dumps(result))
    text = render(run, tmp_path / "boards2", "smoke", [0.25, 0.5]).read_text()
    assert f"| {result['method']} ⚠ |" in text
    assert f"{exits['names'][0]} {100 * exits['chance'] * COLLAPSE_FACTOR:.1f} % ⚠" in text
    assert "collapsed" in text
