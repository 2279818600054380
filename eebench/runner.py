"""Runs a suite: cells group by group (``eebench.groups``), finished ones skipped, each result
written at once; here in this process, or fanned out over an executor (``eebench.fanout``).

Each cell runs in isolation: an exception inside a method's cell (its construction, fit,
outputs, calibration) is recorded as a failed-cell file naming the error and the plugin
and package that raised it, and the run goes on with the other cells. Bad input of the
suite itself (an ``EebenchError`` while a dataset, base backbone or plugin is prepared from
the suite's values, before any of the cell's work) stops the run, as ``validate`` would.
KeyboardInterrupt always stops it. One run at a time holds a run directory (``eebench.lock``).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import eebench
from eebench.activations import ActivationCache
from eebench.basenet import BaseInfo, cache_dir, cache_entry_ready, content_hash, prepare_backbone
from eebench.calibration import Curve, build_curve
from eebench.costs import ExitCosts, StageCosts
from eebench.datasets import DatasetBundle, dataset_labels, seeded_subset_indices, take
from eebench.errors import EebenchError, build_plugin, check_writable, plugin_errors
from eebench.groups import CellGroup, group_cells
from eebench.inference import save_state
from eebench.lock import run_lock
from eebench.memory import trim_heap
from eebench.model import StagedBackbone
from eebench.plugins import KIND_LABELS, Registry
from eebench.policy import operating_point
from eebench.provenance import environment
from eebench.results import FAILED, SCHEMA_VERSION, CellResult, finished, save_cell, write_atomic
from eebench.samples import outcome_block
from eebench.strategy import ExitStrategy, MethodContext, MethodReport, OperatingPoint
from eebench.suite import BackboneSpec, Cell, DatasetSpec, Suite, expand
from eebench.trace import ExitAccuracy, ExitOutputError, ExitTrace, compute_traces, exit_accuracy, thresholds_to_json

if TYPE_CHECKING:
    from eebench.executors import Executor


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
    failed: list[str] = field(default_factory=list)  # cells whose failure record is in RUN_DIR/cells
    # results (finished or failed) that could not be written: kept in memory for this run's leaderboard
    unsaved: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def unsaved_finished(self) -> list[str]:
        return [cell_id for cell_id, result in self.unsaved.items() if result.get("status") != FAILED]


#: phases in which the suite's own values are turned into plugins; an EebenchError there is bad input of
#: the suite (exit code 2, like ``validate``), not a failure of one cell
SETUP_PHASES = frozenset({"data", "backbone", "method", "budget", "calibrator"})


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
        # a dataset or base backbone whose preparation raised: every cell sharing it fails at once with it
        self._broken: dict[str, BaseException] = {}
        # (phase, plugin kind, plugin name) of the step running now: who is blamed when a cell fails
        self.blame: tuple[str, str, str] = ("data", "datasets", "")
        self.last_strategy: ExitStrategy | None = None  # the fitted strategy of the cell run last (saved with it)

    def _blame(self, phase: str, kind: str, name: str) -> None:
        self.blame = (phase, kind, name)

    def _index(self, items: list, item: Any) -> int:
        return next(i for i, x in enumerate(items) if x is item)

    def splits(self, spec: DatasetSpec, seed: int) -> Splits:
        key = f"{spec.model_dump_json()}|{seed}"
        if key in self._broken:
            raise self._broken[key]
        if key not in self._splits:
            i = self._index(self.suite.datasets, spec)
            factory = self.registry.get("datasets", spec.name, where=self.where, key=f"datasets[{i}].name")
            try:
                with plugin_errors(self.where, f"datasets[{i}]", params_key=f"datasets[{i}].params"):
                    bundle = factory(**spec.params)
            except EebenchError:
                raise
            except Exception as exc:
                self._broken[key] = exc
                raise
            self._splits[key] = make_splits(bundle, spec, seed)
        return self._splits[key]

    def build_backbone(self, spec: BackboneSpec, bundle: DatasetBundle, seed: int) -> StagedBackbone:
        i = self._index(self.suite.backbones, spec)
        factory = self.registry.get("backbones", spec.name, where=self.where, key=f"backbones[{i}].name")
        torch.manual_seed(seed)
        model = build_plugin(factory, self.where, f"backbones[{i}]", (bundle.num_classes, bundle.input_shape),
                             spec.params, rejects=(TypeError, ValueError, RuntimeError),  # timm: RuntimeError
                             params_key=f"backbones[{i}].params")
        return model.to(memory_format=torch.channels_last)

    @staticmethod
    def base_payload(cell: Cell) -> dict[str, Any]:
        """What the base backbone's cache key covers."""
        return {
            "dataset": cell.dataset.model_dump(exclude={"label"}),
            "backbone": cell.backbone.name,
            "backbone_params": cell.backbone.params,
            "recipe": cell.backbone.recipe.model_dump(),
            "seed": cell.seed,
        }

    @classmethod
    def needs_cache_write(cls, cell: Cell) -> bool:
        """The cell's base backbone will be trained and written to the cache (no complete entry yet)."""
        if cell.backbone.checkpoint or cell.backbone.recipe.epochs == 0:
            return False
        return not cache_entry_ready(content_hash(cls.base_payload(cell)))

    def base(self, cell: Cell, splits: Splits) -> tuple[dict, BaseInfo, StageCosts]:
        payload = self.base_payload(cell)
        key = repr(payload) + str(cell.backbone.checkpoint)
        if key in self._broken:
            raise self._broken[key]
        try:
            return self._base(cell, splits, payload, key)
        except EebenchError:
            raise
        except Exception as exc:
            self._broken[key] = exc
            raise

    def _base(self, cell: Cell, splits: Splits, payload: dict, key: str) -> tuple[dict, BaseInfo, StageCosts]:
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

    def strategy_for(self, cell: Cell, splits: Splits, backbone: StagedBackbone, stage_costs: StageCosts,
                     backbone_key: str) -> ExitStrategy:
        """The cell's exit strategy, built from its plugin and params on ``backbone`` (not yet fitted)."""
        m = self._index(self.suite.methods, cell.method)
        context = MethodContext(
            num_classes=splits.bundle.num_classes, input_shape=splits.bundle.input_shape,
            stage_costs=stage_costs, device=self.device, seed=cell.seed, batch_size=cell.batch_size,
            train_batch_size=cell.train_batch_size, augment=splits.bundle.augment,
            backbone_key=backbone_key, activations=self.activations,
            fresh_backbone=lambda: self.build_backbone(cell.backbone, splits.bundle, cell.seed).to(self.device),
        )
        self._blame("method", "exit_strategies", cell.method.name)
        factory = self.registry.get("exit_strategies", cell.method.name, where=self.where, key=f"methods[{m}].name")
        torch.manual_seed(cell.seed)
        strategy = build_plugin(factory, self.where, f"methods[{m}].params", (backbone, context), cell.method.params)
        for module in strategy.modules():
            module.to(self.device)
        return strategy

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """One cell's result: prepare, fit, trace, calibrate, assemble. ``self.blame`` says, while it runs
        and after it raised, which phase and plugin was at work."""
        self.last_strategy = None
        work = self._prepare(cell)
        self._fit(work)
        calibration_traces, test_traces = self._traces(work)
        calibrated = self._calibrate(work, calibration_traces, test_traces)
        self.last_strategy = work.strategy
        return self._assemble(work, calibrated)

    def _prepare(self, cell: Cell) -> CellWork:
        """Splits, the base backbone, the strategy, its budget and calibrator: everything built from the
        suite's values before any of the cell's work (bad values here are bad input of the suite)."""
        phases: dict[str, float] = {}
        tick = time.perf_counter()
        self._blame("data", "datasets", cell.dataset.name)
        splits = self.splits(cell.dataset, cell.seed)
        phases["data"] = time.perf_counter() - tick

        tick = time.perf_counter()
        self._blame("backbone", "backbones", cell.backbone.name)
        state, base_info, stage_costs = self.base(cell, splits)
        backbone = self.build_backbone(cell.backbone, splits.bundle, cell.seed)
        backbone.load_state_dict(copy.deepcopy(state))
        backbone.to(self.device).eval()
        phases["backbone"] = time.perf_counter() - tick

        self.activations.keep_only(base_info.key)
        strategy = self.strategy_for(cell, splits, backbone, stage_costs, base_info.key)
        m = self._index(self.suite.methods, cell.method)
        b = self._index(self.suite.budgets, cell.budget)
        self._blame("budget", "budgets", cell.budget.name)
        budget = build_plugin(self.registry.get("budgets", cell.budget.name, where=self.where,
                                                key=f"budgets[{b}].name"),
                              self.where, f"budgets[{b}].params", params=cell.budget.params)
        budget.bind(len(splits.train))
        # the calibrator is built before the fit: a parameter value it rejects loses no work
        calibrator_ref = cell.method.calibrator
        calibrator_name = calibrator_ref.name if calibrator_ref else strategy.default_calibrator
        self._blame("calibrator", "calibrators", calibrator_name)
        calibrator_factory = self.registry.get("calibrators", calibrator_name, where=self.where,
                                               key=f"methods[{m}].calibrator")
        calibrator = build_plugin(calibrator_factory, self.where, f"methods[{m}].calibrator.params",
                                  params=calibrator_ref.params if calibrator_ref else {})
        plugin = f"exit strategy '{cell.method.name}' ({self.registry.owner('exit_strategies', cell.method.name)})"
        return CellWork(cell, m, splits, base_info, stage_costs, strategy, budget, calibrator, calibrator_name,
                        plugin, phases)

    def _fit(self, work: CellWork) -> None:
        """The method's fit under its budget; a spend beyond the budget fails the cell."""
        cell, m, budget = work.cell, work.method_index, work.budget
        tick = time.perf_counter()
        self._blame("fit", "exit_strategies", cell.method.name)
        budget.start()
        with plugin_errors(self.where, f"methods[{m}]", params_key=f"methods[{m}].params"):
            work.strategy.fit(work.splits.train, budget)  # a plugin's EebenchError (a NaN loss...) is located
        budget.finish()
        work.phases["fit"] = time.perf_counter() - tick
        overspent = budget.overspent()  # spend ≤ budget, at the budget's granularity (eebench.budget)
        if overspent:
            named = cell.method.display if cell.method.display == cell.method.name else \
                f"{cell.method.display}' ('{cell.method.name}"
            raise EebenchError(f"method '{named}' {overspent}", where=self.where, key=f"methods[{m}]")

    def _traces(self, work: CellWork) -> tuple[list[ExitTrace], list[ExitTrace]]:
        """The calibration traces (through the method's ``calibration_view``) and the test traces."""
        cell, strategy, method = work.cell, work.strategy, work.cell.method.name
        tick = time.perf_counter()
        self._blame("trace_calibration", "exit_strategies", method)
        calibration_traces = [strategy.calibration_view(trace) for trace in compute_traces(
            strategy, work.splits.calibration, batch_size=cell.batch_size, device=self.device,
            description="calibration trace", plugin=work.plugin, calibration=True)]
        work.phases["trace_calibration"] = time.perf_counter() - tick
        tick = time.perf_counter()
        self._blame("trace_test", "exit_strategies", method)
        test_traces = compute_traces(strategy, work.splits.test, batch_size=cell.batch_size, device=self.device,
                                     description="test trace", plugin=work.plugin)
        work.phases["trace_test"] = time.perf_counter() - tick
        return calibration_traces, test_traces

    def _calibrate(self, work: CellWork, calibration_traces: list[ExitTrace],
                   test_traces: list[ExitTrace]) -> Calibrated:
        """Thresholds chosen on the calibration traces; the hull, φ policies and operating points evaluated."""
        cell, m, strategy, method = work.cell, work.method_index, work.strategy, work.cell.method.name
        tick = time.perf_counter()
        self._blame("calibrate", "exit_strategies", method)
        exit_costs = strategy.exit_costs()
        exits = {trace.num_exits for trace in [*calibration_traces, *test_traces]}
        if exits != {exit_costs.num_exits}:
            raise ExitOutputError(f"{work.plugin}: its traces have {sorted(exits)} exits but exit_costs() "
                                  f"{exit_costs.num_exits}; expected one number")
        generator = torch.Generator().manual_seed(cell.seed)
        self._blame("calibrate", "calibrators", work.calibrator_name)
        with plugin_errors(self.where, f"methods[{m}].calibrator", params_key=f"methods[{m}].calibrator.params"):
            candidates = work.calibrator.variant_thresholds(calibration_traces, exit_costs, generator)
        self._blame("calibrate", "exit_strategies", method)
        report = strategy.report()
        metrics = report.extra_metrics or _no_metrics
        curve = build_curve(calibration_traces, test_traces, exit_costs, candidates)
        test_trace = test_traces[0]
        no_exit = test_trace.evaluate(no_exit_vector(test_trace), exit_costs)
        operating_points = evaluate_operating_points(report.operating_points, calibration_traces, test_traces,
                                                     exit_costs, metrics)
        curve_dict = curve.to_dict()
        native = report.native_thresholds(curve.thresholds) if report.native_thresholds else None
        if native:
            curve_dict["native_thresholds"] = native
        no_exit_metrics = _metrics(metrics, test_trace, no_exit_vector(test_trace))
        curve_metrics = _curve_metrics(metrics, test_traces, curve.thresholds, curve.variants)
        if curve_metrics:
            curve_dict["test"]["metrics"] = curve_metrics
        accuracy_at = phi_points(curve, calibration_traces, test_traces, exit_costs, self.suite.computed_targets,
                                 cell.seed, metrics if curve_metrics else None)
        outcomes = outcome_block(curve, test_traces, exit_costs, self.suite.computed_targets, cell.seed)
        work.phases["calibrate"] = time.perf_counter() - tick
        return Calibrated(report, exit_costs, curve, curve_dict, accuracy_at, operating_points,
                          {"test_accuracy": float(no_exit.accuracy[0]), "test_cost": float(no_exit.cost[0]),
                           **({"metrics": no_exit_metrics} if no_exit_metrics else {})},
                          exit_accuracy(test_trace), outcomes)

    def _assemble(self, work: CellWork, done: Calibrated) -> dict[str, Any]:
        """The cell's result (``CellResult``, schema ``SCHEMA_VERSION``) as a JSON-ready dict."""
        cell, splits, budget, base_info = work.cell, work.splits, work.budget, work.base_info
        curve = done.curve
        result = CellResult(
            schema_version=SCHEMA_VERSION,
            cell_id=cell.cell_id,
            config_hash=cell.config_hash,
            config=cell.config(),
            suite=self.suite.name,
            dataset=cell.dataset.display,
            backbone=cell.backbone.display,
            method=cell.method.display,
            budget={"name": cell.budget.name, "params": cell.budget.params, "label": budget.describe(),
                    "limits": budget.limits(), "utilisation": budget.utilisation()},
            seed=cell.seed,
            calibrator=work.calibrator_name,
            calibration_split=splits.calibration_name,
            notes=done.report.notes,
            provenance={
                "eebench": eebench.__version__,
                "plugins": {
                    "dataset": self.registry.plugin_version("datasets", cell.dataset.name),
                    "backbone": self.registry.plugin_version("backbones", cell.backbone.name),
                    "method": self.registry.plugin_version("exit_strategies", cell.method.name),
                    "calibrator": self.registry.plugin_version("calibrators", work.calibrator_name),
                    "budget": self.registry.plugin_version("budgets", cell.budget.name),
                },
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device": str(self.device),
                "threads": torch.get_num_threads(),  # CPU float reductions, hence numbers, depend on it
                "seconds": {k: round(v, 3) for k, v in work.phases.items()},
                "base_backbone": {"key": base_info.key, "source": base_info.source,
                                  "train_seconds": round(base_info.train_seconds, 2),
                                  "train_samples": base_info.train_samples},
                **environment(self.registry, self.device),  # git, plugin packages, libraries, CPU, GPU
            },
            sizes={"train": len(splits.train), "calibration": len(splits.calibration), "test": len(splits.test)},
            backbone_macs=work.stage_costs.total,
            backbone_test_accuracy=base_info.test_accuracy,
            exits={"names": done.report.exit_names, **done.exit_costs.to_dict(),
                   **done.exit_accuracy.to_dict(done.report.exit_names)},
            variants=done.report.variants,
            spend=budget.spend.to_dict(),
            curve=done.curve_dict,
            accuracy_at=done.accuracy_at,
            hull_end={"test_accuracy": float(curve.test_accuracy[-1]), "test_cost": float(curve.test_cost[-1]),
                      "calibration_accuracy": float(curve.calibration_accuracy[-1]),
                      "calibration_cost": float(curve.calibration_cost[-1]), "point": len(curve.test_cost) - 1},
            no_exit=done.no_exit,
            operating_points=done.operating_points,
            fit_info=done.report.fit_info,
            test_outcomes=done.test_outcomes,
        )
        return result.to_json_dict()


