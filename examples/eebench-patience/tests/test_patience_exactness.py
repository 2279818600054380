"""The early-exit network eebench runs (``eebench.stepping.run_early_exit``, and ``run_one`` at batch
1) is the one the trace describes: the patience counters travel in the executor's per-sample
``state``, so every mode (compacted batches, masked batches, one sample at a time) sends each sample
to the exit the test trace says, with its prediction, under any threshold vector
(``eebench.testing.assert_executor_matches``).

Fixture-free (eebench's own test suite runs this file's tests as plain functions)."""

from __future__ import annotations

import functools

import torch
from eebench_patience import PatienceExit

from eebench.api import MethodContext, StageCosts, take
from eebench.basenet import train_backbone
from eebench.datasets import dataset_labels, seeded_subset_indices
from eebench.plugins import default_registry
from eebench.suite import Recipe
from eebench.testing import assert_executor_matches
from eebench.trace import compute_traces


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


def test_the_executor_gives_the_traces_exits_and_predictions() -> None:
    strategy, test = fitted()
    traces = compute_traces(strategy, test, batch_size=100, device="cpu")
    assert len(traces) == 1
    assert_executor_matches(strategy, traces, test.images)
