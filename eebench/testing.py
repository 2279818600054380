"""A conformance kit for exit-strategy authors, in the spirit of scikit-learn's ``check_estimator``.

``check_exit_strategy(name_or_factory, params)`` runs the method through the harness's own
cell flow (``eebench.runner.Runner.run_cell``: the real dataset, backbone, budget and
calibrator plugins) on a small seeded Fashion-MNIST subset, twice, and checks what the
harness relies on:

``outputs``
    every batch of ``exit_outputs`` / ``cached_outputs`` and every trace: preds and scores
    [E, B] (or [P, E, B] with P == len(variant_names())), integer class ids in [0, K), floating
    scores that may be +-inf but never NaN, one trace per variant;
``exit-names``
    ``len(exit_names()) == exit_costs().num_exits ==`` the exits in the outputs, names unique;
``costs``
    every MAC count finite, backbone MACs > 0, overheads >= 0, reference > 0, cumulative
    cost non-decreasing along the exits;
``exits-off``
    +inf switches an exit off: the all-+inf vector sends every sample to the last exit at
    ``backbone_macs[-1]`` plus the last overhead (every overhead for a ``chained`` method),
    normalised; an exit set to +inf in any calibrated vector takes no sample; the traces'
    ``strict`` / ``chained`` flags are the method's;
``budget``
    after ``fit`` the budget is not overspent (``Budget.overspent()``);
``test-isolation``
    the test split is a sentinel dataset that records every read (``__getitem__``, and the
    ``images`` / ``labels`` tensors the fast paths use): nothing may read it from the
    method's construction until the harness starts the test trace;
``determinism``
    a second run with the same seed (and a fresh activation cache, so shared passes are
    recomputed) gives identical traces, costs, spend and results.

Each failure raises :class:`ConformanceError` (an ``AssertionError``) naming the check and the
method; success returns a :class:`ConformanceReport`. In a plugin's test suite::

    from eebench.testing import check_exit_strategy

    def test_conformance():
        check_exit_strategy("myexit")              # or check_exit_strategy(MyExit, {"lr": 1e-3})
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from eebench import progress as _progress
from eebench.activations import ActivationCache
from eebench.budget import Budget
from eebench.costs import ExitCosts
from eebench.datasets import DatasetBundle, TensorImageDataset, dataset_labels, seeded_subset_indices, take
from eebench.plugins import Registry, default_registry
from eebench.runner import Runner
from eebench.strategy import ExitStrategy
from eebench.suite import BackboneSpec, DatasetSpec, MethodSpec, PluginRef, Recipe, Suite, check_plugins, expand
from eebench.trace import ExitTrace, compute_traces, output_problem, trace_problem

__all__ = ["CHECKS", "ConformanceError", "ConformanceReport", "TestSplitSentinel", "check_exit_strategy"]

#: Every check, in the order a run reports them.
CHECKS = ("outputs", "exit-names", "costs", "exits-off", "budget", "test-isolation", "determinism")

DEFAULT_BACKBONE = "resnet20"
DEFAULT_BACKBONE_PARAMS = {"width": 0.5}  # a quarter of resnet20's MACs: the kit checks contracts, not accuracy
DEFAULT_RECIPE = {"epochs": 1, "batch_size": 32, "lr": 0.05, "augment": False}
WHERE = "check_exit_strategy"


class ConformanceError(AssertionError):
    """A failed conformance check: ``check`` is one of :data:`CHECKS` (or ``run`` when the
    harness could not run the method at all), ``method`` the method under test."""

    def __init__(self, check: str, method: str, detail: str) -> None:
        self.check, self.method, self.detail = check, method, detail
        super().__init__(f"check '{check}' failed for exit strategy '{method}': {detail}")


@dataclass
class ConformanceReport:
    """What a passing ``check_exit_strategy`` did."""

    method: str
    checks: list[str]  # checks that ran and passed, in order
    skipped: list[str]
    seconds: dict[str, float]  # wall seconds: each run, its fit, the checks, the total
    exits: list[str]
    variants: list[str]
    spend: dict[str, float | int]
    result: dict[str, Any] = field(repr=False)  # the first run's cell result, as the harness writes it

    def __str__(self) -> str:
        timing = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return (f"{self.method}: {len(self.checks)} checks passed ({', '.join(self.checks)})"
                + (f", skipped {', '.join(self.skipped)}" if self.skipped else "") + f"; {timing}")


class TestSplitSentinel(TensorImageDataset):
    """An in-memory test split that records (and refuses) every read while ``phase`` is set.

    Reads are ``__getitem__`` and the ``images`` / ``labels`` tensors, which the fast paths
    (``iterate_batches``, ``take``, ``dataset_labels``) use directly; ``len()`` is no read.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError("images must be [N, C, H, W] with one label per image")
        self._images, self._labels = images, labels.long()
        self.phase: str | None = None  # None: reading is allowed
        self.reads: list[str] = []

    @property
    def images(self) -> torch.Tensor:
        self._touch("its images tensor")
        return self._images

    @property
    def labels(self) -> torch.Tensor:
        self._touch("its labels tensor")
        return self._labels

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self._touch(f"item {index}")
        return self._images[index], int(self._labels[index])

    def _touch(self, what: str) -> None:
        if self.phase is None:
            return
        read = f"{what} was read during {self.phase} (at {_reader()})"
        self.reads.append(read)
        raise AssertionError(f"the test split was read before calibration ended: {read}")


