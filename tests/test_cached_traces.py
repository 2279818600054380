"""Frozen-backbone methods score their calibration trace from the shared activations (no second
backbone pass); the result must match scoring the images live."""

from __future__ import annotations

import copy

import pytest
import torch

from eebench.costs import StageCosts
from eebench.strategy import MethodContext
from eebench.trace import compute_traces
from eebench_plugins.budgets import SamplesBudget


@pytest.mark.parametrize("method", ["sdn", "e2cm+sdn", "bwds"])
def test_calibration_trace_from_the_cache_matches_the_live_pass(registry, trained_resnet20, small_fmnist,
                                                                method) -> None:
    bundle, train, test = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    costs = StageCosts.measure(model, bundle.input_shape)
    context = MethodContext(bundle.num_classes, bundle.input_shape, costs, torch.device("cpu"), seed=0,
                            batch_size=64, train_batch_size=32, backbone_key="test-cached-traces")
    strategy = registry.get("exit_strategies", method)(model, context)
    budget = SamplesBudget(400)
    budget.bind(len(train))
    strategy.fit(train, budget)
    strategy.eval()

    assert strategy.split_traces(test) is None  # nothing cached for the test split: it runs the images
    assert strategy.split_traces(train) is not None
    cached = compute_traces(strategy, train, batch_size=64, device="cpu", calibration=True)
    live = strategy.exit_outputs(train.images)
    live_preds = live.preds if live.preds.ndim == 3 else live.preds[None]
    live_scores = live.scores if live.scores.ndim == 3 else live.scores[None]
    assert len(cached) == live_preds.shape[0]
    for trace, preds, scores in zip(cached, live_preds, live_scores, strict=True):
        assert torch.equal(trace.labels, train.labels)
        assert (trace.preds == preds).double().mean() >= 0.98  # the ICs read fp16-cached features
        finite = torch.isfinite(trace.scores)
        assert (finite == torch.isfinite(scores.double())).double().mean() >= 0.98  # E²CM+SDN's vetoes
        both = finite & torch.isfinite(scores.double())
        assert (trace.scores[both] - scores.double()[both]).abs().max() < 0.02
