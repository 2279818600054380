"""Measured latency and throughput of finished cells' early-exit networks, next to their MACs.

For each finished cell of a run, ``bench_run`` rebuilds the fitted strategy from its saved
state, lays the test split out on the device in its fixed order, and times (after warm-up,
under ``torch.inference_mode``, with a fixed thread count and ``torch.cuda.synchronize`` on
GPU, no host-device copy inside the timed loop):

* the plain backbone, at every batch size;
* each φ policy of the cell (``accuracy_at``) as a real early-exit network: batch 1, and at
  each larger batch size with compaction and with masking (``eebench.inference``).

One timed iteration is one pass over the stream; the figures are the median and the
inter-quartile range over the iterations. The measured speedup divides the plain backbone's
time per sample by the policy's at the same batch size, in the same process, minutes apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eebench.costs import StageCosts
from eebench.errors import EebenchError
from eebench.inference import EarlyExitNetwork, ExitPolicy, load_state
from eebench.passes import iterate_batches
from eebench.plugins import Registry
from eebench.provenance import cpu
from eebench.results import FAILED, RESULT_KEYS, cell_path, write_atomic
from eebench.strategy import ExitStrategy
from eebench.suite import BackboneSpec, DatasetSpec, LatencySpec, MethodSpec, PluginRef, Suite, expand


def hardware(device: torch.device) -> dict[str, Any]:
    """What the timings ran on: CPU model, cores, threads, torch build, GPU name."""
    machine = cpu()
    info: dict[str, Any] = {"device": str(device), "cpu": machine["model"], "cores": machine["cores"],
                            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(images: torch.Tensor, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    return [(start, images[start : start + batch_size]) for start in range(0, int(images.shape[0]), batch_size)]


def _pass(run: Callable[[torch.Tensor, int], object], batches: list[tuple[int, torch.Tensor]],
          device: torch.device) -> float:
    """Seconds of one timed pass over the stream."""
    tick = time.perf_counter()
    for start, x in batches:
        run(x, start)
    _sync(device)
    return time.perf_counter() - tick


def _warm(run: Callable[[torch.Tensor, int], object], batches: list[tuple[int, torch.Tensor]], warmup: int,
          device: torch.device) -> None:
    head = batches[: max(1, 64 // len(batches[0][1]) if len(batches[0][1]) < 64 else 4)]
    for _ in range(warmup):
        for start, x in head:
            run(x, start)
    _sync(device)


def _summary(seconds: list[float], count: int, batch_size: int) -> dict[str, Any]:
    per_sample = torch.tensor(seconds, dtype=torch.float64) / count * 1000.0
    q1, median, q3 = (float(q) for q in per_sample.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
    return {"batch_size": batch_size, "samples": count, "repeats": len(seconds), "ms_per_sample": median,
            "iqr_ms": [q1, q3], "samples_per_s": 1000.0 / median}


def time_stream(run: Callable[[torch.Tensor, int], object], images: torch.Tensor, batch_size: int,
                repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Median and IQR (over ``repeats`` passes) of the time per sample of ``run`` over ``images``
    in batches of ``batch_size``, after ``warmup`` passes over the stream's first batches."""
    batches = _batches(images, batch_size)
    with torch.inference_mode():
        _warm(run, batches, warmup, device)
        seconds = [_pass(run, batches, device) for _ in range(repeats)]
    return _summary(seconds, int(images.shape[0]), batch_size)


