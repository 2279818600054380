"""The operating point at a cost target φ, chosen on the calibration hull alone.

The calibration hull is a list of threshold vectors whose calibration cost rises and whose
calibration accuracy never falls. For a target φ the policy is decided from calibration
costs only (the test split is evaluated, never searched):

* φ below the cheapest vertex: no policy (the method cannot run that cheaply);
* φ on a vertex: that vertex;
* φ between two adjacent vertices A and B: the time-sharing mixture of A and B whose
  calibration cost interpolates to exactly φ, i.e. a share ``w = (φ − c_A) / (c_B − c_A)``
  of the samples runs B's thresholds and the rest A's (E²CM paper: any point on a hull
  segment is reachable this way);
* φ beyond the most accurate vertex: that vertex.

Which sample runs B is a seeded, deterministic per-sample rule, so a real executor can run
the same policy later: sample ``i`` (0-based position in its split's fixed order) runs B
when ``frac(s + (i + 1) · g) < w``, where ``g = (√5 − 1) / 2`` and ``s`` is derived from the
seed. This Weyl sequence is equidistributed with low discrepancy, so the realised share of
B on N samples is within a few / N of ``w``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eebench.costs import ExitCosts
from eebench.trace import ExitTrace, paid_exits

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_SEED_MULTIPLIER = 0x9E3779B97F4A7C15  # Knuth's multiplicative hash constant, 2^64 / golden ratio
_TOLERANCE = 1e-12

Metrics = Callable[[torch.Tensor, torch.Tensor], dict[str, list[float]]]


def seed_shift(seed: int) -> float:
    """The sequence's start in [0, 1), a multiplicative hash of the seed (exact integer arithmetic)."""
    return ((int(seed) * _SEED_MULTIPLIER) % 2**64) / 2**64


def mixture_draws(count: int, seed: int, start: int = 0) -> torch.Tensor:
    """u_i in [0, 1) for samples ``start .. start + count − 1`` (float64)."""
    index = torch.arange(start + 1, start + count + 1, dtype=torch.float64)
    return torch.frac(seed_shift(seed) + index * GOLDEN)


def runs_high(count: int, weight: float, seed: int, start: int = 0) -> torch.Tensor:
    """[count] bool: True where a sample runs the mixture's more costly vertex B."""
    if weight <= 0.0:
        return torch.zeros(count, dtype=torch.bool)
    if weight >= 1.0:
        return torch.ones(count, dtype=torch.bool)
    return mixture_draws(count, seed, start) < weight


@dataclass(frozen=True)
class PhiPolicy:
    """Run hull vertex ``low`` on a share ``1 − weight`` of the samples and ``high`` on ``weight``."""

    target: float
    low: int
    high: int
    weight: float
    rule: str  # "vertex" | "mixture" | "most accurate vertex"

    @property
    def points(self) -> list[int]:
        return [self.low] if self.low == self.high else [self.low, self.high]

    def planned_cost(self, calibration_cost: Sequence[float]) -> float:
        return (1.0 - self.weight) * calibration_cost[self.low] + self.weight * calibration_cost[self.high]


def select_policy(calibration_cost: Sequence[float], target: float) -> PhiPolicy | None:
    """The φ policy from the hull's calibration costs alone (ascending, most accurate last)."""
    costs = [float(c) for c in calibration_cost]
    if not costs or target < costs[0] - _TOLERANCE:
        return None
    if target >= costs[-1] - _TOLERANCE:
        last = len(costs) - 1
        rule = "vertex" if abs(target - costs[-1]) <= _TOLERANCE else "most accurate vertex"
        return PhiPolicy(target, last, last, 0.0, rule)
    for k, cost in enumerate(costs):
        if abs(cost - target) <= _TOLERANCE:
            return PhiPolicy(target, k, k, 0.0, "vertex")
    low = max(k for k, cost in enumerate(costs) if cost < target)
    weight = (target - costs[low]) / (costs[low + 1] - costs[low])
    return PhiPolicy(target, low, low + 1, weight, "mixture")


