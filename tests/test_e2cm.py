"""E2CM on a real (briefly trained) ResNet-20 and real Fashion-MNIST images."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from eebench.calibration import build_curve
from eebench.costs import StageCosts
from eebench.strategy import MethodContext
from eebench.testing import assert_executor_matches, assert_state_reloads, threshold_vectors
from eebench.trace import compute_trace, compute_traces
from eebench_plugins.budgets import EpochsBudget, SamplesBudget
from eebench_plugins.calibrators import PerExitBisection
from eebench_plugins.e2cm import E2CM


@pytest.fixture(scope="module")
def fitted(trained_resnet20, small_fmnist):
    bundle, train, test = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    context = MethodContext(bundle.num_classes, bundle.input_shape, StageCosts.measure(model, bundle.input_shape),
                            torch.device("cpu"), seed=0, batch_size=64)
    strategy = E2CM(model, context)
    budget = EpochsBudget(1)
    budget.bind(len(train))
    strategy.fit(train, budget)
    return strategy, budget, train, test


def test_class_means_match_a_direct_per_class_average(fitted) -> None:
    strategy, _, train, _ = fitted
    with torch.no_grad():
        outputs, _ = strategy.backbone.stage_outputs(train.images)
    for stage, exit_module in zip(strategy.exit_stages, strategy.exits, strict=True):
        features = outputs[stage].flatten(1).double()
        for k in range(10):
            direct = features[train.labels == k].mean(0)
            assert torch.allclose(exit_module.means[k], direct, rtol=1e-9, atol=1e-9)


def test_divisors_are_train_mean_distances(fitted) -> None:
    strategy, _, train, _ = fitted
    with torch.no_grad():
        outputs, _ = strategy.backbone.stage_outputs(train.images)
    exit_module = strategy.exits[2]
    features = outputs[strategy.exit_stages[2]].flatten(1).double()
    direct = torch.cdist(features, exit_module.means).mean(0)  # mean over ALL training samples, per class
    assert torch.allclose(exit_module.divisors, direct, rtol=1e-6)


def test_budget_spend_is_one_pass_plus_the_divisor_pass(fitted) -> None:
    _, budget, train, _ = fitted
    assert budget.spend.samples == len(train)
    assert budget.spend.extra_forward_samples == len(train)


def test_a_sample_budget_limits_the_class_means(trained_resnet20, small_fmnist) -> None:
    bundle, train, _ = small_fmnist
    context = MethodContext(10, bundle.input_shape, StageCosts.measure(trained_resnet20, bundle.input_shape),
                            torch.device("cpu"), seed=0, batch_size=64)
    strategy = E2CM(copy.deepcopy(trained_resnet20), context)
    strategy.fit(train, SamplesBudget(50))
    assert int(strategy.exits[0].counts.sum()) == 50


def test_costs_are_monotone_and_overhead_is_the_distances_in_macs(fitted) -> None:
    # Issue 12 ("one cost unit"): the paper's K·(3D−1) counted elementary operations; the core's
    # cost table prices the same distances in MACs: D·K + K (expansion) + D + K (‖x‖²) + 2K (sqrt, ÷).
    strategy, *_ = fitted
    costs = strategy.exit_costs()
    assert bool((costs.cumulative().diff() > 0).all())
    shapes = strategy.context.stage_costs.stage_shapes
    for stage, overhead in zip(strategy.exit_stages, costs.overhead_macs[:-1].tolist(), strict=True):
        d = math.prod(shapes[stage])
        assert overhead == 10 * d + 10 + d + 10 + 2 * 10
    assert costs.backbone_macs[-1].item() == costs.reference_macs


def test_full_cost_end_equals_the_backbone(fitted) -> None:
    strategy, _, train, test = fitted
    test_trace = compute_trace(strategy, test, batch_size=100, device="cpu")
    with torch.no_grad():
        backbone_acc = (strategy.backbone(test.images).argmax(1) == test.labels).double().mean().item()
    never = torch.full((1, test_trace.num_exits - 1), math.inf)
    result = test_trace.evaluate(never, strategy.exit_costs())
    assert result.accuracy.item() == pytest.approx(backbone_acc, abs=1e-12)
    assert result.cost.item() == pytest.approx(1.0)


def test_hull_on_real_trace_is_non_decreasing(fitted) -> None:
    strategy, _, train, test = fitted
    calibration = compute_trace(strategy, train, batch_size=100, device="cpu")
    test_trace = compute_trace(strategy, test, batch_size=100, device="cpu")
    costs = strategy.exit_costs()
    candidates = PerExitBisection(targets=200).thresholds(calibration, costs, torch.Generator().manual_seed(0))
    curve = build_curve(calibration, test_trace, costs, candidates)
    assert bool((curve.calibration_cost.diff() > 0).all())
    assert bool((curve.calibration_accuracy.diff() >= 0).all())
    backbone_cal = calibration.correct[-1].double().mean().item()
    assert curve.calibration_accuracy[-1].item() >= backbone_cal
    assert curve.calibration_cost[0].item() < 0.2  # early exits really are used


def test_cached_training_trace_equals_a_fresh_pass(fitted) -> None:
    strategy, _, train, _ = fitted
    [cached] = compute_traces(strategy, train, batch_size=64, device="cpu", calibration=True)
    assert strategy.split_traces(train) is not None  # the calibration trace came from the divisor pass
    with torch.no_grad():
        fresh = [strategy.exit_outputs(train.images[i : i + 64]) for i in range(0, len(train), 64)]
    preds = torch.cat([f.preds for f in fresh], 1)
    scores = torch.cat([f.scores for f in fresh], 1)
    assert torch.equal(cached.preds, preds)
    assert torch.allclose(cached.scores, scores.double(), rtol=1e-9, atol=1e-12)
    assert torch.equal(cached.labels, train.labels)


def test_max_pooling_reduces_features_and_is_costed(trained_resnet20, small_fmnist) -> None:
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    context = MethodContext(10, bundle.input_shape, StageCosts.measure(model, bundle.input_shape),
                            torch.device("cpu"), seed=0, batch_size=64)
    strategy = E2CM(model, context, pool_to=4)
    strategy.fit(train, SamplesBudget(len(train)))
    first = strategy.exits[0]
    assert first.dim == 16 * 4 * 4
    with torch.no_grad():
        outputs, _ = model.stage_outputs(train.images)
    pooled = torch.nn.functional.adaptive_max_pool2d(outputs[strategy.exit_stages[0]], 4).flatten(1).double()
    assert torch.allclose(first.means[3], pooled[train.labels == 3].mean(0), rtol=1e-9, atol=1e-9)
    # the adaptive max-pool reads the 16×28×28 map once (the cost table), then the distances in 256 dims
    assert strategy.exit_costs().overhead_macs[0].item() == 16 * 28 * 28 + 10 * 256 + 10 + 256 + 10 + 2 * 10


def test_fitting_twice_gives_identical_numbers(fitted, trained_resnet20, small_fmnist) -> None:
    strategy, _, train, test = fitted
    bundle = small_fmnist[0]
    again = E2CM(copy.deepcopy(trained_resnet20), strategy.context)
    budget = EpochsBudget(1)
    budget.bind(len(train))
    again.fit(train, budget)
    first = compute_trace(strategy, test, batch_size=100, device="cpu")
    second = compute_trace(again, test, batch_size=100, device="cpu")
    assert bundle.num_classes == 10
    assert torch.equal(first.preds, second.preds) and torch.equal(first.scores, second.scores)


def test_the_executor_takes_the_traces_decisions(fitted) -> None:
    strategy, _, _, test = fitted
    strategy.eval()
    trace = compute_trace(strategy, test, batch_size=64, device="cpu")
    vectors = threshold_vectors(trace)
    second_off = vectors[1].clone()
    second_off[1] = math.inf  # the 0.6 vector with exit 1 off (threshold_vectors has one with exit 0 off)
    vectors.append(second_off)
    assert_executor_matches(strategy, [trace], test.images, vectors)
    first = trace.first_exit(torch.stack(vectors))
    assert len(set(first.flatten().tolist())) == trace.num_exits  # every exit is taken somewhere


def test_state_dict_restores_the_exits_exactly(fitted, trained_resnet20) -> None:
    strategy, _, _, test = fitted
    assert_state_reloads(strategy, E2CM(copy.deepcopy(trained_resnet20), strategy.context), test, batch_size=64)
