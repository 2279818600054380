"""Issue 15, executors: a suite fanned out over local processes (--jobs), Ray tasks or submitit jobs
gives, cell for cell, the numbers of a serial run at the same torch thread count; cells sharing a
base backbone stay together in one group, in a deterministic order."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from eebench.cli import main
from eebench.groups import group_cells
from eebench.suite import Suite, expand

ROOT = Path(__file__).resolve().parents[1]
TIMED = {"seconds", "train_seconds"}  # wall-clock fields vary from run to run


def two_seed_smoke(folder: Path) -> str:
    """suites/smoke.yaml with seeds 0 and 1: two groups of one cell each."""
    suite = yaml.safe_load((ROOT / "suites" / "smoke.yaml").read_text())
    suite["seeds"] = [0, 1]
    path = folder / "smoke2.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    return str(path)


def numbers(run_dir: Path, *, with_source: bool = True) -> dict[str, Any]:
    """Every cell's result without its wall-clock fields (and, for runs that read the base backbone from
    the cache another run wrote, without the base backbone's source)."""

    def untimed(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k not in TIMED and (with_source or k != "source")}
        if isinstance(value, list):
            return [untimed(v) for v in value]
        return value

    return {path.name: untimed(json.loads(path.read_text())) for path in sorted((run_dir / "cells").glob("*.json"))}


