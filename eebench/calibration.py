"""Calibration: threshold vectors chosen on the calibration split, curves traced on test.

A Calibrator proposes threshold vectors from the calibration trace. The core then keeps the
upper convex hull of their (cost, accuracy) points on the calibration split and evaluates
exactly those vectors on the test trace. Accuracy at a cost target phi is the best test
accuracy among hull vectors whose *calibration* cost is <= phi.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from eebench.costs import ExitCosts
from eebench.trace import ExitTrace


class Calibrator(ABC):
    """Turns a calibration trace into candidate threshold vectors [V, E-1]."""

    @abstractmethod
    def thresholds(self, trace: ExitTrace, costs: ExitCosts, generator: torch.Generator) -> torch.Tensor:
        """Candidate threshold vectors; +inf disables an exit (no overhead paid)."""


def upper_hull(cost: torch.Tensor, accuracy: torch.Tensor) -> list[int]:
    """Indices of the upper convex hull, from the cheapest point to the most accurate one.

    Along the returned indices cost increases and accuracy never decreases.
    """
    points = sorted(range(len(cost)), key=lambda i: (float(cost[i]), -float(accuracy[i])))
    hull: list[int] = []
    for i in points:
        if hull and float(cost[hull[-1]]) == float(cost[i]):
            continue  # same cost, lower accuracy (sorted): dominated
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (float(cost[b]) - float(cost[a])) * (float(accuracy[i]) - float(accuracy[a])) - (
                float(accuracy[b]) - float(accuracy[a])
            ) * (float(cost[i]) - float(cost[a]))
            if cross >= 0:  # b lies on or below the segment a->i
                hull.pop()
            else:
                break
        hull.append(i)
    best = max(range(len(hull)), key=lambda k: (float(accuracy[hull[k]]), -k))
    return hull[: best + 1]


def best_point_under(calibration_cost: list[float], test_accuracy: list[float], target: float) -> int | None:
    """Index of the most accurate test point among those with calibration cost <= target."""
    eligible = [i for i, cost in enumerate(calibration_cost) if cost <= target + 1e-12]
    return max(eligible, key=lambda i: test_accuracy[i]) if eligible else None


@dataclass
class Curve:
    """The hull's threshold vectors with their calibration and test results."""

    thresholds: torch.Tensor  # [P, E-1]
    calibration_cost: torch.Tensor
    calibration_accuracy: torch.Tensor
    test_cost: torch.Tensor
    test_accuracy: torch.Tensor
    test_exit_counts: torch.Tensor  # [P, E]
    candidates: int

    def accuracy_at(self, target: float) -> dict[str, float] | None:
        """Best test point whose calibration cost is <= target (None if none qualifies)."""
        best = best_point_under(self.calibration_cost.tolist(), self.test_accuracy.tolist(), target)
        if best is None:
            return None
        return {
            "accuracy": float(self.test_accuracy[best]),
            "test_cost": float(self.test_cost[best]),
            "calibration_cost": float(self.calibration_cost[best]),
            "point": best,
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "candidates": self.candidates,
            "thresholds": [[float(t) if torch.isfinite(t) else None for t in row] for row in self.thresholds],
            "calibration": {"cost": self.calibration_cost.tolist(), "accuracy": self.calibration_accuracy.tolist()},
            "test": {
                "cost": self.test_cost.tolist(),
                "accuracy": self.test_accuracy.tolist(),
                "exit_counts": self.test_exit_counts.tolist(),
            },
        }


def build_curve(
    calibration: ExitTrace, test: ExitTrace, costs: ExitCosts, candidates: torch.Tensor
) -> Curve:
    """Hull on calibration, then evaluate the hull's vectors on test."""
    never = torch.full((1, calibration.num_exits - 1), float("inf"), dtype=torch.float64)
    candidates = torch.cat([torch.as_tensor(candidates, dtype=torch.float64), never])
    on_cal = calibration.evaluate(candidates, costs)
    keep = torch.tensor(upper_hull(on_cal.cost, on_cal.accuracy), dtype=torch.long)
    chosen = candidates[keep]
    on_test = test.evaluate(chosen, costs)
    return Curve(
        thresholds=chosen,
        calibration_cost=on_cal.cost[keep],
        calibration_accuracy=on_cal.accuracy[keep],
        test_cost=on_test.cost,
        test_accuracy=on_test.accuracy,
        test_exit_counts=on_test.exit_counts,
        candidates=int(candidates.shape[0]),
    )
