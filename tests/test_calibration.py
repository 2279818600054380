"""Trace evaluation, the upper hull and the E2CM per-exit search, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from eebench.calibration import build_curve, upper_hull
from eebench.costs import ExitCosts
from eebench.trace import ExitTrace
from eebench_plugins.calibrators import PerExitBisection, SharedThresholdSweep, per_exit_search


def synthetic_trace(num_exits: int = 4, samples: int = 300, strict: bool = True, seed: int = 0) -> ExitTrace:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (samples,), generator=g)
    scores = torch.rand(num_exits, samples, generator=g)
    # later exits are right more often, and confident exits are right more often
    right = torch.rand(num_exits, samples, generator=g) < (0.3 + 0.15 * torch.arange(num_exits)[:, None] + 0.3 * scores)
    preds = torch.where(right, labels[None], (labels[None] + 1) % 5)
    return ExitTrace(preds, scores, labels, strict=strict)


COSTS = ExitCosts(torch.tensor([10.0, 30.0, 60.0, 100.0]), torch.tensor([2.0, 2.0, 3.0, 0.0]), 100.0)


def naive(trace: ExitTrace, thresholds: list[float], costs: ExitCosts) -> tuple[float, float]:
    """Per-sample reference: walk the exits, pay each enabled exit's overhead."""
    total_cost, right = 0.0, 0
    for n in range(trace.num_samples):
        paid = 0.0
        for j in range(trace.num_exits):
            last = j == trace.num_exits - 1
            enabled = last or thresholds[j] != math.inf  # -inf: always exit, paid
            if enabled:
                paid += float(costs.overhead_macs[j])
            s = float(trace.scores[j, n])
            fires = last or (enabled and (s > thresholds[j] if trace.strict else s >= thresholds[j]))
            if fires:
                total_cost += (float(costs.backbone_macs[j]) + paid) / costs.reference_macs
                right += int(trace.preds[j, n] == trace.labels[n])
                break
    return total_cost / trace.num_samples, right / trace.num_samples


@pytest.mark.parametrize("strict", [True, False])
def test_vectorised_evaluation_equals_per_sample_walk(strict: bool) -> None:
    trace = synthetic_trace(strict=strict)
    vectors = [[0.5, 0.7, 0.9], [0.2, math.inf, 0.6], [math.inf] * 3, [0.0, 0.0, 0.0],
               [float(trace.scores[0, 3]), 0.4, math.inf], [math.inf, -math.inf, 0.9]]
    result = trace.evaluate(torch.tensor(vectors), COSTS)
    for k, vector in enumerate(vectors):
        cost, acc = naive(trace, vector, COSTS)
        assert result.cost[k].item() == pytest.approx(cost, abs=1e-12)
        assert result.accuracy[k].item() == pytest.approx(acc, abs=1e-12)
        assert int(result.exit_counts[k].sum()) == trace.num_samples


def test_minus_inf_threshold_means_always_exit_and_pays_its_overhead() -> None:
    trace = synthetic_trace()
    result = trace.evaluate(torch.tensor([[math.inf, -math.inf, math.inf]]), COSTS)
    assert result.exit_counts[0].tolist() == [0, trace.num_samples, 0, 0]
    assert result.cost[0].item() == pytest.approx((30.0 + 2.0) / 100.0)  # exit 1's own overhead is paid
    assert result.accuracy[0].item() == pytest.approx(trace.correct[1].double().mean().item())


def test_disabled_exits_cost_exactly_the_plain_backbone() -> None:
    trace = synthetic_trace()
    result = trace.evaluate(torch.full((1, 3), math.inf), COSTS)
    assert result.cost.item() == pytest.approx(1.0)
    assert result.accuracy.item() == pytest.approx(trace.correct[-1].double().mean().item())


def test_upper_hull_is_concave_and_non_decreasing() -> None:
    g = torch.Generator().manual_seed(1)
    cost, acc = torch.rand(400, generator=g), torch.rand(400, generator=g)
    hull = upper_hull(cost, acc)
    c, a = cost[hull], acc[hull]
    assert bool((c.diff() > 0).all()) and bool((a.diff() >= 0).all())
    assert a[-1] == acc.max() and c[0] == cost.min()
    slopes = a.diff() / c.diff()
    assert bool((slopes.diff() <= 1e-9).all())  # concave
    for i in range(400):  # no point lies above the hull
        k = int(torch.searchsorted(c, cost[i]).clamp(1, len(hull) - 1))
        line = a[k - 1] + (a[k] - a[k - 1]) * (cost[i] - c[k - 1]) / (c[k] - c[k - 1])
        if c[0] <= cost[i] <= c[-1]:
            assert acc[i] <= line + 1e-9