_KIT_FILES = {str(Path(__file__).resolve()), str(Path(__file__).with_name("passes.py").resolve()),
              str(Path(__file__).with_name("datasets.py").resolve())}


def _reader() -> str:
    """The innermost frame outside this kit, the batch iterator and torch: who read the split."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = str(Path(frame.filename).resolve())
        if path in _KIT_FILES or "/torch/" in path.replace("\\", "/"):
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "unknown"


# ------------------------------------------------------------------------------- small data

_SUBSETS: dict[tuple, tuple[Callable, DatasetBundle, torch.Tensor, torch.Tensor]] = {}


def _small_bundle(factory: Callable, name: str, params: dict[str, Any], per_class: int, test_size: int,
                  seed: int) -> tuple[DatasetBundle, torch.Tensor, torch.Tensor]:
    """A seeded per-class training subset and a test subset (as tensors), kept per process."""
    key = (id(factory), name, json.dumps(params, sort_keys=True, default=str), per_class, test_size, seed)
    held = _SUBSETS.get(key)
    if held is None or held[0] is not factory:
        bundle = factory(**params)
        train = take(bundle.train, seeded_subset_indices(dataset_labels(bundle.train), seed=seed, per_class=per_class))
        picked = seeded_subset_indices(dataset_labels(bundle.test), seed=seed, total=test_size)
        if isinstance(bundle.test, TensorImageDataset):
            images, labels = bundle.test.images[picked], bundle.test.labels[picked]
        else:
            items = [bundle.test[int(i)] for i in picked]
            images = torch.stack([torch.as_tensor(x) for x, _ in items])
            labels = torch.tensor([int(y) for _, y in items])
        held = (factory, replace(bundle, train=train, test=None), images.clone(), labels.clone())
        _SUBSETS[key] = held
    return held[1], held[2], held[3]


# ------------------------------------------------------------------------------- the probe

@dataclass
class _Run:
    """What one harness run of the method showed the probe."""

    strategy: ExitStrategy | None = None
    budget: Budget | None = None
    fit_seconds: float = 0.0
    calibration: list[ExitTrace] = field(default_factory=list)  # the raw calibration traces
    views: list[ExitTrace] = field(default_factory=list)  # their calibration_view
    test: list[ExitTrace] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class _Probe:
    """Instruments the method the harness builds and the test split it reads."""

    def __init__(self, name: str, factory: Callable[..., ExitStrategy], skipped: Iterable[str] = ()) -> None:
        self.name, self.factory = name, factory
        self.skipped = set(skipped)
        self.sentinel: TestSplitSentinel | None = None
        self.run: _Run = _Run()

    def fail(self, check: str, detail: str) -> ConformanceError:
        return ConformanceError(check, self.name, detail)

    # -- plugin factories the kit's registry hands to the Runner

    def dataset_factory(self, real: Callable, name: str, per_class: int, test_size: int,
                        seed: int) -> Callable[..., DatasetBundle]:
        @functools.wraps(real, updated=())  # the real signature, for check_plugins
        def factory(**params: Any) -> DatasetBundle:
            bundle, images, labels = _small_bundle(real, name, params, per_class, test_size, seed)
            self.sentinel = TestSplitSentinel(images, labels)
            return replace(bundle, test=self.sentinel)
        return factory

    def strategy_factory(self) -> Callable[..., ExitStrategy]:
        @functools.wraps(self.factory, updated=())  # the real signature, for check_plugins
        def factory(backbone, context, **params):
            self._arm("the method's construction")
            strategy = self.factory(backbone, context, **params)
            if not isinstance(strategy, ExitStrategy):
                raise self.fail("outputs", f"the factory returned {type(strategy).__name__}, not an ExitStrategy")
            self._instrument(strategy)
            self.run.strategy = strategy
            return strategy
        factory.default_calibrator = getattr(self.factory, "default_calibrator", None)  # checked by check_plugins
        return factory

    def _arm(self, phase: str | None) -> None:
        if self.sentinel is not None and "test-isolation" not in self.skipped:
            self.sentinel.phase = phase

    # -- wrappers around the strategy's hooks (instance attributes shadow the methods)

    def _instrument(self, strategy: ExitStrategy) -> None:
        run = self.run
        fit, exit_outputs = strategy.fit, strategy.exit_outputs
        cached_outputs, precomputed_trace = strategy.cached_outputs, strategy.precomputed_trace
        calibration_view = strategy.calibration_view

        def checked_fit(train: Dataset, budget: Budget) -> None:
            run.budget = budget
            self._arm("fit")
            tick = time.perf_counter()
            try:
                fit(train, budget)
            finally:
                run.fit_seconds += time.perf_counter() - tick
            self._arm("the calibration trace")  # until the harness starts the test trace
            self.check_isolation()

        def checked_exit_outputs(x: torch.Tensor):
            out = exit_outputs(x)
            self.check_batch(strategy, out, int(x.shape[0]), "exit_outputs")
            return out

        def checked_cached_outputs(dataset: Dataset):
            batches = cached_outputs(dataset)
            if batches is None:
                return None

            def stream() -> Iterator:
                for out, y in batches:
                    self.check_batch(strategy, out, int(y.shape[0]), "cached_outputs")
                    yield out, y
            return stream()

        def checked_precomputed_trace(dataset: Dataset):
            if dataset is self.sentinel:
                self._arm(None)  # the harness starts the test trace: from here on test may be read
            traces = precomputed_trace(dataset)
            if traces is not None:
                for trace in traces if isinstance(traces, list) else [traces]:
                    self.check_trace(strategy, trace, len(dataset), "precomputed_trace")
            return traces

        def checked_calibration_view(trace: ExitTrace) -> ExitTrace:
            run.calibration.append(trace)
            view = calibration_view(trace)
            self.check_trace(strategy, view, trace.num_samples, "calibration_view")
            run.views.append(view)
            return view

        strategy.fit = checked_fit
        strategy.exit_outputs = checked_exit_outputs
        strategy.cached_outputs = checked_cached_outputs
        strategy.precomputed_trace = checked_precomputed_trace
        strategy.calibration_view = checked_calibration_view

    # -- checks

    def check_batch(self, strategy: ExitStrategy, out: Any, batch: int, where: str) -> None:
        if "outputs" in self.skipped:
            return
        problem = output_problem(out, variants=len(strategy.variant_names()), batch=batch,
                                 num_classes=strategy.context.num_classes)  # the core's own boundary check
        if problem:
            raise self.fail("outputs", f"{where}: {problem}")

    def check_trace(self, strategy: ExitStrategy, trace: Any, samples: int, where: str) -> None:
        if "outputs" in self.skipped:
            return
        problem = trace_problem(trace, samples=samples, num_classes=strategy.context.num_classes)
        if problem:
            raise self.fail("outputs", f"{where}: {problem}")

    def check_isolation(self) -> None:
        if self.sentinel is not None and self.sentinel.reads:
            reads = self.sentinel.reads
            more = f" (and {len(reads) - 1} more reads)" if len(reads) > 1 else ""
            raise self.fail("test-isolation", f"{reads[0]}{more}; the test split may be read only once the "
                                              "calibration trace is done")

    def check_budget(self) -> None:
        if "budget" in self.skipped:
            return
        budget = self.run.budget
        if budget is None:
            raise self.fail("budget", "the harness never called fit")
        detail = budget.overspent()  # the runner fails the cell on it too, after finish()
        if detail:
            raise self.fail("budget", f"after fit, {detail} (spend: {budget.spend.to_dict()})")


# ------------------------------------------------------------------------------- post-run checks

def _check_exit_names(probe: _Probe, run: _Run, costs: ExitCosts) -> None:
    names = run.strategy.exit_names()
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise probe.fail("exit-names", f"exit_names() returned {names!r}; expected a list of strings")
    if len(set(names)) != len(names):
        raise probe.fail("exit-names", f"exit_names() {list(names)} repeats a name")
    in_traces = sorted({t.num_exits for t in run.calibration + run.test})
    if len(names) != costs.num_exits or in_traces != [costs.num_exits]:
        raise probe.fail("exit-names", f"{len(names)} exit names {list(names)}, exit_costs() has {costs.num_exits} "
                                       f"exits and the outputs {in_traces}; expected one number")


def _check_costs(probe: _Probe, costs: ExitCosts) -> None:
    backbone, overhead = costs.backbone_macs.double(), costs.overhead_macs.double()
    if not (bool(torch.isfinite(backbone).all()) and bool(torch.isfinite(overhead).all())
            and math.isfinite(costs.reference_macs)):
        raise probe.fail("costs", f"non-finite MACs: backbone {backbone.tolist()}, overhead {overhead.tolist()}, "
                                  f"reference {costs.reference_macs}")
    if bool((backbone <= 0).any()) or bool((overhead < 0).any()) or costs.reference_macs <= 0:
        raise probe.fail("costs", f"backbone MACs {backbone.tolist()} must be > 0, overheads {overhead.tolist()} "
                                  f">= 0 and the reference {costs.reference_macs} > 0")
    cumulative = costs.cumulative()
    if bool((cumulative.diff() < 0).any()):
        raise probe.fail("costs", f"cumulative cost {cumulative.tolist()} decreases along the exits; leaving later "
                                  "must never cost less")


def _vectors(result: dict[str, Any], variant: int, exits: int) -> torch.Tensor:
    """The calibrated hull's threshold vectors of one variant, from the result JSON."""
    rows, variants = result["curve"]["thresholds"], result["curve"].get("variants") or []
    decoded = [[math.inf if t is None else -math.inf if t == "-inf" else float(t) for t in row]
               for i, row in enumerate(rows) if (variants[i] if variants else 0) == variant]
    return torch.tensor(decoded, dtype=torch.float64).reshape(-1, exits - 1)


