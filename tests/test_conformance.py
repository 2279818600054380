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

from eebench.api import ExitCosts, ExitOutputs, ExitStrategy, ExitTrace, iterate_batches
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


class NearestMean(ExitStrategy):
    """Valid: nearest class mean of pooled features after the first exit point, then the head."""

    def __init__(self, backbone, context) -> None:
        super().__init__(backbone, context)
        self.stage = backbone.exit_points[0]
        channels = context.stage_costs.stage_shapes[self.stage][0]
        self.means = torch.zeros(context.num_classes, channels)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        for index, out in self.backbone.iter_stages(x):
            if index == self.stage:
                return out.float().mean((2, 3))
        raise AssertionError("unreachable")

    @torch.no_grad()
    def fit(self, train, budget) -> None:
        self.backbone.eval()
        k = self.context.num_classes
        sums, counts = torch.zeros_like(self.means), torch.zeros(k)
        for x, y in budget.batches(train, self.context.train_batch_size, device=self.context.device,
                                   seed=self.context.seed):
            sums.index_add_(0, y, self._pooled(x))
            counts += torch.bincount(y, minlength=k)
        self.means = sums / counts.clamp(min=1)[:, None]

    @torch.no_grad()
    def exit_outputs(self, x: torch.Tensor) -> ExitOutputs:
        outputs, logits = self.backbone.stage_outputs(x)
        near = torch.softmax(-torch.cdist(outputs[self.stage].float().mean((2, 3)), self.means), 1).max(1)
        final = torch.softmax(logits, 1).max(1)
        return ExitOutputs(torch.stack([near.indices, final.indices]), torch.stack([near.values, final.values]))

    def exit_costs(self) -> ExitCosts:
        costs = self.context.stage_costs
        k, d = self.means.shape
        return ExitCosts(torch.tensor([costs.through(self.stage), costs.total], dtype=torch.float64),
                         torch.tensor([d * k + k, 0.0], dtype=torch.float64), costs.total)


class WrongShape(NearestMean):
    def exit_outputs(self, x):
        out = super().exit_outputs(x)
        return ExitOutputs(out.preds.T, out.scores.T)  # [B, E]


class NaNScores(NearestMean):
    def exit_outputs(self, x):
        out = super().exit_outputs(x)
        out.scores[0, ::3] = float("nan")
        return out


class Unseeded(NearestMean):
    def fit(self, train, budget):
        super().fit(train, budget)
        self.shift = random.SystemRandom().random()  # a random state the seed does not control

    def exit_outputs(self, x):
        out = super().exit_outputs(x)
        return ExitOutputs(out.preds, out.scores + self.shift)


class NameMismatch(NearestMean):
    def exit_names(self):
        return ["final"]  # two exits in outputs and costs


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
    def precomputed_trace(self, dataset):
        self.eval()
        preds, scores, labels = [], [], []
        for x, y in iterate_batches(dataset, 100):
            out = self.exit_outputs(x)
            preds.append(out.preds)
            scores.append(out.scores)
            labels.append(y)
        return FirstExitAlways(torch.cat(preds, 1), torch.cat(scores, 1), torch.cat(labels))


class OverrunsClock(NearestMean):
    def fit(self, train, budget):
        super().fit(train, budget)
        time.sleep(0.5)  # work after the budget's clock ran out, outside the core


def harness_test_split():
    """What a leaking method might do: find the cell's test split (here in the runner's frame)."""
    frame = inspect.currentframe()
    while frame is not None:
        splits = frame.f_locals.get("splits")
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
    def cached_outputs(self, dataset):
        harness_test_split()[3]
        return None


BROKEN = [
    (WrongShape, {}, "outputs", "expected the batch as the last dimension"),
    (NaNScores, {}, "outputs", "NaN scores"),
    (Unseeded, {}, "determinism", "different calibration traces"),
    (NameMismatch, {}, "exit-names", "1 exit names"),
    (NegativeOverhead, {}, "costs", "overheads"),
    (IgnoresOff, {"skip": ["determinism"]}, "exits-off", "left early"),
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
    assert "NearestMean: 6 checks passed" in str(report)


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


def test_the_example_plugins_own_conformance_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/eebench-patience/tests runs the kit in one line; run that test from its source tree."""
    monkeypatch.syspath_prepend(str(EXAMPLE))  # eebench_patience from source, installed or not
    path = EXAMPLE / "tests" / "test_patience_conformance.py"
    spec = importlib.util.spec_from_file_location("eebench_patience_conformance_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, n) for n in dir(module) if n.startswith("test_")]
    assert tests
    for test in tests:
        test()
