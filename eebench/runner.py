"""Runs a suite: cells in order, finished ones skipped, each result written at once."""

from __future__ import annotations

import copy
import fnmatch
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import eebench
from eebench.activations import ActivationCache
from eebench.basenet import BaseInfo, content_hash, prepare_backbone
from eebench.calibration import Curve, build_curve
from eebench.costs import ExitCosts, StageCosts
from eebench.datasets import DatasetBundle, dataset_labels, seeded_subset_indices, take
from eebench.errors import EebenchError, build_plugin, check_writable
from eebench.model import StagedBackbone
from eebench.plugins import Registry
from eebench.policy import operating_point
from eebench.results import cell_path, finished, write_atomic
from eebench.strategy import MethodContext, OperatingPoint
from eebench.suite import BackboneSpec, Cell, DatasetSpec, Suite, expand
from eebench.trace import ExitTrace, compute_traces, thresholds_to_json


@dataclass
class Splits:
    train: Any
    calibration: Any
    test: Any
    bundle: DatasetBundle
    calibration_name: str


@dataclass
class RunReport:
    run_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def make_splits(bundle: DatasetBundle, spec: DatasetSpec, seed: int) -> Splits:
    """Seeded subsets and the calibration split (train by default, as in the E2CM paper)."""
    train, test = bundle.train, bundle.test
    if spec.per_class or spec.train_subset:
        picked = seeded_subset_indices(dataset_labels(train), seed=seed, total=spec.train_subset,
                                       per_class=spec.per_class)
        train = take(train, picked)
    if spec.test_subset:
        test = take(test, seeded_subset_indices(dataset_labels(test), seed=seed, total=spec.test_subset))
    if spec.calibration == "holdout":
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7919))
        held = min(spec.holdout, len(train) // 2)
        calibration = take(train, order[:held].sort().values)
        train = take(train, order[held:].sort().values)
        return Splits(train, calibration, test, bundle, f"holdout of {held} training samples")
    return Splits(train, train, test, bundle, "training split (no augmentation)")


class Runner:
    """Holds what cells share: datasets, base backbones and their costs."""

    def __init__(self, suite: Suite, registry: Registry, *, suite_path: str, device: torch.device,
                 share_activations: bool = True) -> None:
        self.suite, self.registry, self.where, self.device = suite, registry, suite_path, device
        self.activations = ActivationCache(share=share_activations)
        self._splits: dict[str, Splits] = {}
        self._bases: dict[str, tuple[dict, BaseInfo, StageCosts]] = {}

    def _index(self, items: list, item: Any) -> int:
        return next(i for i, x in enumerate(items) if x is item)

    def splits(self, spec: DatasetSpec, seed: int) -> Splits:
        key = f"{spec.model_dump_json()}|{seed}"
        if key not in self._splits:
            i = self._index(self.suite.datasets, spec)
            factory = self.registry.get("datasets", spec.name, where=self.where, key=f"datasets[{i}].name")
            try:
                bundle = factory(**spec.params)
            except EebenchError as exc:
                raise EebenchError(exc.detail, where=self.where, key=f"datasets[{i}]") from exc
            self._splits[key] = make_splits(bundle, spec, seed)
        return self._splits[key]

    def build_backbone(self, spec: BackboneSpec, bundle: DatasetBundle, seed: int) -> StagedBackbone:
        i = self._index(self.suite.backbones, spec)
        factory = self.registry.get("backbones", spec.name, where=self.where, key=f"backbones[{i}].name")
        torch.manual_seed(seed)
        model = build_plugin(factory, self.where, f"backbones[{i}]", (bundle.num_classes, bundle.input_shape),
                             spec.params, rejects=(TypeError, ValueError, RuntimeError))  # timm: RuntimeError
        return model.to(memory_format=torch.channels_last)

    def base(self, cell: Cell, splits: Splits) -> tuple[dict, BaseInfo, StageCosts]:
        payload = {
            "dataset": cell.dataset.model_dump(exclude={"label"}),
            "backbone": cell.backbone.name,
            "backbone_params": cell.backbone.params,
            "recipe": cell.backbone.recipe.model_dump(),
            "seed": cell.seed,
        }
        key = repr(payload) + str(cell.backbone.checkpoint)
        if key not in self._bases:
            model = self.build_backbone(cell.backbone, splits.bundle, cell.seed)
            i = self._index(self.suite.backbones, cell.backbone)
            if cell.backbone.recipe.epochs == 0 and not cell.backbone.checkpoint:
                # the method trains the backbone itself (e.g. unsupervised DEC): no labels, no base accuracy
                info = BaseInfo(content_hash(payload), None, 0.0, 0, False, "untrained (recipe epochs: 0)")
            else:
                info = prepare_backbone(
                    model, payload, splits.train, splits.test, cell.backbone.recipe,
                    augment=splits.bundle.augment, seed=cell.seed, device=self.device,
                    checkpoint=cell.backbone.checkpoint, eval_batch_size=cell.batch_size,
                    where=self.where, key=f"backbones[{i}]",
                )
            costs = StageCosts.measure(model, splits.bundle.input_shape)
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self._bases[key] = (state, info, costs)
        return self._bases[key]

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        phases: dict[str, float] = {}
        tick = time.perf_counter()
        splits = self.splits(cell.dataset, cell.seed)
        phases["data"] = time.perf_counter() - tick

        tick = time.perf_counter()
        state, base_info, stage_costs = self.base(cell, splits)
        backbone = self.build_backbone(cell.backbone, splits.bundle, cell.seed)
        backbone.load_state_dict(copy.deepcopy(state))
        backbone.to(self.device).eval()
        phases["backbone"] = time.perf_counter() - tick

        m = self._index(self.suite.methods, cell.method)
        context = MethodContext(
            num_classes=splits.bundle.num_classes, input_shape=splits.bundle.input_shape,
            stage_costs=stage_costs, device=self.device, seed=cell.seed, batch_size=cell.batch_size,
            train_batch_size=cell.train_batch_size, augment=splits.bundle.augment,
            backbone_key=base_info.key, activations=self.activations,
            fresh_backbone=lambda: self.build_backbone(cell.backbone, splits.bundle, cell.seed).to(self.device),
        )
        self.activations.keep_only(base_info.key)
        strategy_factory = self.registry.get("exit_strategies", cell.method.name, where=self.where,
                                             key=f"methods[{m}].name")
        torch.manual_seed(cell.seed)
        strategy = build_plugin(strategy_factory, self.where, f"methods[{m}].params", (backbone, context),
                                cell.method.params)
        for module in strategy.modules():
            module.to(self.device)
        b = self._index(self.suite.budgets, cell.budget)
        budget = build_plugin(self.registry.get("budgets", cell.budget.name, where=self.where,
                                                key=f"budgets[{b}].name"),
                              self.where, f"budgets[{b}].params", params=cell.budget.params)
        budget.bind(len(splits.train))

        tick = time.perf_counter()
        budget.start()
        strategy.fit(splits.train, budget)
        budget.finish()
        phases["fit"] = time.perf_counter() - tick
        overspent = budget.overspent()  # spend ≤ budget, at the budget's granularity (eebench.budget)
        if overspent:
            named = cell.method.display if cell.method.display == cell.method.name else \
                f"{cell.method.display}' ('{cell.method.name}"
            raise EebenchError(f"method '{named}' {overspent}", where=self.where, key=f"methods[{m}]")

        tick = time.perf_counter()
        calibration_traces = [strategy.calibration_view(trace) for trace in compute_traces(
            strategy, splits.calibration, batch_size=cell.batch_size, device=self.device,
            description="calibration trace")]
        phases["trace_calibration"] = time.perf_counter() - tick
        tick = time.perf_counter()
        test_traces = compute_traces(strategy, splits.test, batch_size=cell.batch_size, device=self.device,
                                     description="test trace")
        phases["trace_test"] = time.perf_counter() - tick

        tick = time.perf_counter()
        calibrator_ref = cell.method.calibrator
        calibrator_name = calibrator_ref.name if calibrator_ref else strategy.default_calibrator
        calibrator_factory = self.registry.get("calibrators", calibrator_name, where=self.where,
                                               key=f"methods[{m}].calibrator")
        calibrator = calibrator_factory(**(calibrator_ref.params if calibrator_ref else {}))
        exit_costs = strategy.exit_costs()
        generator = torch.Generator().manual_seed(cell.seed)
        candidates = [calibrator.thresholds(trace, exit_costs, generator) for trace in calibration_traces]
        curve = build_curve(calibration_traces, test_traces, exit_costs, candidates)
        test_trace = test_traces[0]
        no_exit = test_trace.evaluate(no_exit_vector(test_trace), exit_costs)
        operating_points = evaluate_operating_points(strategy.operating_points(), calibration_traces, test_traces,
                                                     exit_costs, strategy.extra_metrics)
        curve_dict = curve.to_dict()
        native = strategy.native_thresholds(curve.thresholds)
        if native:
            curve_dict["native_thresholds"] = native
        no_exit_metrics = _metrics(strategy.extra_metrics, test_trace, no_exit_vector(test_trace))
        curve_metrics = _curve_metrics(strategy.extra_metrics, test_traces, curve.thresholds, curve.variants)
        if curve_metrics:
            curve_dict["test"]["metrics"] = curve_metrics
        accuracy_at = phi_points(curve, calibration_traces, test_traces, exit_costs, self.suite.targets,
                                 cell.seed, strategy.extra_metrics if curve_metrics else None)
        phases["calibrate"] = time.perf_counter() - tick

        return {
            "schema_version": 1,
            "cell_id": cell.cell_id,
            "config_hash": cell.config_hash,
            "config": cell.config(),
            "suite": self.suite.name,
            "dataset": cell.dataset.display,
            "backbone": cell.backbone.display,
            "method": cell.method.display,
            "budget": {"name": cell.budget.name, "params": cell.budget.params, "label": budget.describe(),
                       "limits": budget.limits(), "utilisation": budget.utilisation()},
            "seed": cell.seed,
            "calibrator": calibrator_name,
            "calibration_split": splits.calibration_name,
            "notes": strategy.notes,
            "provenance": {
                "eebench": eebench.__version__,
                "plugins": {
                    "dataset": self.registry.plugin_version("datasets", cell.dataset.name),
                    "backbone": self.registry.plugin_version("backbones", cell.backbone.name),
                    "method": self.registry.plugin_version("exit_strategies", cell.method.name),
                    "calibrator": self.registry.plugin_version("calibrators", calibrator_name),
                    "budget": self.registry.plugin_version("budgets", cell.budget.name),
                },
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device": str(self.device),
                "threads": torch.get_num_threads(),  # CPU float reductions, hence numbers, depend on it
                "seconds": {k: round(v, 3) for k, v in phases.items()},
                "base_backbone": {"key": base_info.key, "source": base_info.source,
                                  "train_seconds": round(base_info.train_seconds, 2),
                                  "train_samples": base_info.train_samples},
            },
            "sizes": {"train": len(splits.train), "calibration": len(splits.calibration), "test": len(splits.test)},
            "backbone_macs": stage_costs.total,
            "backbone_test_accuracy": base_info.test_accuracy,
            "exits": {"names": strategy.exit_names(), **exit_costs.to_dict()},
            "variants": strategy.variant_names(),
            "spend": budget.spend.to_dict(),
            "curve": curve_dict,
            "accuracy_at": accuracy_at,
            "hull_end": {"test_accuracy": float(curve.test_accuracy[-1]), "test_cost": float(curve.test_cost[-1]),
                         "calibration_accuracy": float(curve.calibration_accuracy[-1]),
                         "calibration_cost": float(curve.calibration_cost[-1]), "point": len(curve.test_cost) - 1},
            "no_exit": {"test_accuracy": float(no_exit.accuracy[0]), "test_cost": float(no_exit.cost[0]),
                        **({"metrics": no_exit_metrics} if no_exit_metrics else {})},
            "operating_points": operating_points,
            "fit_info": strategy.fit_info(),
        }


Metrics = Callable[[torch.Tensor, torch.Tensor], dict[str, list[float]]]


def phi_points(curve: Curve, calibration: list[ExitTrace], test: list[ExitTrace], costs: ExitCosts,
               targets: list[float], seed: int, metrics: Metrics | None) -> dict[str, dict[str, Any] | None]:
    """``accuracy_at``: each target's (and φ = 1's) calibration-chosen policy, evaluated on test."""
    calibration_cost, test_accuracy, test_cost = (curve.calibration_cost.tolist(), curve.test_accuracy.tolist(),
                                                  curve.test_cost.tolist())
    return {f"{t:g}": operating_point(curve.thresholds, curve.variants, calibration_cost, calibration, test, costs,
                                      t, seed, test_accuracy, test_cost, metrics)
            for t in sorted({*targets, 1.0})}


def no_exit_vector(trace: ExitTrace) -> torch.Tensor:
    return torch.full((1, trace.num_exits - 1), float("inf"), dtype=torch.float64)


def _predictions(trace: ExitTrace, thresholds: torch.Tensor) -> torch.Tensor:
    """[V, N] the prediction each sample leaves with (the prediction of its exit)."""
    first, _ = trace.outcome(torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1, trace.num_exits - 1))
    return trace.preds.gather(0, first)


