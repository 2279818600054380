"""The φ operating point: chosen on the calibration hull alone, mixtures run per sample, evaluated on test."""

from __future__ import annotations

import pytest
import torch

from eebench.calibration import build_curve
from eebench.costs import ExitCosts
from eebench.policy import operating_point, policy_outcome, runs_high, select_policy, vector_outcome
from eebench.trace import ExitTrace

COSTS = ExitCosts(torch.tensor([20.0, 50.0, 100.0]), torch.tensor([0.0, 0.0, 0.0]), 100.0)


def test_selection_reads_calibration_costs_only() -> None:
    costs = [0.2, 0.5, 1.0]
    assert select_policy(costs, 0.1) is None
    vertex = select_policy(costs, 0.5)
    assert (vertex.rule, vertex.points, vertex.weight) == ("vertex", [1], 0.0)
    mixture = select_policy(costs, 0.3)
    assert mixture.rule == "mixture" and mixture.points == [0, 1]
    assert mixture.weight == pytest.approx(1 / 3) and mixture.planned_cost(costs) == pytest.approx(0.3)
    beyond = select_policy(costs, 1.5)
    assert (beyond.rule, beyond.points) == ("most accurate vertex", [2])


def test_per_sample_rule_is_deterministic_seeded_and_matches_the_weight() -> None:
    picks = runs_high(60_000, 0.37, seed=3)
    assert torch.equal(picks, runs_high(60_000, 0.37, seed=3))
    assert not torch.equal(picks, runs_high(60_000, 0.37, seed=4))
    assert abs(float(picks.double().mean()) - 0.37) < 1e-3  # low-discrepancy: close to the weight
    # a sample's route depends only on its own position, not on how many samples are routed at once
    assert torch.equal(runs_high(100, 0.37, seed=3, start=500), picks[500:600])
    assert not runs_high(10, 0.0, seed=0).any() and runs_high(10, 1.0, seed=0).all()


def crafted_traces() -> tuple[ExitTrace, ExitTrace]:
    """Two exits before the last. On calibration exit 1 is far better than exit 0; on test the
    cheap exit 0 is perfect and exit 1 is poor, so the most accurate test corner is the cheap one."""
    n = 1000
    labels = torch.zeros(n, dtype=torch.long)
    scores = torch.ones(3, n)
    calibration_preds = torch.stack([torch.arange(n) % 2, torch.zeros(n, dtype=torch.long), torch.zeros(n,
                                                                                                   dtype=torch.long)])
    test_preds = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n) % 4, torch.zeros(n, dtype=torch.long)])
    return ExitTrace(calibration_preds, scores, labels), ExitTrace(test_preds, scores, labels)


def test_reported_point_is_chosen_on_calibration_even_when_test_prefers_another_corner() -> None:
    calibration, test = crafted_traces()
    always, off = float("-inf"), float("inf")
    candidates = torch.tensor([[always, off], [off, always]])  # leave at exit 0 (cost 0.2) or exit 1 (0.5)
    curve = build_curve(calibration, test, COSTS, candidates)
    assert curve.calibration_cost.tolist() == pytest.approx([0.2, 0.5])
    assert curve.calibration_accuracy.tolist() == pytest.approx([0.5, 1.0])
    assert curve.test_accuracy.tolist() == pytest.approx([1.0, 0.25])  # test would pick the cheap corner
    args = (curve.thresholds, curve.variants, curve.calibration_cost.tolist(), [calibration], [test], COSTS)
    extra = (curve.test_accuracy.tolist(), curve.test_cost.tolist())
    at_half = operating_point(*args, 0.5, 0, *extra)
    assert at_half["rule"] == "vertex" and at_half["points"] == [1]
    assert at_half["accuracy"] == pytest.approx(0.25)  # not 1.0: the test-best corner is never taken
    assert at_half["corner"]["point"] == 1
    # φ between the vertices: the mixture, routed per sample by the seeded rule, evaluated exactly
    at = operating_point(*args, 0.35, 7, *extra)
    assert at["rule"] == "mixture" and at["weight"] == pytest.approx(0.5)
    high = runs_high(1000, 0.5, seed=7)
    expected = torch.where(high, (torch.arange(1000) % 4 == 0), torch.ones(1000, dtype=torch.bool))
    assert at["accuracy"] == pytest.approx(float(expected.double().mean()))
    assert at["calibration_cost"] == pytest.approx(0.35, abs=2e-3)
    assert at["test_cost"] == pytest.approx(0.2 + 0.3 * float(high.double().mean()))
    assert at["corner"]["point"] == 0 and at["corner"]["accuracy"] == pytest.approx(1.0)
    assert sum(at["exit_counts"]) == 1000
    assert operating_point(*args, 0.1, 0, *extra) is None


def test_policy_on_a_vertex_equals_that_vector_on_the_trace() -> None:
    calibration, test = crafted_traces()
    curve = build_curve(calibration, test, COSTS, torch.tensor([[float("-inf"), float("inf")]]))
    policy = select_policy(curve.calibration_cost.tolist(), 1.0)
    got = policy_outcome(policy, curve.thresholds, curve.variants, [test], COSTS, seed=0)
    direct = vector_outcome(test, curve.thresholds[policy.low], COSTS)
    assert torch.equal(got.exit_index, direct.exit_index) and got.accuracy == direct.accuracy
