"""The example third-party plugin (examples/eebench-patience), installed for real with pip.

The package is built and installed (non-editable) into the running environment, found
through its ``eebench`` entry point by a fresh ``eebench`` process, run end to end next to
a built-in method, and uninstalled again afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "eebench-patience"
PACKAGE = "eebench-patience"


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True, text=True)


def eebench(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter: it reads the entry points as installed right now."""
    return subprocess.run([sys.executable, "-m", "eebench.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory):
    """pip-install a clean copy of the example (no build/ left in the repo); uninstall after."""
    source = tmp_path_factory.mktemp("example") / "eebench-patience"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip("install", "--no-deps", "--no-build-isolation", "-q", str(source))
    importlib.invalidate_caches()
    try:
        yield source
    finally:
        pip("uninstall", "-y", "-q", PACKAGE)
        importlib.invalidate_caches()


def load_example_module():
    """The example's strategy module straight from the source tree (no install needed)."""
    path = EXAMPLE / "eebench_patience" / "strategy.py"
    spec = importlib.util.spec_from_file_location("eebench_patience_source_strategy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patience_counter_is_the_run_length_of_agreeing_exits() -> None:
    counters = load_example_module().patience_counters
    preds = torch.tensor([[3, 1, 2, 0],
                          [3, 1, 5, 0],
                          [3, 4, 5, 0],
                          [7, 4, 5, 0]])
    expected = torch.tensor([[1, 1, 1, 1],
                             [2, 2, 1, 2],
                             [3, 1, 2, 3],
                             [1, 2, 3, 4]])
    assert torch.equal(counters(preds), expected)


def test_installed_plugin_is_listed(installed: Path, tmp_path: Path) -> None:
    done = eebench("plugins", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    ours = [p for p in payload["plugins"] if p["package"] == PACKAGE]
    assert len(ours) == 1, payload
    assert ours[0]["entry_point"] == "patience"
    assert ours[0]["version"] == "0.1.0"
    assert ours[0]["hooks"] == ["register_exit_strategies"]
    assert ours[0]["registered"] == {"exit_strategies": ["patience"]}
    assert not payload["failed"]
    registered: dict[str, set[str]] = {}
    for plugin in payload["plugins"]:
        for kind, names in plugin["registered"].items():
            registered.setdefault(kind, set()).update(names)
    assert "resnet20" in registered["backbones"] and "fashion-mnist" in registered["datasets"]


SUITE = """\
name: patience-example
description: The example plugin next to a built-in method; numbers are not meaningful.
datasets:
  - name: fashion-mnist
    per_class: 30
    test_subset: 300
backbones:
  - name: resnet20
    recipe: {epochs: 1, batch_size: 64}
methods:
  - name: patience
  - name: e2cm
budgets:
  - name: epochs
    params: {epochs: 1}
seeds: [0]
targets: [0.5]
"""


@pytest.mark.slow
def test_installed_plugin_runs_a_suite(installed: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(textwrap.dedent(SUITE))
    env = {**os.environ, "EEBENCH_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    done = eebench("run", str(suite), "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "boards"),
                   cwd=tmp_path, env=env)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr

    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "cells").glob("*.json"))]
    assert sorted(r["method"] for r in results) == ["e2cm", "patience"]
    result = next(r for r in results if r["method"] == "patience")
    assert result["provenance"]["plugins"]["method"] == f"{PACKAGE} 0.1.0"
    assert result["calibrator"] == "shared-threshold"
    assert result["notes"].startswith("Patience (PABEE")

    # 8 ICs after blocks 1..8 of resnet20 (stem = stage 0) plus the backbone's head.
    exits = result["exits"]
    assert exits["names"] == [f"block{s}" for s in range(1, 9)] + ["final"]
    assert exits["backbone_macs"][-1] == result["backbone_macs"] == exits["reference_macs"]
    assert exits["overhead_macs"][-1] == 0.0 and all(m > 0 for m in exits["overhead_macs"][:-1])
    assert all(a < b for a, b in zip(exits["backbone_macs"], exits["backbone_macs"][1:], strict=False))

    # The budget handed out one epoch of the 300 training images; the fit recorded its MACs.
    assert result["sizes"] == {"train": 300, "calibration": 300, "test": 300}
    spend = result["spend"]
    assert spend["samples"] == 300 and spend["batches"] == math.ceil(300 / 128)
    assert spend["training_macs"] > 300 * exits["backbone_macs"][0]
    assert spend["training_macs"] < 300 * result["backbone_macs"]

    curve = result["curve"]
    accuracy, cost = curve["test"]["accuracy"], curve["test"]["cost"]
    assert accuracy and len(accuracy) == len(cost) == len(curve["thresholds"])
    assert all(0.0 <= a <= 1.0 for a in accuracy)
    assert all(c > 0.0 for c in cost)
    assert all(sum(counts) == 300 for counts in curve["test"]["exit_counts"])
    for row in curve["thresholds"]:  # one patience value shared by every enabled exit
        assert len({t for t in row if t is not None}) <= 1
    at_half = result["accuracy_at"]["0.5"]
    assert at_half is not None and 0.0 <= at_half["accuracy"] <= 1.0 and at_half["planned_cost"] <= 0.5

    board = (tmp_path / "boards" / "patience-example.md").read_text()
    assert "| patience |" in board and "| e2cm |" in board
    assert result["notes"] in board
    print(f"\npatience example suite: {seconds:.1f}s, patience accuracy at φ=0.5: {at_half['accuracy']:.3f} "
          f"(cost {at_half['test_cost']:.3f}), backbone {result['backbone_test_accuracy']:.3f}")