def run(suite: str, out: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    code = main(["run", suite, "--out", str(out / "run"), "--leaderboards", str(out / "boards"), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own backbone cache, so the serial run trains its base networks at one thread."""
    return tmp_path_factory.mktemp("executor-cache")


@pytest.fixture
def own_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EEBENCH_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[str, Path]:
    """The two-seed smoke suite run in this process at one torch thread: the numbers to match."""
    out = tmp_path_factory.mktemp("serial")
    suite = two_seed_smoke(out)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EEBENCH_CACHE", str(cache))
        assert main(["run", suite, "--out", str(out / "run"), "--leaderboards", str(out / "boards"),
                     "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # --threads lasts the command: later runs here keep their numbers
    return suite, out / "run"


def test_groups_keep_cells_sharing_a_base_backbone_together_in_a_fixed_order() -> None:
    suite = Suite(name="g", datasets=[{"name": "fashion-mnist", "per_class": 5}],
                  backbones=[{"name": "resnet20", "recipe": {"epochs": 1}},
                             {"name": "resnet20", "label": "r20-lr", "recipe": {"epochs": 1, "lr": 0.01}}],
                  methods=[{"name": "e2cm"}, {"name": "sdn"}], budgets=[{"name": "epochs", "params": {"epochs": 1}}],
                  seeds=[0, 1], targets=[0.5])
    cells = expand(suite)
    groups = group_cells(cells)
    # a recipe or a seed makes another base network: 2 recipes x 2 seeds, each with both methods
    assert [len(g.cells) for g in groups] == [2, 2, 2, 2]
    for group in groups:
        assert len({(c.backbone.recipe.lr, c.seed) for _, c in group.cells}) == 1
        assert [c.method.name for _, c in group.cells] == ["e2cm", "sdn"]
    assert [p for g in groups for p, _ in g.cells] == list(range(1, 9))  # numbered group after group
    assert [g.label for g in groups] == ["fashion-mnist/resnet20/s0", "fashion-mnist/resnet20/s1",
                                         "fashion-mnist/r20-lr/s0", "fashion-mnist/r20-lr/s1"]
    again = group_cells(expand(suite))
    assert [g.cell_ids for g in again] == [g.cell_ids for g in groups]
    assert sorted(c for g in groups for c in g.cell_ids) == sorted(c.cell_id for c in cells)


def test_jobs_2_gives_the_serial_numbers(serial, tmp_path: Path, capsys, monkeypatch) -> None:
    suite, serial_dir = serial
    monkeypatch.setenv("EEBENCH_CACHE", str(tmp_path / "fresh-cache"))  # the workers train the base networks
    code, log = run(suite, tmp_path, capsys, "--jobs", "2", "--threads", "1")
    assert code == 0, log
    got = numbers(tmp_path / "run")
    assert got == numbers(serial_dir)  # every number, the base backbones' training included ("source": trained)
    assert all(r["provenance"]["base_backbone"]["source"] == "trained" for r in got.values())
    done = [line for line in " ".join(log.split()).split("[") if ": done in " in line]
    assert len(done) == 2 and "2 local worker processes, 1 torch thread(s) each" in " ".join(log.split())
    code, log = run(suite, tmp_path, capsys, "--jobs", "2")
    assert code == 0 and "0 cells run, 2 reused" in " ".join(log.split()), log


def test_ray_tasks_give_the_serial_numbers(serial, tmp_path: Path, capsys, monkeypatch, own_cache) -> None:
    ray = pytest.importorskip("ray")
    suite, serial_dir = serial
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code, log = run(suite, tmp_path, capsys, "--executor", "ray", "--threads", "1")
    finally:
        ray.shutdown()
    assert code == 0, log
    # the base networks come from the cache the serial run wrote: the same numbers, another "source"
    assert numbers(tmp_path / "run", with_source=False) == numbers(serial_dir, with_source=False)


def test_submitit_jobs_give_the_serial_numbers(serial, tmp_path: Path, capsys, own_cache) -> None:
    pytest.importorskip("submitit")
    suite, serial_dir = serial
    code, log = run(suite, tmp_path, capsys, "--executor", "submitit", "--submitit-cluster", "local",
                    "--threads", "1", "--timeout-min", "30")
    assert code == 0, log
    assert numbers(tmp_path / "run", with_source=False) == numbers(serial_dir, with_source=False)
    logs = list((tmp_path / "run" / "submitit").glob("*/*_log.err"))
    assert len(logs) == 2  # one job per group, its logs inside the run directory


@pytest.mark.parametrize(("module", "options", "expected"), [
    ("ray", ["--executor", "ray"], "pip install 'eebench[ray]'"),
    ("submitit", ["--executor", "submitit", "--submitit-cluster", "local"], "pip install 'eebench[slurm]'"),
    (None, ["--jobs", "0"], "--jobs 0; expected a whole number of at least 1"),
    (None, ["--jobs", "2", "--ray-address", "head:6379"], "--ray-address is an option of --executor ray"),
])
def test_executor_problems_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, module, options,
                                                        expected) -> None:
    if module:
        monkeypatch.setitem(sys.modules, module, None)  # what `import ray` meets where it is not installed
    code, log = run(two_seed_smoke(tmp_path), tmp_path, capsys, *options)
    lines = [line for line in log.splitlines() if line.startswith("eebench: error")]
    assert code == 2 and len(lines) == 1, log
    assert expected in lines[0], lines[0]
    assert not list((tmp_path / "run" / "cells").glob("*.json"))


def test_bad_input_in_one_group_stops_it_and_the_others_finish(tmp_path, capsys, own_cache) -> None:
    """A dataset that fails as its cell starts (bad input, exit 2, as in a serial run); the group of the
    good dataset still finishes and keeps its result."""
    suite = {"name": "bad-group", "targets": [0.5], "methods": [{"name": "e2cm"}],
             "datasets": [{"name": "fashion-mnist", "per_class": 5, "test_subset": 50},
                          {"name": "image-folder", "params": {"root": str(tmp_path / "missing")}}],
             "backbones": [{"name": "resnet20", "params": {"width": 0.25}, "recipe": {"epochs": 1, "batch_size": 50}}],
             "budgets": [{"name": "epochs", "params": {"epochs": 1}}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    code, log = run(str(path), tmp_path, capsys, "--jobs", "2", "--threads", "1")
    lines = [line for line in log.splitlines() if line.startswith("eebench: error")]
    assert code == 2 and len(lines) == 1, log
    assert "image-folder" in lines[0] and "missing" in lines[0]
    (cell,) = (tmp_path / "run" / "cells").glob("*.json")
    assert json.loads(cell.read_text())["dataset"] == "fashion-mnist"