@dataclass
class PolicyOutcome:
    """Per-sample result of a policy on one split."""

    exit_index: torch.Tensor  # [N] long
    correct: torch.Tensor  # [N] bool
    cost: torch.Tensor  # [N] normalised cost paid
    predictions: torch.Tensor  # [N] the prediction of the exit each sample leaves at

    @property
    def accuracy(self) -> float:
        return float(self.correct.double().mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())

    def exit_counts(self, num_exits: int) -> list[int]:
        return self.exit_index.bincount(minlength=num_exits).tolist()


def vector_outcome(trace: ExitTrace, thresholds: torch.Tensor, costs: ExitCosts) -> PolicyOutcome:
    """One threshold vector on every sample of ``trace``: where it leaves, whether it is right, what it paid."""
    row = torch.as_tensor(thresholds, dtype=torch.float64).reshape(1, -1)
    first, correct = trace.outcome(row)
    paid = costs.normalised(paid_exits(row, trace.chained)[0])[first[0]]
    return PolicyOutcome(first[0], correct[0], paid, trace.predictions(row)[0])


def policy_outcome(policy: PhiPolicy, thresholds: torch.Tensor, variants: torch.Tensor | None,
                   traces: list[ExitTrace], costs: ExitCosts, seed: int,
                   memo: dict[int, PolicyOutcome] | None = None) -> PolicyOutcome:
    """``policy`` run on the split of ``traces`` (one trace per rule variant, same samples in the same order).

    ``memo`` keeps each hull vertex's outcome on this split, so targets sharing a vertex evaluate it once."""
    memo = {} if memo is None else memo

    def run(point: int) -> PolicyOutcome:
        if point not in memo:
            trace = traces[0 if variants is None else int(variants[point])]
            memo[point] = vector_outcome(trace, thresholds[point], costs)
        return memo[point]

    low = run(policy.low)
    if policy.low == policy.high:
        return low
    high = run(policy.high)
    pick = runs_high(low.exit_index.numel(), policy.weight, seed)
    return PolicyOutcome(*(torch.where(pick, h, lo) for lo, h in (
        (low.exit_index, high.exit_index), (low.correct, high.correct), (low.cost, high.cost),
        (low.predictions, high.predictions))))


def operating_point(curve_thresholds: torch.Tensor, curve_variants: torch.Tensor | None,
                    calibration_cost: Sequence[float], calibration: list[ExitTrace], test: list[ExitTrace],
                    costs: ExitCosts, target: float, seed: int, test_accuracy: Sequence[float],
                    test_cost: Sequence[float], metrics: Metrics | None = None,
                    memos: tuple[dict, dict] | None = None) -> dict[str, Any] | None:
    """The result-JSON entry for target φ: the calibration-chosen policy, evaluated on both splits.

    ``corner`` keeps the corner-only number for comparison: the most accurate hull vertex whose
    calibration cost is ≤ φ (also chosen on calibration), with its test result. ``memos`` (one dict
    per split, shared across targets) keep vertex outcomes that several targets use.
    """
    policy = select_policy(calibration_cost, target)
    if policy is None:
        return None
    cal_memo, test_memo = memos or ({}, {})
    on_cal = policy_outcome(policy, curve_thresholds, curve_variants, calibration, costs, seed, cal_memo)
    on_test = policy_outcome(policy, curve_thresholds, curve_variants, test, costs, seed, test_memo)
    corner = policy.low
    entry: dict[str, Any] = {
        "accuracy": on_test.accuracy,
        "test_cost": on_test.mean_cost,
        "calibration_accuracy": on_cal.accuracy,
        "calibration_cost": on_cal.mean_cost,
        "planned_cost": policy.planned_cost(calibration_cost),
        "rule": policy.rule,
        "points": policy.points,
        "weight": policy.weight,
        "mixing_seed": seed,
        "exit_counts": on_test.exit_counts(test[0].num_exits),
        "corner": {"point": corner, "accuracy": float(test_accuracy[corner]), "test_cost": float(test_cost[corner]),
                   "calibration_cost": float(calibration_cost[corner])},
    }
    if metrics is not None:
        values = metrics(on_test.predictions[None], test[0].labels)
        if values:
            entry["metrics"] = {name: float(row[0]) for name, row in values.items()}
    return entry