def _metrics(metrics: Metrics, trace: ExitTrace, thresholds: torch.Tensor) -> dict[str, float]:
    """A method's extra test metrics (``ExitStrategy.extra_metrics``) of one threshold vector."""
    values = metrics(_predictions(trace, thresholds), trace.labels)
    return {name: float(row[0]) for name, row in values.items()}


def _curve_metrics(metrics: Metrics, traces: list[ExitTrace], thresholds: torch.Tensor,
                   variants: torch.Tensor | None) -> dict[str, list[float]]:
    """Extra test metrics of every hull point, in hull order ({} when the method has none)."""
    out: dict[str, list[float]] = {}
    for k in range(thresholds.shape[0]):
        trace = traces[0 if variants is None else int(variants[k])]
        values = _metrics(metrics, trace, thresholds[k])
        if not values:
            return {}  # the method reports no extra metrics: skip the other points
        for name, value in values.items():
            out.setdefault(name, []).append(value)
    return out


def evaluate_operating_points(points: list[OperatingPoint], calibration: list[ExitTrace], test: list[ExitTrace],
                              costs: ExitCosts, metrics: Metrics | None = None) -> list[dict[str, Any]]:
    """Cost, accuracy and exit counts (and extra test metrics) of each fixed operating point on both splits."""
    rows = []
    for point in points:
        thresholds = torch.as_tensor(point.thresholds, dtype=torch.float64).reshape(1, -1)
        on_calibration = calibration[point.variant].evaluate(thresholds, costs)
        on_test = test[point.variant].evaluate(thresholds, costs)
        extra = _metrics(metrics, test[point.variant], thresholds) if metrics else {}
        rows.append({
            "name": point.name, "variant": point.variant,
            "thresholds": thresholds_to_json(thresholds[0]),
            "calibration": {"cost": float(on_calibration.cost[0]), "accuracy": float(on_calibration.accuracy[0])},
            "test": {"cost": float(on_test.cost[0]), "accuracy": float(on_test.accuracy[0]),
                     "exit_counts": on_test.exit_counts[0].tolist(), **({"metrics": extra} if extra else {})},
        })
    return rows