@dataclass
class CellWork:
    """What one cell's phases hand each other."""

    cell: Cell
    method_index: int
    splits: Splits
    base_info: BaseInfo
    stage_costs: StageCosts
    strategy: ExitStrategy
    budget: Any
    calibrator: Any
    calibrator_name: str
    plugin: str  # "exit strategy 'x' (package)", for error messages
    phases: dict[str, float]


@dataclass
class Calibrated:
    """What calibration produced for the result."""

    report: MethodReport
    exit_costs: ExitCosts
    curve: Curve
    curve_dict: dict[str, Any]
    accuracy_at: dict[str, Any]
    operating_points: list[dict[str, Any]]
    no_exit: dict[str, Any]
    exit_accuracy: ExitAccuracy
    test_outcomes: dict[str, Any] | None = None  # per-sample correctness (eebench.samples)


Metrics = Callable[[torch.Tensor, torch.Tensor], dict[str, list[float]]]


def phi_points(curve: Curve, calibration: list[ExitTrace], test: list[ExitTrace], costs: ExitCosts,
               targets: list[float], seed: int, metrics: Metrics | None) -> dict[str, dict[str, Any] | None]:
    """``accuracy_at``: each target's (and φ = 1's) calibration-chosen policy, evaluated on test."""
    calibration_cost, test_accuracy, test_cost = (curve.calibration_cost.tolist(), curve.test_accuracy.tolist(),
                                                  curve.test_cost.tolist())
    memos: tuple[dict, dict] = ({}, {})  # each vertex evaluated once per split, whatever the targets
    return {f"{t:g}": operating_point(curve.thresholds, curve.variants, calibration_cost, calibration, test, costs,
                                      t, seed, test_accuracy, test_cost, metrics, memos)
            for t in sorted({*targets, 1.0})}