def time_against(plain: Callable[[torch.Tensor, int], object], run: Callable[[torch.Tensor, int], object],
                 images: torch.Tensor, batch_size: int, repeats: int, warmup: int,
                 device: torch.device) -> dict[str, Any]:
    """``run``'s timing (as ``time_stream``) with its speedup over ``plain`` measured in pairs: each
    repeat times one pass of both, back to back (alternating which goes first), and the speedup is the
    median of the per-pair ratios, so a machine that drifts between passes moves both alike."""
    batches = _batches(images, batch_size)
    ratios, seconds = [], []
    with torch.inference_mode():
        _warm(plain, batches, warmup, device)
        _warm(run, batches, warmup, device)
        for repeat in range(repeats):
            if repeat % 2:
                mine = _pass(run, batches, device)
                theirs = _pass(plain, batches, device)
            else:
                theirs = _pass(plain, batches, device)
                mine = _pass(run, batches, device)
            seconds.append(mine)
            ratios.append(theirs / mine)
    timing = _summary(seconds, int(images.shape[0]), batch_size)
    values = torch.tensor(ratios, dtype=torch.float64)
    q1, median, q3 = (float(q) for q in values.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
    timing.update(speedup=median, speedup_iqr=[q1, q3])
    return timing


def mode_key(mode: str, batch_size: int) -> str:
    return "batch1" if batch_size == 1 else f"{mode}@{batch_size}"


def bench_strategy(strategy: ExitStrategy, result: dict[str, Any], images: torch.Tensor, settings: LatencySpec,
                   targets: list[float], device: torch.device) -> dict[str, Any]:
    """The ``latency`` block of one cell: the plain backbone and each φ policy, per mode and batch size."""
    strategy.eval()
    costs = strategy.exit_costs()
    batched = images if not settings.samples else images[: settings.samples]
    single = images[: settings.batch1_samples]
    streams = {size: single if size == 1 else batched for size in settings.batch_sizes}

    def backbone(x: torch.Tensor, start: int) -> object:
        return strategy.backbone(x)

    plain = {str(size): time_stream(backbone, stream, size, settings.repeats, settings.warmup, device)
             for size, stream in streams.items()}
    policies: dict[str, Any] = {}
    for target in targets:
        key = f"{target:g}"
        policy = ExitPolicy.from_result(result, key)
        if policy is None:
            policies[key] = None
            continue
        network = EarlyExitNetwork(strategy, policy, int(batched.shape[0]), device)
        exits, _ = network.predict(batched, max(settings.batch_sizes), "compact")
        paid = policy.row_costs(exits, 0, costs, strategy.chained)  # [N] normalised MACs per sample
        modes: dict[str, Any] = {}
        for size, stream in streams.items():
            count = int(stream.shape[0])
            network = EarlyExitNetwork(strategy, policy, count, device)
            for mode in (["batch1"] if size == 1 else ["compact", "masked"] if settings.masked else ["compact"]):
                timing = time_against(backbone, lambda x, start, n=network, m=mode: n.run(x, start, m), stream,
                                      size, settings.repeats, settings.warmup, device)
                timing["mac_speedup"] = 1.0 / float(paid[:count].mean())  # on the same samples
                modes[mode_key(mode, size)] = timing
        policies[key] = {"mac_cost": float(paid.mean()), "mac_speedup": 1.0 / float(paid.mean()),
                         "exit_counts": exits.bincount(minlength=costs.num_exits).tolist(), "modes": modes}
    return {"hardware": hardware(device), "settings": settings.model_dump(), "backbone": plain,
            "policies": policies}


def test_images(runner: Any, cell: Any, device: torch.device) -> torch.Tensor:
    """The cell's test split on ``device``, channels-last, in its fixed order (``runner``: an
    ``eebench.runner.Runner``, imported lazily since the runner imports what this module serves)."""
    splits = runner.splits(cell.dataset, cell.seed)
    return torch.cat([x for x, _ in iterate_batches(splits.test, 1000, device=device, description="bench data")])


def one_cell_suite(result: dict[str, Any]) -> Suite:
    """A suite of exactly the cell a result came from (its ``config``), to rebuild its plugins."""
    config = result["config"]
    return Suite(name=result.get("suite", "bench"), datasets=[DatasetSpec(**config["dataset"])],
                 backbones=[BackboneSpec(**config["backbone"])], methods=[MethodSpec(**config["method"])],
                 budgets=[PluginRef(**config["budget"])], seeds=[config["seed"]], batch_size=config["batch_size"],
                 train_batch_size=config["train_batch_size"])


def rebuild_strategy(run_dir: Path, result: dict[str, Any], registry: Registry,
                     device: torch.device) -> tuple[ExitStrategy, torch.Tensor]:
    """The fitted strategy of a finished cell (its plugin, params and saved state) and its test images."""
    from eebench.runner import Runner

    suite = one_cell_suite(result)
    runner = Runner(suite, registry, suite_path=str(run_dir), device=device)
    cell = expand(suite)[0]
    splits = runner.splits(cell.dataset, cell.seed)
    backbone = runner.build_backbone(cell.backbone, splits.bundle, cell.seed).to(device).eval()
    stage_costs = StageCosts.measure(backbone, splits.bundle.input_shape)
    strategy = runner.strategy_for(cell, splits, backbone, stage_costs, backbone_key="")
    strategy.load_state_dict(load_state(run_dir, result["cell_id"], result["config_hash"]))
    for module in strategy.modules():
        module.to(device)
    strategy.eval()
    return strategy, test_images(runner, cell, device)


def finished_results(run_dir: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted((run_dir / "cells").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("status") != FAILED and RESULT_KEYS <= data.keys():
            results.append(data)
    return results


def bench_run(run_dir: Path, registry: Registry, device: torch.device, settings: LatencySpec,
              targets: list[float] | None = None, only: Callable[[dict[str, Any]], bool] | None = None,
              log: Callable[[str], None] = print) -> list[str]:
    """Time every finished cell of ``run_dir`` (or those ``only`` keeps) and write its ``latency`` block
    into its result file; returns the cells timed."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    timed = []
    results = [r for r in finished_results(run_dir) if only is None or only(r)]
    for index, result in enumerate(results, 1):
        cell_targets = targets or sorted(float(t) for t in result["accuracy_at"] if float(t) < 1.0)
        log(f"[{index}/{len(results)}] {result['cell_id']}: timing {len(cell_targets)} policies")
        strategy, images = rebuild_strategy(run_dir, result, registry, device)
        result["latency"] = bench_strategy(strategy, result, images, settings, cell_targets, device)
        write_atomic(cell_path(run_dir, result["cell_id"]), result)
        timed.append(result["cell_id"])
    if not results:
        raise EebenchError("no finished cell to time; expected a run directory written by 'eebench run'",
                           where=str(run_dir), key="RUN_DIR")
    return timed
