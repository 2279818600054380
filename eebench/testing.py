"""A conformance kit for exit-strategy authors, in the spirit of scikit-learn's ``check_estimator``.

``check_exit_strategy(name_or_factory, params)`` runs the method through the harness's own
cell flow (``eebench.runner.Runner.run_cell``: the real dataset, backbone, budget and
calibrator plugins) on a small seeded Fashion-MNIST subset, twice, and checks what the
harness relies on:

``outputs``
    every ``exit_step`` output: preds and scores [B] for the rows asked (or [P, B] with
    P == len(report().variants)), integer class ids in [0, K), floating scores that may be
    +-inf but never NaN, a ``detail`` (if any) with one row per row asked; every trace
    (``split_traces``, ``build_traces``, ``calibration_view``, the harness's): one per variant,
    valid as ``eebench.trace.trace_problem`` says;
``report``
    ``report()`` is a ``MethodReport``: exit names unique, ``len(exit_names) ==
    exit_costs().num_exits ==`` the exits in the outputs, ``variants`` the P of the outputs,
    operating points of E-1 thresholds naming a variant there is;
``costs``
    every MAC count finite, backbone MACs > 0, overheads >= 0, reference > 0, cumulative
    cost non-decreasing along the exits;
``exits-off``
    +inf switches an exit off: the all-+inf vector sends every sample to the last exit at
    ``backbone_macs[-1]`` plus the last overhead (every overhead for a ``chained`` method),
    normalised; an exit set to +inf in any calibrated vector takes no sample; the traces'
    ``strict`` / ``chained`` flags are the method's;
``executor``
    the real early-exit network (``eebench.stepping.run_early_exit`` batched with compaction and
    with masking, and ``run_one``, batch 1, on the first samples) sends every test sample to the exit
    the test trace says (``ExitTrace.outcome``), right or wrong as the trace says, with the
    trace's prediction (its exit's, or the trace's ``predictions(thresholds)`` where it has one; a
    trace with its own ``outcome`` rule and no ``predictions`` is compared by correctness only),
    for several threshold vectors per variant (per-exit score quantiles, one with the first exit
    off, every exit off, calibrated hull vectors) and one matrix mixing two vectors (and
    variants) by row;
``state``
    a freshly built strategy (same factory, params and context, another global seed) given
    ``load_state_dict`` of ``state_dict()`` (saved and loaded back as ``eebench bench`` does,
    ``torch.load(weights_only=True)``) reproduces the test trace exactly;
``budget``
    after ``fit`` the budget is not overspent (``Budget.overspent()``);
``test-isolation``
    the test split is a sentinel dataset that records every read (``__getitem__``, and the
    ``images`` / ``labels`` tensors the fast paths use): nothing may read it from the
    method's construction until its calibration traces are done (their ``calibration_view``
    included), when the harness starts the test trace;
``determinism``
    a second run with the same seed (and a fresh activation cache, so shared passes are
    recomputed) gives identical traces, costs, spend and results.

Each failure raises :class:`ConformanceError` (an ``AssertionError``) naming the check and the
method; success returns a :class:`ConformanceReport`. In a plugin's test suite::

    from eebench.testing import check_exit_strategy

    def test_conformance():
        check_exit_strategy("myexit")              # or check_exit_strategy(MyExit, {"lr": 1e-3})

The executor and state checks are also public helpers, for a plugin's own exactness tests on
strategies and data of its choosing: :func:`threshold_vectors` (per-exit score quantiles),
:func:`executor_outcome` (one mode of the executor), :func:`assert_executor_matches` (every
mode, vector and variant against the traces), :func:`assert_same_traces` and
:func:`assert_state_reloads` (``state_dict()`` through ``torch.save`` into a fresh strategy)::

    traces = compute_traces(strategy, test, batch_size=100, device="cpu")
    assert_executor_matches(strategy, traces, test.images)
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from eebench.stepping import ExitPlan, run_early_exit, run_one, step_problem
from eebench.strategy import ExitStrategy, MethodReport, StepOutput
from eebench.suite import BackboneSpec, DatasetSpec, MethodSpec, PluginRef, Recipe, Suite, check_plugins, expand
from eebench.trace import ExitTrace, compute_traces, trace_problem

__all__ = [
    "CHECKS",
    "MODES",
    "ConformanceError",
    "ConformanceReport",
    "TestSplitSentinel",
    "assert_executor_matches",
    "assert_same_traces",
    "assert_state_reloads",
    "check_exit_strategy",
    "executor_outcome",
    "same_traces_problem",
    "saved_state",
    "threshold_vectors",
]

#: Every check, in the order a run reports them.
CHECKS = ("outputs", "report", "costs", "exits-off", "executor", "state", "budget", "test-isolation",
          "determinism")

DEFAULT_BACKBONE = "resnet20"
DEFAULT_BACKBONE_PARAMS = {"width": 0.5}  # a quarter of resnet20's MACs: the kit checks contracts, not accuracy
DEFAULT_RECIPE = {"epochs": 1, "batch_size": 32, "lr": 0.05, "augment": False}
WHERE = "check_exit_strategy"
QUANTILES = (0.3, 0.6, 0.9)  # the executor check's per-exit score quantiles
BATCH1_SAMPLES = 8  # test samples the executor check also runs one at a time


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


# ------------------------------------------------------------------------------- exactness helpers

#: The executor's modes: batches with compaction and with masking (``run_early_exit``), and batch 1 (``run_one``).
MODES = ("compact", "masked", "batch1")
_MODE_NAMES = {"compact": "compact", "masked": "masked", "batch1": "batch 1"}

Vectors = Sequence[torch.Tensor] | Callable[[int, ExitTrace], Sequence[torch.Tensor]]


def threshold_vectors(trace: ExitTrace, quantiles: Sequence[float] = (0.3, 0.6, 0.9)) -> list[torch.Tensor]:
    """Threshold vectors ([E-1] float64 each) that make ``trace``'s samples leave at several exits.

    One vector per quantile: at each early exit, the midpoint between the two adjacent distinct
    finite scores at that quantile (so no score sits on a threshold; one finite score gives that
    score, none gives +inf); then the middle quantile's vector with the first exit off (+inf).
    """
    vectors = []
    for q in quantiles:
        row = []
        for scores in trace.scores[:-1]:
            values = torch.unique(scores[torch.isfinite(scores)])  # sorted, distinct
            if len(values) < 2:
                row.append(float(values[0]) if len(values) else math.inf)
                continue
            k = min(int(q * (len(values) - 1)), len(values) - 2)
            row.append(float((values[k] + values[k + 1]) / 2))
        vectors.append(torch.tensor(row, dtype=torch.float64))
    if vectors and trace.num_exits > 1:
        off = vectors[len(vectors) // 2].clone()
        off[0] = math.inf
        vectors.append(off)
    return vectors


def executor_outcome(strategy: ExitStrategy, images: torch.Tensor, thresholds: torch.Tensor,
                     variant: torch.Tensor | None, mode: str, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The real early-exit network on ``images``: ([N] exit index, [N] prediction), on the CPU.

    ``thresholds`` [N, E-1] and ``variant`` [N] (None: the only variant) are per row. ``mode``:
    ``"compact"`` or ``"masked"`` runs ``eebench.stepping.run_early_exit`` on batches of
    ``batch_size`` with compaction or masking; ``"batch1"`` runs ``eebench.stepping.run_one``
    (the batch-1 fast path ``eebench.inference`` serves and ``eebench bench`` times) one sample at a
    time. The strategy's train/eval mode is the caller's (exactness needs ``strategy.eval()``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown executor mode {mode!r}; expected one of {', '.join(MODES)}")
    plan = ExitPlan(strategy)
    rows = int(images.shape[0])
    if mode == "batch1":
        limits = thresholds.double().tolist()
        outcomes = [run_one(plan, images[i : i + 1].to(device), limits[i],
                            None if variant is None else variant[i : i + 1].to(device)) for i in range(rows)]
        return (torch.tensor([e for e, _ in outcomes], dtype=torch.long).reshape(rows),
                torch.tensor([p for _, p in outcomes], dtype=torch.long).reshape(rows))
    exits, preds = [], []
    for start in range(0, rows, batch_size):
        part = slice(start, start + batch_size)
        e, p = run_early_exit(plan, images[part].to(device), thresholds[part],
                              None if variant is None else variant[part].to(device), compact=mode == "compact")
        exits.append(e.cpu())
        preds.append(p.cpu())
    return torch.cat(exits), torch.cat(preds)


def _show(vector: torch.Tensor) -> str:
    return "[" + ", ".join("off" if t == math.inf else f"{float(t):.4g}" for t in vector) + "]"


def _executor_cases(traces: Sequence[ExitTrace], rows: int, vectors: Vectors | None,
                    mix: tuple[int, int]) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(label, [N, E-1] thresholds, [N] variant or None) of every vector of every variant, then the
    rows alternating between vector ``mix[0]`` of the first variant and ``mix[1]`` of the last."""
    several = len(traces) > 1

    def of(v: int) -> list[torch.Tensor]:
        if vectors is None:
            return threshold_vectors(traces[v])
        picked = vectors(v, traces[v]) if callable(vectors) else vectors
        return [torch.as_tensor(t, dtype=torch.float64) for t in picked]

    def variant_of(v: int) -> torch.Tensor | None:
        return torch.full((rows,), v, dtype=torch.long) if several else None

    cases = []
    for v in range(len(traces)):
        cases += [(f"variant {v}, thresholds {_show(t)}", t.expand(rows, -1), variant_of(v)) for t in of(v)]
    first, last = of(0), of(len(traces) - 1)
    if first and last:
        low, high = first[min(mix[0], len(first) - 1)], last[min(mix[1], len(last) - 1)]
        odd = torch.arange(rows) % 2 == 1
        cases.append((f"rows alternating variant 0 at {_show(low)} and variant {len(traces) - 1} at {_show(high)}",
                      torch.where(odd[:, None], high[None], low[None]),
                      odd.long() * (len(traces) - 1) if several else None))
    return cases