def _no_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    return {}


def no_exit_vector(trace: ExitTrace) -> torch.Tensor:
    return torch.full((1, trace.num_exits - 1), float("inf"), dtype=torch.float64)


def _predictions(trace: ExitTrace, thresholds: torch.Tensor) -> torch.Tensor:
    """[V, N] the prediction each sample leaves with (``ExitTrace.predictions``)."""
    return trace.predictions(thresholds)


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


def _one_line(exc: BaseException, limit: int = 300) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({'' if exc.code is None else repr(exc.code)})"
    text = " ".join(str(exc).split()) or repr(exc)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _budget_label(registry: Registry, cell: Cell) -> str:
    """The label a finished result of the cell would show (``Budget.describe()``), so its failed row sits
    where its result would."""
    try:
        return str(registry.get("budgets", cell.budget.name)(**cell.budget.params).describe())
    except Exception:  # noqa: BLE001 -- a label is not worth a second failure
        return cell.budget.display


def failure_record(suite: Suite, registry: Registry, cell: Cell, exc: BaseException, blame: tuple[str, str, str],
                   device: torch.device, seconds: float) -> dict[str, Any]:
    """A failed cell's file: its identity, the error (type, one-line message, phase, the plugin and the
    package that registered it) and the traceback, for the leaderboard and for debugging."""
    phase, kind, name = blame
    return {
        "schema_version": SCHEMA_VERSION,
        "status": FAILED,
        "cell_id": cell.cell_id,
        "config_hash": cell.config_hash,
        "config": cell.config(),
        "suite": suite.name,
        "dataset": cell.dataset.display,
        "backbone": cell.backbone.display,
        "method": cell.method.display,
        "budget": {"name": cell.budget.name, "params": cell.budget.params, "label": _budget_label(registry, cell)},
        "seed": cell.seed,
        "error": {
            "type": type(exc).__name__,
            "message": _one_line(exc),
            "phase": phase,
            "plugin": {"kind": KIND_LABELS[kind], "name": name, "package": registry.owner(kind, name),
                       "version": registry.plugin_version(kind, name)},
            "traceback": "".join(traceback.format_exception(exc)[-12:]),
        },
        "provenance": {"eebench": eebench.__version__, "torch": torch.__version__,
                       "python": platform.python_version(), "device": str(device), "seconds": round(seconds, 3)},
    }