def _check_exits_off(probe: _Probe, run: _Run, costs: ExitCosts) -> None:
    strategy, names = run.strategy, run.strategy.exit_names()
    backbone, overhead = costs.backbone_macs.double(), costs.overhead_macs.double()
    paid = overhead.sum() if strategy.chained else overhead[-1]
    expected = float((backbone[-1] + paid) / costs.reference_macs)
    rule = "every exit's overhead (chained)" if strategy.chained else "the last exit's overhead"
    for split, traces in (("calibration", run.calibration), ("test", run.test)):
        for variant, trace in enumerate(traces):
            where = f"{split} trace" + (f" of variant {variant}" if len(traces) > 1 else "")
            if trace.strict != strategy.strict or trace.chained != strategy.chained:
                raise probe.fail("exits-off", f"{where} has strict={trace.strict}, chained={trace.chained}; the "
                                              f"method says strict={strategy.strict}, chained={strategy.chained}")
            exits, n = trace.num_exits, trace.num_samples
            off = trace.evaluate(torch.full((1, exits - 1), math.inf, dtype=torch.float64), costs)
            counts = off.exit_counts[0].tolist()
            if counts[-1] != n:
                raise probe.fail("exits-off", f"{where}: with every exit off (+inf thresholds) {n - counts[-1]} of "
                                              f"{n} samples left early (exit counts {counts})")
            if not math.isclose(float(off.cost[0]), expected, rel_tol=1e-9):
                raise probe.fail("exits-off", f"{where}: every exit off costs {float(off.cost[0]):.6g}; expected "
                                              f"{expected:.6g} = (backbone_macs[-1] + {rule}) / reference_macs")
            last = float(trace.correct[-1].double().mean())
            if not math.isclose(float(off.accuracy[0]), last, abs_tol=1e-12):
                raise probe.fail("exits-off", f"{where}: every exit off gives accuracy {float(off.accuracy[0])}, "
                                              f"not the last exit's {last}")
            if split == "test" and not math.isclose(run.result["no_exit"]["test_cost"], expected, rel_tol=1e-9):
                raise probe.fail("exits-off", f"the result's no-exit test cost {run.result['no_exit']['test_cost']} "
                                              f"is not {expected}")
            for vector in _vectors(run.result, variant, exits):
                for j in range(exits - 1):
                    if vector[j] == math.inf:
                        continue
                    switched = vector.clone()
                    switched[j] = math.inf
                    taken = int(trace.evaluate(switched[None], costs).exit_counts[0, j])
                    if taken:
                        raise probe.fail("exits-off", f"{where}: exit {j} ({names[j]}) switched off (+inf) in the "
                                                      f"calibrated vector {vector.tolist()} still took {taken} samples")