def test_per_exit_search_hits_reachable_targets() -> None:
    trace = synthetic_trace(samples=2000)
    targets = torch.tensor([0.2, 0.35, 0.5, 0.7, 0.9])
    found = per_exit_search(trace, COSTS, targets, torch.Generator().manual_seed(0))
    achieved = trace.evaluate(found, COSTS).cost
    lowest = COSTS.normalised()[0].item()  # everyone leaves at the first exit
    highest = COSTS.normalised()[-1].item()
    for target, got in zip(targets.tolist(), achieved.tolist(), strict=True):
        assert lowest <= target <= highest
        assert got == pytest.approx(target, abs=2e-3)


def test_curve_thresholds_come_from_calibration_only() -> None:
    calibration, test = synthetic_trace(seed=2), synthetic_trace(seed=3)
    candidates = PerExitBisection(targets=100).thresholds(calibration, COSTS, torch.Generator().manual_seed(0))
    curve = build_curve(calibration, test, COSTS, candidates)
    again = calibration.evaluate(curve.thresholds, COSTS)
    assert torch.allclose(again.cost, curve.calibration_cost) and torch.allclose(again.accuracy,
                                                                                 curve.calibration_accuracy)
    assert bool((curve.calibration_accuracy.diff() >= 0).all())
    # the policy at a target reads the calibration costs, never the test split
    target = float(curve.calibration_cost[len(curve.calibration_cost) // 2])
    chosen = curve.policy_at(target)
    assert chosen.rule == "vertex" and chosen.points == [len(curve.calibration_cost) // 2]
    assert curve.policy_at(float(curve.calibration_cost.min()) / 2) is None


def test_shared_threshold_uses_one_value_per_vector() -> None:
    trace = synthetic_trace()
    vectors = SharedThresholdSweep(points=50).thresholds(trace, COSTS, torch.Generator())
    finite = torch.where(torch.isfinite(vectors), vectors, torch.nan)
    spread = finite.nan_to_num(0).amax(1) - torch.where(torch.isfinite(vectors), vectors, 1e9).amin(1)
    rows_with_values = torch.isfinite(vectors).any(1)
    assert bool((spread[rows_with_values] <= 1e-12).all())


def test_variants_share_one_hull_and_test_on_their_own_trace() -> None:
    weak_cal, weak_test = synthetic_trace(seed=4), synthetic_trace(seed=5)
    strong_cal, strong_test = synthetic_trace(seed=6), synthetic_trace(seed=7)
    for trace in (strong_cal, strong_test):
        trace.preds[:-1] = trace.labels  # this variant's early exits are always right
    calibrator = PerExitBisection(targets=50)
    candidates = [calibrator.thresholds(t, COSTS, torch.Generator().manual_seed(0)) for t in (weak_cal, strong_cal)]
    curve = build_curve([weak_cal, strong_cal], [weak_test, strong_test], COSTS, candidates)
    assert curve.variants is not None and 1 in curve.variants.tolist()
    assert curve.candidates == 50 + 1 + 50  # the all-off vector is added once
    for k, variant in enumerate(curve.variants.tolist()):
        own = [weak_test, strong_test][variant].evaluate(curve.thresholds[k : k + 1], COSTS)
        assert curve.test_accuracy[k].item() == own.accuracy.item()
        assert curve.test_cost[k].item() == own.cost.item()


@pytest.mark.parametrize("strict", [True, False])
def test_minus_inf_scores_veto_their_exit(strict: bool) -> None:
    trace = synthetic_trace(samples=500, strict=strict)
    vetoed = torch.rand(trace.scores[:-1].shape, generator=torch.Generator().manual_seed(9)) < 0.3
    trace.scores[:-1][vetoed] = float("-inf")
    for calibrator in (PerExitBisection(targets=60), SharedThresholdSweep(points=60)):
        vectors = calibrator.thresholds(trace, COSTS, torch.Generator().manual_seed(0))
        first = trace.first_exit(vectors)
        for j in range(trace.num_exits - 1):
            assert not bool(((first == j) & vetoed[j][None]).any())
    lowest = trace.first_exit(torch.full((1, 3), float("-inf")))
    assert not bool(((lowest == 0) & vetoed[0][None]).any())