def describe_failure(record: dict[str, Any]) -> str:
    """``Type: message (exit strategy 'x' of package 'p', during fit)``."""
    error = record["error"]
    plugin = error["plugin"]
    return (f"{error['type']}: {error['message']} ({plugin['kind']} '{plugin['name']}' of package "
            f"'{plugin['package']}', during {error['phase']})")


def _warn(line: str) -> None:
    print(f"eebench: warning: {line}", file=sys.stderr)


def _save(report: RunReport, run_dir: Path, cell_id: str, payload: dict[str, Any], text: str) -> Path | None:
    """Write a cell's file; when it cannot be written, keep it in memory and say where in one line."""
    try:
        return save_cell(run_dir, cell_id, text)
    except OSError as exc:
        report.unsaved[cell_id] = payload
        what = "failure record" if payload.get("status") == FAILED else "result"
        _warn(f"cannot write the {what} of cell {cell_id} to {exc.filename or run_dir / 'cells'} "
              f"({exc.strerror or exc}); it is kept in memory for this run's leaderboard and the cell will be "
              "computed again by the next run")
        return None


RUN_SUITE = "suite.json"


def _write_run_suite(run_dir: Path, suite: Suite, suite_path: str) -> None:
    """The suite a run directory was last run with, so ``eebench bench`` can redraw its leaderboard."""
    try:
        write_atomic(run_dir / RUN_SUITE, {"path": suite_path, "suite": suite.model_dump(mode="json")})
    except OSError as exc:
        _warn(f"cannot write {run_dir / RUN_SUITE} ({exc.strerror or exc}); 'eebench bench' will draw a plain "
              "leaderboard")


