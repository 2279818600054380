"""Shared frozen-backbone activations: one pass, reused, equal to a direct computation."""

from __future__ import annotations

import torch

from eebench.activations import ActivationCache
from eebench.costs import StageCosts


def pooled(stage: int, out: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.adaptive_max_pool2d(out, 2)


def test_second_request_is_served_from_the_cache(trained_resnet20, small_fmnist) -> None:
    _, train, _ = small_fmnist
    cache = ActivationCache(storage_dtype=torch.float32)
    first, cached = cache.get(trained_resnet20, train, pooled, backbone_key="k", reducer_key="max2",
                              batch_size=64, device="cpu")
    assert not cached and cache.forward_samples == len(train)
    again, cached = cache.get(trained_resnet20, train, pooled, backbone_key="k", reducer_key="max2",
                              batch_size=64, device="cpu")
    assert cached and again is first and cache.forward_samples == len(train)
    with torch.no_grad():
        outputs, logits = trained_resnet20.stage_outputs(train.images)
    for stage in trained_resnet20.exit_points:
        assert torch.allclose(first.features[stage], pooled(stage, outputs[stage]), atol=1e-5)
    assert torch.allclose(first.logits, logits, atol=1e-4) and torch.equal(first.labels, train.labels)
    cache.keep_only("another backbone")
    _, cached = cache.get(trained_resnet20, train, pooled, backbone_key="k", reducer_key="max2",
                          batch_size=64, device="cpu")
    assert not cached


def test_ic_placement_reaches_each_cost_fraction(trained_resnet20) -> None:
    costs = StageCosts.measure(trained_resnet20, (1, 28, 28))
    fractions = [0.15, 0.30, 0.45, 0.60, 0.75, 0.90]
    stages = costs.stages_at_fractions(trained_resnet20.exit_points, fractions)
    assert len(stages) == 6 and stages == sorted(stages)
    for stage, fraction in zip(stages, fractions, strict=True):
        assert costs.through(stage) >= fraction * costs.total
        earlier = [s for s in trained_resnet20.exit_points if s < stage]
        assert not earlier or costs.through(earlier[-1]) < fraction * costs.total


def test_without_sharing_every_request_pays_a_pass(trained_resnet20, small_fmnist) -> None:
    _, train, _ = small_fmnist
    cache = ActivationCache(share=False)
    for _ in range(2):
        _, cached = cache.get(trained_resnet20, train, pooled, backbone_key="k", reducer_key="max2",
                              batch_size=100, device="cpu")
        assert not cached
    assert cache.forward_samples == 2 * len(train)
