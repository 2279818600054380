"""A small suite's numbers stay what they were: refactors and speed-ups must not move them.

The pinned file holds every built-in method's curve, operating points, exit accuracies and spend
(wall-clock fields aside) from tests/data/pinned_suite.yaml; a deliberate change of results
regenerates it with tests/pinned.py and says so in the commit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from pinned import PINNED_FILE, pinned_numbers

from eebench.cli import main

SUITE = Path(__file__).parent / "data" / "pinned_suite.yaml"


def differences(pinned: Any, got: Any, path: str = "") -> list[str]:
    """Where ``got`` differs from ``pinned`` (floats equal to 1e-12 relative: same operations, same numbers)."""
    if isinstance(pinned, dict) and isinstance(got, dict):
        keys = sorted(set(pinned) | set(got))
        return [d for k in keys for d in differences(pinned.get(k), got.get(k), f"{path}.{k}")]
    if isinstance(pinned, list) and isinstance(got, list) and len(pinned) == len(got):
        return [d for i, (a, b) in enumerate(zip(pinned, got, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(pinned, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return [] if math.isclose(pinned, got, rel_tol=1e-12, abs_tol=1e-15) else [f"{path}: {pinned} -> {got}"]
    return [] if pinned == got else [f"{path}: {str(pinned)[:80]} -> {str(got)[:80]}"]


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("pinned")
    assert main(["run", str(SUITE), "--out", str(out / "run"), "--leaderboards", str(out / "boards")]) == 0
    return pinned_numbers(out / "run")


def test_every_method_is_pinned(pinned_run: dict[str, Any]) -> None:
    assert sorted(pinned_run) == sorted(json.loads(PINNED_FILE.read_text()))


@pytest.mark.parametrize("method", sorted(json.loads(PINNED_FILE.read_text())))
def test_results_match_the_pinned_numbers(pinned_run: dict[str, Any], method: str) -> None:
    pinned = json.loads(PINNED_FILE.read_text())[method]
    found = differences(pinned, pinned_run[method])
    assert not found, f"{method}: {len(found)} numbers moved, first: {found[:5]}"


def test_every_exit_reports_its_own_accuracy(pinned_run: dict[str, Any]) -> None:
    """Forced-exit accuracy for every exit of every method; the last exit on its own is what every exit
    switched off gives (the plain backbone's answer)."""
    for method, numbers in pinned_run.items():
        exits = numbers["exits"]
        assert len(exits["forced_test_accuracy"]) == len(exits["names"]), method
        assert abs(exits["forced_test_accuracy"][-1] - numbers["no_exit"]["test_accuracy"]) < 1e-12, method