def run_suite(suite: Suite, registry: Registry, *, suite_path: str, run_dir: Path, device: torch.device,
              only: str | None = None, log: Callable[[str], None] = print,
              share_activations: bool = True) -> RunReport:
    """Run every cell not already finished; each result is on disk before the next starts."""
    check_writable(run_dir, "--out")
    cells = [c for c in expand(suite) if only is None or fnmatch.fnmatch(c.cell_id, only)]
    if not cells:
        raise EebenchError(f"no cell matches --only '{only}'; expected a glob over cell ids",
                           where=suite_path, key="--only")
    runner = Runner(suite, registry, suite_path=suite_path, device=device, share_activations=share_activations)
    report = RunReport(run_dir)
    start = time.perf_counter()
    for index, cell in enumerate(cells, 1):
        if finished(run_dir, cell.cell_id, cell.config_hash, str(device)):
            report.skipped.append(cell.cell_id)
            log(f"[{index}/{len(cells)}] {cell.cell_id}: already done, skipped")
            continue
        log(f"[{index}/{len(cells)}] {cell.cell_id}: running")
        tick = time.perf_counter()
        result = runner.run_cell(cell)
        write_atomic(cell_path(run_dir, cell.cell_id), result)
        report.done.append(cell.cell_id)
        at = ", ".join(f"φ={k}: {v['accuracy']:.3f}" if v else f"φ={k}: —" for k, v in result["accuracy_at"].items())
        log(f"[{index}/{len(cells)}] {cell.cell_id}: done in {time.perf_counter() - tick:.1f}s ({at})")
        sys.stdout.flush()
    report.seconds = time.perf_counter() - start
    return report