def read_run_suite(run_dir: Path) -> tuple[Suite | None, str]:
    """The suite recorded by ``eebench run`` in ``run_dir`` and its path, or (None, "") when absent or unreadable."""
    try:
        data = json.loads((run_dir / RUN_SUITE).read_text())
        return Suite(**data["suite"]), str(data["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, ""


def _save_strategy(run_dir: Path, cell: Cell, strategy: ExitStrategy | None) -> None:
    """The fitted strategy's state next to its result, for ``eebench bench``; a state that cannot be
    written costs the bench of that cell, not the result."""
    if strategy is None:
        return
    try:
        save_state(run_dir, cell.cell_id, cell.config_hash, strategy)
    except OSError as exc:
        _warn(f"cannot write the state of cell {cell.cell_id} to {run_dir / 'states'} ({exc.strerror or exc}); "
              "'eebench bench' will not be able to time it")


def _check_cache(cells: list[Cell]) -> None:
    """The backbone cache must take the base networks this run will train, before any work."""
    if any(Runner.needs_cache_write(cell) for cell in cells):
        check_writable(cache_dir() / "backbones", "EEBENCH_CACHE",
                       "a writable directory for the backbone cache (set EEBENCH_CACHE)")


@dataclass
class RunPlan:
    """What a run (or one worker's share of it) works through: its cells in groups, which of them are
    still to do, and how many cells the whole run has (for ``[k/N]`` progress lines)."""

    suite: Suite
    suite_path: str
    run_dir: Path
    device: torch.device
    groups: list[CellGroup]
    pending: set[str]  # cell ids without a finished result when the run took the lock
    total: int
    share_activations: bool = True

    def pending_cells(self) -> list[Cell]:
        return [cell for group in self.groups for _, cell in group.cells if cell.cell_id in self.pending]


def run_suite(suite: Suite, registry: Registry, *, suite_path: str, run_dir: Path, device: torch.device,
              only: str | None = None, log: Callable[[str], None] = print, share_activations: bool = True,
              wait: bool = False, executor: Executor | None = None) -> RunReport:
    """Run every cell not already finished; each result is on disk as soon as its cell is done.

    Cells run group by group (``eebench.groups``: cells sharing a base backbone together), in this
    process, or fanned out over ``executor`` (``eebench.executors``: a process pool, Ray, submitit),
    which runs each group in one worker. A cell that raises is recorded as a failed cell
    (``RunReport.failed``) and the run goes on; an ``EebenchError`` while the suite's values are
    turned into a dataset, backbone or plugin (``SETUP_PHASES``) is bad input and stops the run (a
    parallel run: that group; the others finish first); so does KeyboardInterrupt. Finished cells
    are always kept. Another run holding the run directory makes this one refuse, or wait (``wait``).
    """
    check_writable(run_dir, "--out")
    check_writable(run_dir / "cells", "--out", "a writable cells/ folder in the run directory")
    cells = [c for c in expand(suite) if only is None or fnmatch.fnmatch(c.cell_id, only)]
    if not cells:
        raise EebenchError(f"no cell matches --only '{only}'; expected a glob over cell ids",
                           where=suite_path, key="--only")
    groups = group_cells(cells)
    with run_lock(run_dir, wait=wait):
        _write_run_suite(run_dir, suite, suite_path)
        pending = {c.cell_id for c in cells if not finished(run_dir, c.cell_id, c.config_hash, str(device),
                                                           suite.computed_targets)}
        plan = RunPlan(suite, suite_path, run_dir, device, groups, pending, len(cells), share_activations)
        _check_cache(plan.pending_cells())
        if executor is None:
            return _run_serial(plan, registry, log)
        from eebench.fanout import run_groups  # the parallel driver (it imports this module)

        return run_groups(plan, executor, log)


def declare_frozen_products(runner: Runner, registry: Registry, cells: list[Cell]) -> None:
    """Tell the run's activation cache what the methods still to run will read (their strategies'
    ``frozen_products``), so the first frozen pass over a split fills it; a factory that cannot say
    (a function, or one that fails to load: its cell will report that) declares nothing."""
    for name in dict.fromkeys(cell.method.name for cell in cells):
        try:
            products = getattr(registry.get("exit_strategies", name), "frozen_products", None)
        except Exception:  # noqa: BLE001 -- the cell itself reports a plugin that cannot load
            continue
        for key, reducer in dict(products or {}).items():
            runner.activations.want(key, reducer)


def _run_serial(plan: RunPlan, registry: Registry, log: Callable[[str], None]) -> RunReport:
    """Every group in this process, one Runner for all (datasets and base backbones loaded once)."""
    runner = Runner(plan.suite, registry, suite_path=plan.suite_path, device=plan.device,
                    share_activations=plan.share_activations)
    declare_frozen_products(runner, registry, plan.pending_cells())
    report = RunReport(plan.run_dir)
    start = time.perf_counter()
    for group in plan.groups:
        run_cells(runner, registry, plan, group, report, log)
    report.seconds = time.perf_counter() - start
    return report


def done_line(position: int, total: int, result: dict[str, Any], seconds: float) -> str:
    """``[k/N] cell: done in 12.3s (φ=0.25: 0.812, ...)``: the progress line of a finished cell."""
    at = ", ".join(f"φ={k}: {v['accuracy']:.3f}" if v else f"φ={k}: —" for k, v in result["accuracy_at"].items())
    return f"[{position}/{total}] {result['cell_id']}: done in {seconds:.1f}s ({at})"


def failed_line(position: int, total: int, record: dict[str, Any], seconds: float, path: Path | None) -> str:
    """``[k/N] cell: FAILED after 3.1s: <the error>; recorded in <path>``."""
    where = f"; recorded in {path}" if path else ""
    return f"[{position}/{total}] {record['cell_id']}: FAILED after {seconds:.1f}s: {describe_failure(record)}{where}"


def run_cells(runner: Runner, registry: Registry, plan: RunPlan, group: CellGroup, report: RunReport,
              log: Callable[[str], None], recheck: bool = False) -> None:
    """Run the group's pending cells in order, each result saved before the next starts; ``recheck``
    skips a cell that another attempt of this group finished meanwhile (a retried worker)."""
    suite, run_dir, device, total = plan.suite, plan.run_dir, plan.device, plan.total
    for position, cell in group.cells:
        if cell.cell_id not in plan.pending or (
                recheck and finished(run_dir, cell.cell_id, cell.config_hash, str(device), suite.computed_targets)):
            report.skipped.append(cell.cell_id)
            log(f"[{position}/{total}] {cell.cell_id}: already done, skipped")
            continue
        log(f"[{position}/{total}] {cell.cell_id}: running")
        tick = time.perf_counter()
        try:
            result = runner.run_cell(cell)
            text = json.dumps(result, indent=1, allow_nan=False)  # a result that cannot be saved fails here
        except KeyboardInterrupt:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- one bad cell must not sink the suite
            if isinstance(exc, EebenchError) and runner.blame[0] in SETUP_PHASES:
                raise  # bad input of the suite: one line, exit code 2, finished cells kept
            record = failure_record(suite, registry, cell, exc, runner.blame, device, time.perf_counter() - tick)
            path = _save(report, run_dir, cell.cell_id, record, json.dumps(record, indent=1, default=str))
            report.failed.append(cell.cell_id)
            log(failed_line(position, total, record, time.perf_counter() - tick, path))
            sys.stdout.flush()
            continue
        _save_strategy(run_dir, cell, runner.last_strategy)
        runner.last_strategy = None  # the next cell must not keep this one's tensors alive
        trim_heap()  # and what it freed goes back to the system before the next one grows
        _save(report, run_dir, cell.cell_id, result, text)
        report.done.append(cell.cell_id)
        log(done_line(position, total, result, time.perf_counter() - tick))
        sys.stdout.flush()
