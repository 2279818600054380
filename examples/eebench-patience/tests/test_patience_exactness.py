"""The early-exit network eebench runs (``eebench.stepping.run_early_exit``) is the one the trace
describes: the patience counters travel in the executor's per-sample ``state``, so every mode
(compacted batches, masked batches, one sample at a time) sends each sample to the exit the test
trace says, with its prediction, under any threshold vector.

Fixture-free (eebench's own test suite runs this file's tests as plain functions)."""

from __future__ import annotations

import functools
import math

import torch
from eebench_patience import PatienceExit

from eebench.api import MethodContext, StageCosts, take
from eebench.basenet import train_backbone
from eebench.datasets import dataset_labels, seeded_subset_indices
from eebench.plugins import default_registry
from eebench.stepping import run_early_exit
from eebench.suite import Recipe
from eebench.trace import ExitTrace, compute_traces


@functools.cache
def fitted() -> tuple[PatienceExit, object]:
    """Patience ICs fitted on 20 Fashion-MNIST images per class, on a ResNet-20 trained for one epoch on
    them, and 200 test images."""
    registry = default_registry()
    bundle = registry.get("datasets", "fashion-mnist")()
    train = take(bundle.train, seeded_subset_indices(dataset_labels(bundle.train), seed=0, per_class=20))
    test = take(bundle.test, seeded_subset_indices(dataset_labels(bundle.test), seed=0, total=200))
    torch.manual_seed(0)
    model = registry.get("backbones", "resnet20")(bundle.num_classes, bundle.input_shape)
    train_backbone(model, train, Recipe(epochs=1, batch_size=32, lr=0.05), augment=None, seed=0,
                   device=torch.device("cpu"))
    model.eval()
    costs = StageCosts.measure(model, bundle.input_shape)
    context = MethodContext(bundle.num_classes, bundle.input_shape, costs, torch.device("cpu"), seed=0,
                            train_batch_size=32)
    strategy = PatienceExit(model, context)
    budget = registry.get("budgets", "samples")(samples=400)
    budget.bind(len(train))
    strategy.fit(train, budget)
    strategy.eval()
    return strategy, test


def quantile_vectors(trace: ExitTrace) -> list[torch.Tensor]:
    """Per-exit thresholds at the 0.3 / 0.6 / 0.9 quantiles of each exit's distinct counters (midpoints
    between adjacent ones), and the 0.6 vector with its first exit off."""
    vectors = []
    for q in (0.3, 0.6, 0.9):
        row = []
        for scores in trace.scores[:-1]:
            values = torch.unique(scores)  # sorted
            k = min(int(q * (len(values) - 1)), len(values) - 2)
            row.append(float((values[k] + values[k + 1]) / 2) if len(values) > 1 else math.inf)
        vectors.append(torch.tensor(row, dtype=torch.float64))
    off = vectors[1].clone()
    off[0] = math.inf
    return [*vectors, off]


def executor_runs(strategy: PatienceExit, images: torch.Tensor,
                  thresholds: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``run_early_exit`` in batches of 64 compacted and masked, and one sample at a time on the first 20."""
    runs = {}
    for mode, size, count in (("compact", 64, len(images)), ("masked", 64, len(images)), ("batch 1", 1, 20)):
        parts = [run_early_exit(strategy, images[i:i + size], thresholds[i:i + size], compact=mode != "masked")
                 for i in range(0, count, size)]
        runs[mode] = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return runs


def trace_decisions(trace: ExitTrace, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] exit index and prediction the trace gives each row under its own threshold vector."""
    first = torch.empty(thresholds.shape[0], dtype=torch.long)
    for vector in torch.unique(thresholds, dim=0):
        rows = (thresholds == vector).all(1)
        first[rows] = trace.first_exit(vector[None])[0][rows]
    return first, trace.preds.gather(0, first[None])[0]


def test_the_executor_gives_the_traces_exits_and_predictions() -> None:
    strategy, test = fitted()
    [trace] = compute_traces(strategy, test, batch_size=100, device="cpu")
    n = trace.num_samples
    vectors = quantile_vectors(trace)
    odd = (torch.arange(n) % 2 == 1)[:, None]
    cases = [(vector.tolist(), vector.expand(n, -1)) for vector in vectors]
    cases.append(("mixed rows", torch.where(odd, vectors[2], vectors[0])))
    for label, thresholds in cases:
        want = trace_decisions(trace, thresholds)
        assert len(set(want[0].tolist())) > 1, label  # samples do leave at different exits
        for mode, (exits, preds) in executor_runs(strategy, test.images, thresholds).items():
            rows = len(exits)
            assert torch.equal(exits, want[0][:rows]), f"{label}, {mode}: {int((exits != want[0][:rows]).sum())} exits"
            assert torch.equal(preds, want[1][:rows]), f"{label}, {mode}: {int((preds != want[1][:rows]).sum())} preds"

