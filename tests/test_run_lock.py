"""Issue 15: two runs into one run directory never clobber each other, checked with real processes.
The second refuses in one line (exit 2) while the first holds the directory, or with --wait waits
for it and then finds its cells finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

# a tiny suite: 50 training and 50 test images, a quarter-width ResNet-20 trained for one epoch
TINY = {
    "name": "lock",
    "datasets": [{"name": "fashion-mnist", "per_class": 5, "test_subset": 50}],
    "backbones": [{"name": "resnet20", "params": {"width": 0.25}, "recipe": {"epochs": 1, "batch_size": 50}}],
    "methods": [{"name": "e2cm"}],
    "budgets": [{"name": "epochs", "params": {"epochs": 1}}],
    "targets": [0.5],
}
HOLD = """
import sys
from pathlib import Path
from eebench.lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def eebench(tmp_path: Path, *extra: str, **popen) -> subprocess.Popen:
    suite = tmp_path / "suite.yaml"
    if not suite.exists():
        suite.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "EEBENCH_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "eebench.cli", "run", str(suite), "--out", str(tmp_path / "run"),
                             "--leaderboards", str(tmp_path / "boards"), *extra], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_a_second_process_refuses_or_waits_for_the_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = eebench(tmp_path)
        out, err = refused.communicate(timeout=300)
        errors = [line for line in err.splitlines() if line.startswith("eebench: error")]
        assert refused.returncode == 2 and len(errors) == 1, err
        assert f"pid {holder.pid}" in errors[0] and str(run_dir) in errors[0] and "--wait" in errors[0]
        assert not (run_dir / "cells").exists() or not list((run_dir / "cells").glob("*.json"))

        waiting = eebench(tmp_path, "--wait")
        for line in waiting.stderr:  # the line it says before it blocks (after any import-time warnings)
            if "waiting for" in line:
                break
        assert "waiting for the eebench run" in line and f"pid {holder.pid}" in line, line
        assert waiting.poll() is None  # still waiting while the holder holds the directory
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    out, err = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, err
    assert "1 cells run, 0 reused" in " ".join(out.split())


def test_two_runs_at_once_compute_each_cell_once(tmp_path: Path) -> None:
    first, second = eebench(tmp_path, "--wait"), eebench(tmp_path, "--wait")
    outs = [process.communicate(timeout=600) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    summaries = sorted(" ".join(out.split()).split(", results in")[0] for out, _ in outs)
    # whichever took the directory first ran the cell; the other waited, then reused it
    assert summaries[0].startswith("0 cells run, 1 reused") and summaries[1].startswith("1 cells run, 0 reused"), outs
    (cell,) = (tmp_path / "run" / "cells").glob("*.json")
    assert json.loads(cell.read_text())["method"] == "e2cm"