def _same_traces(a: list[ExitTrace], b: list[ExitTrace]) -> str | None:
    if len(a) != len(b):
        return f"{len(a)} traces, then {len(b)}"
    for variant, (x, y) in enumerate(zip(a, b, strict=True)):
        for attr in ("preds", "labels", "scores"):
            u, v = getattr(x, attr), getattr(y, attr)
            if u.shape != v.shape:
                return f"variant {variant}: {attr} {list(u.shape)}, then {list(v.shape)}"
            if not torch.equal(u, v):
                diff = (u != v).sum()
                delta = ""
                if attr == "scores":
                    finite = torch.isfinite(u) & torch.isfinite(v)
                    if bool(finite.any()):
                        delta = f", max |difference| {float((u - v)[finite].abs().max()):.3g}"
                return f"variant {variant}: {int(diff)} of {u.numel()} {attr} differ{delta}"
    return None


_COMPARED = ("exits", "variants", "curve", "accuracy_at", "no_exit", "operating_points", "sizes", "backbone_macs")


def _check_determinism(probe: _Probe, first: _Run, second: _Run) -> None:
    for split in ("calibration", "test"):
        detail = _same_traces(getattr(first, split), getattr(second, split))
        if detail:
            raise probe.fail("determinism", f"two fits with seed {first.result['seed']} gave different {split} "
                                            f"traces: {detail}")
    for key in _COMPARED:
        if json.dumps(first.result.get(key), sort_keys=True) != json.dumps(second.result.get(key), sort_keys=True):
            raise probe.fail("determinism", f"two fits with the same seed gave different results under '{key}'")
    spend = [{k: v for k, v in r.result["spend"].items() if k != "seconds"} for r in (first, second)]
    if spend[0] != spend[1]:
        raise probe.fail("determinism", f"two fits with the same seed spent differently: {spend[0]} vs {spend[1]}")