def _expected(traces: Sequence[ExitTrace], thresholds: torch.Tensor,
              variant: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """[N] exit index, prediction (None where a trace cannot say) and correctness the traces give
    each row under its own thresholds and variant."""
    exits = torch.empty(thresholds.shape[0], dtype=torch.long)
    preds: torch.Tensor | None = torch.empty_like(exits)
    correct = torch.empty_like(exits, dtype=torch.bool)
    variant = torch.zeros_like(exits) if variant is None else variant
    for (v, values), rows in _groups(thresholds, variant).items():
        trace, vector = traces[v], torch.tensor([values], dtype=torch.float64)
        first, right = trace.outcome(vector)
        exits[rows], correct[rows] = first[0, rows], right[0, rows]
        if type(trace).outcome is not ExitTrace.outcome and type(trace).predictions is ExitTrace.predictions:
            preds = None  # its own rule, and no word on the class it answers: compared by correctness only
        elif preds is not None:
            preds[rows] = trace.predictions(vector)[0, rows]
    return exits, preds, correct


def _groups(thresholds: torch.Tensor, variant: torch.Tensor) -> dict[tuple[int, tuple[float, ...]], torch.Tensor]:
    """Rows grouped by (variant, threshold vector)."""
    keys = [(int(v), tuple(row.tolist())) for v, row in zip(variant, thresholds, strict=True)]
    return {key: torch.tensor([i for i, k in enumerate(keys) if k == key]) for key in dict.fromkeys(keys)}


def _executor_problem(strategy: ExitStrategy, traces: Sequence[ExitTrace], images: torch.Tensor,
                      vectors: Vectors | None, mix: tuple[int, int], batch_size: int, batch1_samples: int,
                      device: str | torch.device,
                      against: str) -> tuple[str | None, Exception | None, int]:
    """The first disagreement of the executor with ``traces`` (or None), the exception the executor
    raised (or None), and how many (case, row) pairs the traces send out before the final exit."""
    rows = int(images.shape[0])
    labels = traces[0].labels
    strategy.eval()
    early = 0
    for what, thresholds, variant in _executor_cases(traces, rows, vectors, mix):
        want_exits, want_preds, want_correct = _expected(traces, thresholds, variant)
        early += int((want_exits < traces[0].num_exits - 1).sum())
        for mode in MODES:
            n = min(batch1_samples, rows) if mode == "batch1" else rows
            runner = "run_one" if mode == "batch1" else "run_early_exit"
            where = f"{runner} ({_MODE_NAMES[mode]}, {what})"
            try:
                exits, preds = executor_outcome(strategy, images[:n], thresholds[:n],
                                                None if variant is None else variant[:n], mode, batch_size, device)
            except ConformanceError:
                raise
            except Exception as exc:
                return f"{where} raised {type(exc).__name__}: {exc}", exc, early
            wrong = (exits != want_exits[:n]) | ((preds == labels[:n]) != want_correct[:n])
            if want_preds is not None:
                wrong |= preds != want_preds[:n]
            if bool(wrong.any()):
                i = int(wrong.nonzero()[0, 0])
                trace_class = "" if want_preds is None else f", class {int(want_preds[i])}"
                return (f"{where} disagrees with {against} on {int(wrong.sum())} of {n} samples (sample {i}: exit "
                        f"{int(exits[i])}, class {int(preds[i])}, label {int(labels[i])}; the trace: exit "
                        f"{int(want_exits[i])}{trace_class}, {'right' if want_correct[i] else 'wrong'})"), None, early
    return None, None, early


def assert_executor_matches(strategy: ExitStrategy, traces: Sequence[ExitTrace], images: torch.Tensor,
                            vectors: Vectors | None = None, batch_size: int = 64, batch1_samples: int = 20, *,
                            mix: tuple[int, int] = (0, 2), device: str | torch.device = "cpu") -> None:
    """Assert that the real early-exit network takes exactly the decisions ``traces`` describe.

    ``traces`` are ``strategy``'s traces (one per rule variant, e.g. ``compute_traces(strategy,
    split, ...)``) and ``images`` their samples' images, in order (or the first of them). For every
    variant and every threshold vector (``vectors``: a list shared by every variant, or
    ``vectors(variant, trace)``; by default :func:`threshold_vectors` of that variant's trace),
    and for one matrix whose rows alternate between vector ``mix[0]`` of the first variant and
    vector ``mix[1]`` of the last (an index past the end takes the last vector), every mode of
    :func:`executor_outcome` (``compact`` and ``masked`` in batches of ``batch_size``, ``batch1``
    on the first ``batch1_samples`` images) must leave each row at the trace's exit
    (``ExitTrace.outcome``) with the trace's prediction (``ExitTrace.predictions``; a trace with
    its own ``outcome`` and no ``predictions`` is held to its correctness). Some row must leave
    before the final exit under some vector, or the check would be vacuous.

    Puts ``strategy`` in eval mode. Raises ``AssertionError`` naming the variant, the vector and
    the mode of the first disagreement (or the exception the executor raised).
    """
    problem, raised, early = _executor_problem(strategy, traces, images, vectors, mix, batch_size, batch1_samples,
                                               device, "the trace")
    if problem:
        raise AssertionError(problem) from raised
    if not early:
        raise AssertionError("no row leaves before the final exit under any threshold vector: the check is vacuous")


def same_traces_problem(a: Sequence[ExitTrace], b: Sequence[ExitTrace]) -> str | None:
    """What differs between two lists of traces (per variant: preds, labels, scores, exactly), or None."""
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


def assert_same_traces(a: Sequence[ExitTrace], b: Sequence[ExitTrace]) -> None:
    """Assert that two lists of traces (one per variant) have exactly the same preds, labels and scores."""
    problem = same_traces_problem(a, b)
    if problem:
        raise AssertionError(f"the traces differ: {problem}")


def saved_state(strategy: ExitStrategy) -> dict[str, Any]:
    """``strategy.state_dict()`` after a round trip through ``torch.save`` and
    ``torch.load(weights_only=True, map_location="cpu")``, as ``eebench bench`` stores and loads it."""
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def assert_state_reloads(strategy: ExitStrategy, fresh: ExitStrategy, dataset: Dataset, *, batch_size: int = 100,
                         device: str | torch.device = "cpu") -> None:
    """Assert that ``fresh`` (a newly built strategy: same params and context), loaded with
    ``strategy``'s :func:`saved_state`, gives the very same traces of ``dataset`` as ``strategy``."""
    fresh.load_state_dict(saved_state(strategy))
    ours = compute_traces(strategy, dataset, batch_size=batch_size, device=device)
    theirs = compute_traces(fresh, dataset, batch_size=batch_size, device=device)
    assert_same_traces(ours, theirs)


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
    rebuild: Callable[[], ExitStrategy] | None = None  # a fresh strategy: same factory, params, context
    variants: int | None = None  # len(report().variants), known once fit is done
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
            base = copy.deepcopy(backbone)  # as handed over, before the method changes it
            strategy = self.factory(backbone, context, **params)
            if not isinstance(strategy, ExitStrategy):
                raise self.fail("outputs", f"the factory returned {type(strategy).__name__}, not an ExitStrategy")
            self._instrument(strategy)
            self.run.strategy = strategy
            self.run.rebuild = lambda: self.factory(copy.deepcopy(base), context, **params)
            return strategy
        factory.default_calibrator = getattr(self.factory, "default_calibrator", None)  # checked by check_plugins
        return factory

    def _arm(self, phase: str | None) -> None:
        if self.sentinel is not None and "test-isolation" not in self.skipped:
            self.sentinel.phase = phase

    # -- wrappers around the strategy's hooks (instance attributes shadow the methods)

    def _instrument(self, strategy: ExitStrategy) -> None:
        run = self.run
        fit, exit_step, calibration_view = strategy.fit, strategy.exit_step, strategy.calibration_view
        split_traces, build_traces = strategy.split_traces, strategy.build_traces

        def checked_fit(train: Dataset, budget: Budget) -> None:
            run.budget = budget
            self._arm("fit")
            tick = time.perf_counter()
            try:
                fit(train, budget)
            finally:
                run.fit_seconds += time.perf_counter() - tick
            self._arm("the calibration trace")  # until the calibration views are done
            self.check_isolation()
            run.variants = len(self.report(strategy).variants)

        def checked_exit_step(j: int, features: torch.Tensor, state: dict) -> StepOutput:
            out = exit_step(j, features, state)
            self.check_step(strategy, j, out, int(features.shape[0]))
            return out

        def checked_split_traces(dataset: Dataset):
            traces = split_traces(dataset)
            if traces is not None:
                self.check_traces(strategy, traces, len(dataset), "split_traces")
            return traces

        def checked_build_traces(preds, scores, labels, details):
            traces = build_traces(preds, scores, labels, details)
            self.check_traces(strategy, traces, int(labels.shape[0]), "build_traces")
            return traces

        def checked_calibration_view(trace: ExitTrace) -> ExitTrace:
            self._arm("the calibration trace")
            run.calibration.append(trace)
            view = calibration_view(trace)
            self.check_trace(strategy, view, trace.num_samples, "calibration_view")
            run.views.append(view)
            self._arm(None)  # the calibration trace is done: the harness's test trace comes next
            return view

        strategy.fit = checked_fit
        strategy.exit_step = checked_exit_step
        strategy.split_traces = checked_split_traces
        strategy.build_traces = checked_build_traces
        strategy.calibration_view = checked_calibration_view

    # -- checks

    def report(self, strategy: ExitStrategy) -> MethodReport:
        """``strategy.report()``, refused (check ``report``) unless it is a MethodReport."""
        report = strategy.report()
        if not isinstance(report, MethodReport):
            raise self.fail("report", f"report() returned {type(report).__name__}; expected a MethodReport")
        return report

    def check_step(self, strategy: ExitStrategy, j: int, out: Any, rows: int) -> None:
        if "outputs" in self.skipped:
            return
        problem = step_problem(out, rows, self.run.variants, strategy.context.num_classes)
        if problem:
            raise self.fail("outputs", f"exit_step({j}): {problem}")

    def check_traces(self, strategy: ExitStrategy, traces: Any, samples: int, where: str) -> None:
        if "outputs" in self.skipped:
            return
        variants = self.run.variants
        if not isinstance(traces, list) or (variants is not None and len(traces) != variants):
            count = f"{len(traces)} traces" if isinstance(traces, list) else type(traces).__name__
            raise self.fail("outputs", f"{where} returned {count}; expected a list of one trace per variant "
                                       f"({variants}, report().variants)")
        for trace in traces:
            self.check_trace(strategy, trace, samples, where)

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

def _check_report(probe: _Probe, run: _Run, costs: ExitCosts) -> None:
    report = probe.report(run.strategy)
    names, variants = report.exit_names, report.variants
    for field_name, values in (("exit_names", names), ("variants", variants)):
        if not isinstance(values, list | tuple) or not all(isinstance(n, str) for n in values):
            raise probe.fail("report", f"report().{field_name} is {values!r}; expected a list of strings")
        if len(set(values)) != len(values):
            raise probe.fail("report", f"report().{field_name} {list(values)} repeats a name")
    in_traces = sorted({t.num_exits for t in run.calibration + run.test})
    if len(names) != costs.num_exits or in_traces != [costs.num_exits]:
        raise probe.fail("report", f"{len(names)} exit names {list(names)}, exit_costs() has {costs.num_exits} "
                                   f"exits and the outputs {in_traces}; expected one number")
    if not variants or len(run.test) != len(variants):
        raise probe.fail("report", f"report().variants {list(variants)} but the outputs carry {len(run.test)} "
                                   "variants; expected one name per variant")
    for point in report.operating_points:
        thresholds = torch.as_tensor(point.thresholds)
        if list(thresholds.shape) != [costs.num_exits - 1] or not 0 <= point.variant < len(variants):
            raise probe.fail("report", f"operating point {point.name!r} has thresholds {list(thresholds.shape)} "
                                       f"and variant {point.variant}; expected [{costs.num_exits - 1}] thresholds "
                                       f"and a variant in [0, {len(variants)})")


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
    strategy, names = run.strategy, probe.report(run.strategy).exit_names
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


def _executor_vectors(result: dict[str, Any], trace: ExitTrace, variant: int) -> list[torch.Tensor]:
    """The threshold vectors the executor check runs: score quantiles, the first exit off, every exit off,
    and the first, middle and last calibrated hull vectors of the variant."""
    exits = trace.num_exits
    hull = _vectors(result, variant, exits)
    picked = sorted({0, len(hull) // 2, len(hull) - 1}) if len(hull) else []
    return [*threshold_vectors(trace, QUANTILES), torch.full((exits - 1,), math.inf, dtype=torch.float64),
            *(hull[i] for i in picked)]


def _check_executor(probe: _Probe, run: _Run, batch_size: int, device: str | torch.device) -> None:
    problem, raised, _ = _executor_problem(run.strategy, run.test, probe.sentinel._images,
                                           lambda v, trace: _executor_vectors(run.result, trace, v), (0, 2),
                                           batch_size, BATCH1_SAMPLES, device, "the test trace")
    if problem:
        raise probe.fail("executor", problem) from raised


def _check_state(probe: _Probe, run: _Run, batch_size: int, device: str | torch.device) -> None:
    try:
        state = saved_state(run.strategy)
    except Exception as exc:
        raise probe.fail("state", f"state_dict() does not survive torch.save and torch.load(weights_only=True), "
                                  f"as eebench bench stores it: {type(exc).__name__}: {exc}") from exc
    seed = int(run.result["seed"])
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)  # nothing drawn at construction survives unless state_dict() holds it
            fresh = run.rebuild()
        for module in fresh.modules():
            module.to(device)
        fresh.load_state_dict(state)
        fresh.eval()
        traces = compute_traces(fresh, probe.sentinel, batch_size=batch_size, device=device,
                                description="conformance state trace")
    except Exception as exc:
        raise probe.fail("state", f"a fresh strategy (same params and context) loaded with state_dict() could not "
                                  f"run the test trace: {type(exc).__name__}: {exc}") from exc
    detail = same_traces_problem(run.test, traces)
    if detail:
        raise probe.fail("state", f"a fresh strategy (same params and context) loaded with state_dict() gives "
                                  f"another test trace: {detail}; keep what inference needs in modules() (as "
                                  "buffers) or override state_dict/load_state_dict")


_COMPARED = ("exits", "variants", "curve", "accuracy_at", "no_exit", "operating_points", "sizes", "backbone_macs")


def _check_determinism(probe: _Probe, first: _Run, second: _Run) -> None:
    for split in ("calibration", "test"):
        detail = same_traces_problem(getattr(first, split), getattr(second, split))
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
            "report": lambda: _check_report(probe, first, costs),
            "costs": lambda: _check_costs(probe, costs),
            "exits-off": lambda: _check_exits_off(probe, first, costs),
            "executor": lambda: _check_executor(probe, first, batch_size, device),
            "state": lambda: _check_state(probe, first, batch_size, device),
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
    variants = len(probe.report(run.strategy).variants)
    for split, traces in (("calibration", run.calibration), ("test", run.test)):
        if len(traces) != variants:
            raise probe.fail("outputs", f"{len(traces)} {split} traces for {variants} variants (report().variants)")
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
