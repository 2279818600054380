"""Benchmark: the calibrate phase of the class-exclusion cell of the 1-epoch suite, this tree vs a git revision.

Usage: python benchmarks/class_exclusion_calibrate.py [--state /tmp/ce_state] [--reference main] [--repeats 1]

The cell (Fashion-MNIST, ResNet-20, 1 epoch, seed 0) is prepared by the suite's own ``Runner``; its fit
and traces (minutes) are done once and the traces kept in ``--state``. Then the runner's whole calibrate
phase (``Runner._calibrate``: the β search, the hull, the φ points and the per-sample outcomes) runs on
those traces twice in this process: with ``plugins/class_exclusion.py`` as it is at ``--reference`` (loaded
from git as a separate module) and as it is in this tree. Prints both times (and the search alone), and
fails unless the two produce the same candidates, the same curve and the same result blocks.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from eebench.plugins import default_registry
from eebench.progress import set_quiet
from eebench.runner import CellWork, Runner
from eebench.suite import expand, load_suite
from eebench_plugins import class_exclusion

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "suites" / "fixed_budget_1epoch.yaml"


def prepared_cell(state: Path) -> tuple[Runner, CellWork, dict[str, torch.Tensor]]:
    """The suite's class-exclusion cell prepared by its runner, and its traces' tensors (fitted and traced
    once, then read from ``state``)."""
    suite = load_suite(SUITE)
    runner = Runner(suite, default_registry(), suite_path=str(SUITE), device=torch.device("cpu"))
    [cell] = [c for c in expand(suite) if c.method.name == "class-exclusion"]
    work = runner._prepare(cell)
    path = state / f"{cell.cell_id}.pt"
    if not path.exists():
        runner._fit(work)
        [calibration], [test] = runner._traces(work)
        state.mkdir(parents=True, exist_ok=True)
        torch.save({f"{name}_{field}": getattr(trace, field) for name, trace in (("cal", calibration), ("test", test))
                    for field in ("exclusion_scores", "final_logits", "labels")} | {"phases": work.phases}, path)
    return runner, work, torch.load(path)


def module_at(revision: str) -> ModuleType:
    """``plugins/class_exclusion.py`` as it is at ``revision``, imported under its own name."""
    text = subprocess.run(["git", "show", f"{revision}:plugins/class_exclusion.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "class_exclusion_reference.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("class_exclusion_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def calibrate(runner: Runner, work: CellWork, module: ModuleType, tensors: dict[str, torch.Tensor]
              ) -> tuple[float, float, float, torch.Tensor, Any]:
    """(seconds building both traces, seconds of the search alone, seconds of the whole phase, candidates,
    what the phase produced) with ``module``'s trace and search."""
    tick = time.perf_counter()
    cal, test = ([module.ClassExclusionTrace(*(tensors[f"{name}_{field}"] for field in
                                               ("exclusion_scores", "final_logits", "labels")))]
                 for name in ("cal", "test"))
    build = time.perf_counter() - tick
    work.calibrator = module.ClassExclusionSearch()
    tick = time.perf_counter()
    candidates = work.calibrator.thresholds(cal[0], work.strategy.exit_costs(), torch.Generator())
    search = time.perf_counter() - tick
    tick = time.perf_counter()
    done = runner._calibrate(work, cal, test)
    return build, search, time.perf_counter() - tick, candidates, done


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested results (tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0),
                                                                                    b.nan_to_num(7.0))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dataclass_fields__"):
        return type(a).__name__ == type(b).__name__ and all(same(getattr(a, f), getattr(b, f))
                                                            for f in a.__dataclass_fields__)
    return a == b or (a != a and b != b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, default=Path("/tmp/ce_state"))
    parser.add_argument("--reference", default="main", help="git revision of the old plugins/class_exclusion.py")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    set_quiet(True)
    runner, work, tensors = prepared_cell(args.state)
    print(f"threads {torch.get_num_threads()}; fit/trace phases when prepared: {tensors['phases']}")
    reference = module_at(args.reference)
    results = {}
    for name, module in (("reference", reference), ("this tree", class_exclusion)):
        for _ in range(args.repeats):
            build, search, phase, candidates, done = calibrate(runner, work, module, tensors)
            print(f"{name:>10}: traces built {build:5.2f} s, search {search:6.2f} s, calibrate phase {phase:6.2f} s, "
                  f"{candidates.shape[0]} candidates, {len(done.curve_dict['calibration']['cost'])} hull points")
        results[name] = (candidates, done)
    (old_candidates, old), (new_candidates, new) = results.values()
    assert same(old_candidates, new_candidates), "the candidates differ"
    for field in ("curve_dict", "accuracy_at", "operating_points", "no_exit", "exit_accuracy", "test_outcomes"):
        assert same(getattr(old, field), getattr(new, field)), f"{field} differs"
    print("identical: candidates, curve, accuracy_at, operating points, no_exit, exit accuracy, test outcomes")


if __name__ == "__main__":
    main()