# ------------------------------------------------------------------------------- the kit

@contextmanager
def _quiet_and_threads(quiet: bool, threads: int | None) -> Iterator[None]:
    """Progress bars off and ``threads`` intra-op threads for the kit's runs; both restored after."""
    before, threads_before = _progress._quiet, torch.get_num_threads()
    _progress.set_quiet(quiet or before)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        _progress.set_quiet(before)
        torch.set_num_threads(threads_before)


def _kit_registry(registry: Registry, extra: dict[tuple[str, str], tuple[Callable, str]]) -> Registry:
    """A copy of ``registry`` with the kit's instrumented factories added (the original is untouched)."""
    kit = copy.copy(registry)
    kit.factories = {k: dict(v) for k, v in registry.factories.items()}
    kit.owners = {k: dict(v) for k, v in registry.owners.items()}
    for (kind, name), (factory, owner) in extra.items():
        kit.factories[kind][name] = factory
        kit.owners[kind][name] = owner
    return kit


def check_exit_strategy(
    method: str | Callable[..., ExitStrategy],
    params: Mapping[str, Any] | None = None,
    *,
    dataset: str = "fashion-mnist",
    dataset_params: Mapping[str, Any] | None = None,
    train_per_class: int = 20,
    test_size: int = 200,
    backbone: str = DEFAULT_BACKBONE,
    backbone_params: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    budget: str = "epochs",
    budget_params: Mapping[str, Any] | None = None,
    calibrator: str | None = None,
    calibrator_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 100,
    train_batch_size: int = 32,
    device: str | torch.device = "cpu",
    registry: Registry | None = None,
    skip: Iterable[str] = (),
    quiet: bool = True,
    threads: int | None = 1,
) -> ConformanceReport:
    """Fit ``method`` twice through the harness on a small subset and check its contract.

    ``method`` is a registered exit-strategy name (looked up in ``registry``, by default the
    installed plugins) or a factory ``factory(backbone, context, **params)`` such as the
    ExitStrategy class itself; ``params`` are its parameters, as a suite's ``methods[].params``.

    The cell: ``train_per_class`` seeded training images per class (also the calibration
    split) and ``test_size`` test images of ``dataset``; the ``backbone`` (by default a
    half-width ResNet-20) trained by ``recipe`` (overrides of one epoch at batch 32;
    ``{"epochs": 0}`` leaves it untrained for methods that train it themselves), cached like any
    base network; the ``budget``
    plugin (one epoch by default); the method's default calibrator unless ``calibrator``.
    ``skip`` names checks not to run (``determinism`` halves the time). ``threads``: torch's
    intra-op threads during the kit (1 by default: on a small batch extra threads buy little
    and, on a busy machine, cost up to 10x; None keeps the current setting).

    Raises :class:`ConformanceError` (an ``AssertionError``) naming the failed check and the
    method; returns a :class:`ConformanceReport` when every check passes. Bad arguments (an
    unknown plugin name, a parameter the method does not take) raise ``EebenchError``.
    """
    start = time.perf_counter()
    skipped = sorted(set(skip), key=lambda c: CHECKS.index(c) if c in CHECKS else -1)
    unknown = [c for c in skipped if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown} in skip; expected among: {', '.join(CHECKS)}")
    registry = registry or default_registry()
    if isinstance(method, str):
        name, factory = method, registry.get("exit_strategies", method, where=WHERE, key="method")
    elif callable(method):
        name, factory = getattr(method, "__name__", type(method).__name__), method
    else:
        raise TypeError(f"method must be a registered name or a factory, got {type(method).__name__}")
    probe = _Probe(name, factory, skipped)
    method_key = name if isinstance(method, str) else f"{name} (under test)"
    # the sizes are in the name: the base network's cache key covers the dataset spec, not its label
    dataset_key = f"{dataset} (conformance subset: {train_per_class} per class, {test_size} test)"
    real_dataset = registry.get("datasets", dataset, where=WHERE, key="dataset")
    kit = _kit_registry(registry, {
        ("exit_strategies", method_key): (probe.strategy_factory(),
                                          registry.owners["exit_strategies"].get(name, "under test")),
        ("datasets", dataset_key): (probe.dataset_factory(real_dataset, dataset, train_per_class, test_size, seed),
                                    registry.owners["datasets"].get(dataset, "?")),
    })
    if backbone_params is None:
        backbone_params = DEFAULT_BACKBONE_PARAMS if backbone == DEFAULT_BACKBONE else {}
    if budget_params is None:
        budget_params = {"epochs": 1} if budget == "epochs" else {}
    suite = Suite(
        name="conformance",
        datasets=[DatasetSpec(name=dataset_key, params=dict(dataset_params or {}))],
        backbones=[BackboneSpec(name=backbone, params=dict(backbone_params),
                                recipe=Recipe(**{**DEFAULT_RECIPE, **(recipe or {})}))],
        methods=[MethodSpec(name=method_key, params=dict(params or {}), label=name,
                            calibrator=PluginRef(name=calibrator, params=dict(calibrator_params or {}))
                            if calibrator else None)],
        budgets=[PluginRef(name=budget, params=dict(budget_params))],
        seeds=[seed], targets=[0.25, 0.5, 0.75], batch_size=batch_size, train_batch_size=train_batch_size,
    )
    check_plugins(suite, kit, WHERE)  # unknown names and parameters fail here, before any work
    cell = expand(suite)[0]
    runner = Runner(suite, kit, suite_path=WHERE, device=torch.device(device))
    seconds: dict[str, float] = {}
    passed: list[str] = []
    with _quiet_and_threads(quiet, threads):
        first = _run(probe, runner, cell, batch_size, device)
        seconds["run"], seconds["fit"] = first.seconds, first.fit_seconds
        tick = time.perf_counter()
        costs = first.strategy.exit_costs()
        post = {
            "outputs": lambda: _check_run_outputs(probe, first),
            "exit-names": lambda: _check_exit_names(probe, first, costs),
            "costs": lambda: _check_costs(probe, costs),
            "exits-off": lambda: _check_exits_off(probe, first, costs),
            "budget": probe.check_budget,
            "test-isolation": probe.check_isolation,
        }
        for check, run_check in post.items():
            if check not in skipped:
                run_check()
                passed.append(check)
        seconds["checks"] = time.perf_counter() - tick
        if "determinism" not in skipped:
            runner.activations = ActivationCache()  # recompute what the first run shared
            second = _run(probe, runner, cell, batch_size, device)
            seconds["rerun"] = second.seconds
            _check_determinism(probe, first, second)
            passed.append("determinism")
    seconds["total"] = time.perf_counter() - start
    return ConformanceReport(
        method=name, checks=passed, skipped=list(skipped), seconds={k: round(v, 3) for k, v in seconds.items()},
        exits=list(first.result["exits"]["names"]), variants=list(first.result["variants"]),
        spend=first.result["spend"], result=first.result,
    )


