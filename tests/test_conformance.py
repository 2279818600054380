"""The conformance kit (eebench.testing): every built-in method passes it, and broken methods
fail the check they break, by name."""

from __future__ import annotations

import importlib.util
import inspect
import random
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from eebench.api import (
    ExitCosts,
    ExitState,
    ExitStrategy,
    ExitTrace,
    MethodReport,
    StepOutput,
    exit_costs_at,
    iterate_batches,
    stage_taps,
)
from eebench.datasets import dataset_labels
from eebench.errors import EebenchError
from eebench.plugins import default_registry
from eebench.testing import CHECKS, ConformanceError, ConformanceReport, check_exit_strategy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "eebench-patience"

BUILT_IN = {"e2cm", "sdn", "e2cm+sdn", "bwds", "branchynet", "eenet", "class-exclusion", "dec-e2cm"}

# Small parameters where a method's defaults are slow (as its own tests use them).
DEC_TINY = dict(recipe=dict(preset="quick", pretrain_iterations=10, finetune_iterations=40, batch_size=50,
                            update_interval=20, dec_max_iterations=40, kmeans_n_init=3, head_pretrain_iterations=20,
                            head_finetune_iterations=40))
OPTIONS: dict[str, dict] = {
    "bwds": {"params": {"lambdas": [0.01, 0.1, 1.0]}},
    # unsupervised: DEC trains its own encoder (the `dec` backbone, untrained base) under a samples cap
    "dec-e2cm": {"params": DEC_TINY, "backbone": "dec", "recipe": {"epochs": 0}, "budget": "samples",
                 "budget_params": {"samples": 1_000_000}},
}


def built_in_methods() -> list[str]:
    registry = default_registry()
    return sorted(name for name, owner in registry.owners["exit_strategies"].items() if owner == "eebench")


def test_every_built_in_method_is_discovered() -> None:
    assert BUILT_IN <= set(built_in_methods())


@pytest.mark.parametrize("name", built_in_methods())
def test_built_in_method_passes_the_kit(name: str) -> None:
    report = check_exit_strategy(name, **OPTIONS.get(name, {}))
    assert isinstance(report, ConformanceReport)
    assert report.checks == list(CHECKS) and not report.skipped
    assert report.method == name and len(report.exits) >= 2
    print(f"\n{report}")


# ---------------------------------------------------------------------- a small valid method and broken ones


class ClassMeans(nn.Module):
    """The class means as a buffer: saved with the strategy's state, moved with its modules."""

    def __init__(self, classes: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("means", torch.zeros(classes, channels))


class NearestMean(ExitStrategy):
    """Valid: nearest class mean of pooled features after the first exit point, then the head."""

    def __init__(self, backbone, context) -> None:
        super().__init__(backbone, context)
        self.stage = backbone.exit_points[0]
        channels = context.stage_costs.stage_shapes[self.stage][0]
        self.table = ClassMeans(context.num_classes, channels)

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.table]

    def exit_taps(self) -> list[int]:
        return [self.stage]

    @torch.no_grad()
    def fit(self, train, budget) -> None:
        self.backbone.eval()
        k = self.context.num_classes
        sums, counts = torch.zeros_like(self.table.means), torch.zeros(k)
        for x, y in budget.batches(train, self.context.train_batch_size, device=self.context.device,
                                   seed=self.context.seed):
            [features], _ = stage_taps(self.backbone, x, [self.stage], through=self.stage)
            sums.index_add_(0, y, features.float().mean((2, 3)))
            counts += torch.bincount(y, minlength=k)
        self.table.means.copy_(sums / counts.clamp(min=1)[:, None])

    @torch.no_grad()
    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        if j == 0:
            distances = torch.cdist(features.float().mean((2, 3)), self.table.means)
            near = torch.softmax(-distances, 1).max(1)
        else:
            near = torch.softmax(self.backbone.head(features), 1).max(1)
        return StepOutput(near.indices, near.values)

    def exit_costs(self) -> ExitCosts:
        k, d = self.table.means.shape
        return exit_costs_at(self.context.stage_costs, [self.stage], [d * k + k])


class WrongShape(NearestMean):
    def exit_step(self, j, features, state):
        out = super().exit_step(j, features, state)
        return StepOutput(out.preds[:, None], out.scores[:, None])  # [B, 1]


class NaNScores(NearestMean):
    def exit_step(self, j, features, state):
        out = super().exit_step(j, features, state)
        if j == 0:
            out.scores[::3] = float("nan")
        return out


class Unseeded(NearestMean):
    def fit(self, train, budget):
        super().fit(train, budget)
        self.table.means.add_(random.SystemRandom().random())  # a random state the seed does not control


class NameMismatch(NearestMean):
    def report(self):
        return MethodReport(exit_names=["final"])  # two exits in outputs and costs


class NegativeOverhead(NearestMean):
    def exit_costs(self):
        costs = super().exit_costs()
        return ExitCosts(costs.backbone_macs, torch.tensor([-1.0, 0.0], dtype=torch.float64), costs.reference_macs)


class FirstExitAlways(ExitTrace):
    """A rule that forgets that +inf switches an exit off."""

    def outcome(self, thresholds):
        vectors = torch.as_tensor(thresholds).reshape(-1, self.num_exits - 1).shape[0]
        first = torch.zeros(vectors, self.num_samples, dtype=torch.long)
        return first, self.correct.gather(0, first)


class IgnoresOff(NearestMean):
    def build_traces(self, preds, scores, labels, details):
        return [FirstExitAlways(p, s, labels) for p, s in zip(preds, scores, strict=True)]