def _check_run_outputs(probe: _Probe, run: _Run) -> None:
    variants = len(run.strategy.variant_names())
    for split, traces in (("calibration", run.calibration), ("test", run.test)):
        if len(traces) != variants:
            raise probe.fail("outputs", f"{len(traces)} {split} traces for {variants} variants (variant_names())")
    size = run.result["sizes"]
    for trace in run.calibration:
        probe.check_trace(run.strategy, trace, size["calibration"], "calibration trace")
    for trace in run.test:
        probe.check_trace(run.strategy, trace, size["test"], "test trace")


def _run(probe: _Probe, runner: Runner, cell: Any, batch_size: int, device: str | torch.device) -> _Run:
    """One harness run of the cell, then the test trace again for the checks."""
    run = probe.run = _Run()
    tick = time.perf_counter()
    try:
        run.result = runner.run_cell(cell)
    except ConformanceError:
        raise
    except Exception as exc:
        probe.check_isolation()  # a refused test read that the method turned into another error
        if run.budget is not None:
            probe.check_budget()  # the runner fails a cell whose budget is overspent
        detail = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
        raise probe.fail("run", f"the harness run failed: {detail}") from exc
    finally:
        probe._arm(None)
    probe.check_isolation()
    probe.check_budget()
    run.test = compute_traces(run.strategy, probe.sentinel, batch_size=batch_size, device=device,
                              description="conformance test trace")
    run.seconds = time.perf_counter() - tick
    return run