class BatchRelative(NearestMean):
    """Scores relative to the rest of the batch: a trace (whole batches) the executor cannot reproduce."""

    def exit_step(self, j, features, state):
        out = super().exit_step(j, features, state)
        return StepOutput(out.preds, out.scores - out.scores.mean())


class ForgetsMeans(NearestMean):
    """Keeps its class means outside the state it saves: a reloaded copy has none."""

    def modules(self):
        return [self.backbone]


class OverrunsClock(NearestMean):
    def fit(self, train, budget):
        super().fit(train, budget)
        time.sleep(0.5)  # work after the budget's clock ran out, outside the core


def harness_test_split():
    """What a leaking method might do: find the cell's test split (here in the runner's frame)."""
    frame = inspect.currentframe()
    while frame is not None:
        splits = frame.f_locals.get("splits") or getattr(frame.f_locals.get("work"), "splits", None)
        if splits is not None and hasattr(splits, "test"):
            return splits.test
        frame = frame.f_back
    raise AssertionError("no test split found")


READS = {
    "tensor": lambda split: split.images.mean(),  # the in-memory fast path
    "batches": lambda split: next(iter(iterate_batches(split, 50))),
    "item": lambda split: split[0],
    "labels": lambda split: dataset_labels(split),
}


def peeking(read: str, swallow: bool = False) -> type[NearestMean]:
    class PeeksInFit(NearestMean):
        def fit(self, train, budget):
            super().fit(train, budget)
            try:
                READS[read](harness_test_split())
            except AssertionError:
                if not swallow:
                    raise
    return PeeksInFit


class PeeksInCalibration(NearestMean):
    def split_traces(self, dataset):
        harness_test_split()[3]
        return None


BROKEN = [
    (WrongShape, {}, "outputs", "exit_step(0): outputs are [100, 1] for 100 rows; expected [B] or [P, B]"),
    (NaNScores, {}, "outputs", "NaN scores"),
    (Unseeded, {}, "determinism", "different calibration traces"),
    (NameMismatch, {}, "report", "1 exit names"),
    (NegativeOverhead, {}, "costs", "overheads"),
    (IgnoresOff, {"skip": ["determinism"]}, "exits-off", "left early"),
    (BatchRelative, {"skip": ["determinism"]}, "executor", "(batch 1, variant 0"),
    (ForgetsMeans, {"skip": ["determinism"]}, "state", "another test trace"),
    (OverrunsClock, {"budget": "seconds", "budget_params": {"seconds": 0.05}, "skip": ["determinism"]}, "budget",
     "overspent"),
    (peeking("tensor"), {}, "test-isolation", "its images tensor was read during fit"),
    (peeking("batches"), {}, "test-isolation", "during fit"),
    (peeking("item", swallow=True), {}, "test-isolation", "item 0 was read during fit"),
    (peeking("labels"), {}, "test-isolation", "its labels tensor was read during fit"),
    (PeeksInCalibration, {}, "test-isolation", "item 3 was read during the calibration trace"),
]


def test_a_valid_factory_passes() -> None:
    report = check_exit_strategy(NearestMean, skip=["determinism"])
    assert report.checks == [c for c in CHECKS if c != "determinism"] and report.skipped == ["determinism"]
    assert report.exits == ["exit0", "exit1"] and report.spend["samples"] == 200
    assert report.result["sizes"] == {"train": 200, "calibration": 200, "test": 200}
    assert "NearestMean: 8 checks passed" in str(report)


@pytest.mark.parametrize(("factory", "options", "check", "message"), BROKEN,
                         ids=[f"{c}-{f.__name__}-{i}" for i, (f, _, c, _) in enumerate(BROKEN)])
def test_a_broken_method_fails_the_check_it_breaks(factory, options, check, message) -> None:
    with pytest.raises(ConformanceError) as failure:
        check_exit_strategy(factory, **options)
    error = failure.value
    assert isinstance(error, AssertionError)
    assert (error.check, error.method) == (check, factory.__name__), str(error)
    assert message in str(error) and f"check '{check}' failed for exit strategy '{factory.__name__}'" in str(error)


def test_a_read_names_where_it_happened() -> None:
    with pytest.raises(ConformanceError, match=r"test_conformance\.py:\d+ in <lambda>"):
        check_exit_strategy(peeking("tensor"), skip=["determinism"])


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(EebenchError, match="unknown exit strategy 'no-such-method'"):
        check_exit_strategy("no-such-method")
    with pytest.raises(ValueError, match="unknown checks"):
        check_exit_strategy(NearestMean, skip=["speed"])
    with pytest.raises(EebenchError, match="unexpected keyword argument 'nope'"):
        check_exit_strategy(NearestMean, {"nope": 1})


# ---------------------------------------------------------------------- the example plugin's own test


def test_the_example_plugins_own_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/eebench-patience/tests runs the kit in one line and checks its executor's exactness; run those
    (fixture-free) tests from its source tree."""
    monkeypatch.syspath_prepend(str(EXAMPLE))  # eebench_patience from source, installed or not
    paths = sorted((EXAMPLE / "tests").glob("test_*.py"))
    assert [p.name for p in paths] == ["test_patience_conformance.py", "test_patience_exactness.py"]
    for path in paths:
        spec = importlib.util.spec_from_file_location(f"eebench_patience_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        tests = [getattr(module, n) for n in dir(module) if n.startswith("test_")]
        assert tests, path.name
        for test in tests:
            test()
