"""Calibration: threshold vectors chosen on the calibration split, curves traced on test.

A Calibrator proposes threshold vectors from the calibration trace. The core then keeps the
upper convex hull of their (cost, accuracy) points on the calibration split and evaluates
exactly those vectors on the test trace. The operating point at a cost target phi is chosen
from the calibration hull alone (``eebench.policy``): a vertex, or the time-sharing mixture of
the two adjacent vertices whose calibration cost interpolates to phi.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from eebench.costs import ExitCosts
from eebench.policy import PhiPolicy, select_policy
from eebench.trace import ExitTrace, thresholds_to_json


class Calibrator(ABC):
    """Turns a calibration trace into candidate threshold vectors [V, E-1]."""

    @abstractmethod
    def thresholds(self, trace: ExitTrace, costs: ExitCosts, generator: torch.Generator) -> torch.Tensor:
        """Candidate threshold vectors; +inf disables an exit (no overhead paid)."""

    def variant_thresholds(self, traces: list[ExitTrace], costs: ExitCosts,
                           generator: torch.Generator) -> list[torch.Tensor]:
        """Candidates for each rule variant's trace (what the core asks for). By default ``thresholds``
        per variant; a calibrator with a candidate budget may share it across the variants instead, so
        that a method with many variants does not get many times the candidates of one with one."""
        return [self.thresholds(trace, costs, generator) for trace in traces]


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
    variants: torch.Tensor | None = None  # [P] index of the rule variant of each point

    def policy_at(self, target: float) -> PhiPolicy | None:
        """The operating point at ``target`` chosen from the hull's calibration costs alone."""
        return select_policy(self.calibration_cost.tolist(), target)

    def to_dict(self) -> dict[str, object]:
        return {
            "candidates": self.candidates,
            "thresholds": [thresholds_to_json(row) for row in self.thresholds],
            "variants": [] if self.variants is None else self.variants.tolist(),
            "calibration": {"cost": self.calibration_cost.tolist(), "accuracy": self.calibration_accuracy.tolist()},
            "test": {
                "cost": self.test_cost.tolist(),
                "accuracy": self.test_accuracy.tolist(),
                "exit_counts": self.test_exit_counts.tolist(),
            },
        }


def build_curve(
    calibration: ExitTrace | list[ExitTrace],
    test: ExitTrace | list[ExitTrace],
    costs: ExitCosts,
    candidates: torch.Tensor | list[torch.Tensor],
) -> Curve:
    """Hull on calibration over every variant's candidates, then evaluate the hull on test.

    Lists hold one trace (and one candidate tensor) per variant of the method's rule; the
    all-exits-off vector is always a candidate, so the plain backbone is on the table.
    """
    cal = calibration if isinstance(calibration, list) else [calibration]
    tst = test if isinstance(test, list) else [test]
    per_variant = candidates if isinstance(candidates, list) else [candidates]
    never = torch.full((1, cal[0].num_exits - 1), float("inf"), dtype=torch.float64)
    vectors, variants, cal_cost, cal_acc = [], [], [], []
    for index, (trace, proposed) in enumerate(zip(cal, per_variant, strict=True)):
        block = torch.as_tensor(proposed, dtype=torch.float64)
        if index == 0:
            block = torch.cat([block, never])
        on_cal = trace.evaluate(block, costs)
        vectors.append(block)
        variants.append(torch.full((block.shape[0],), index, dtype=torch.long))
        cal_cost.append(on_cal.cost)
        cal_acc.append(on_cal.accuracy)
    all_vectors, all_variants = torch.cat(vectors), torch.cat(variants)
    all_cost, all_acc = torch.cat(cal_cost), torch.cat(cal_acc)
    keep = torch.tensor(upper_hull(all_cost, all_acc), dtype=torch.long)
    test_cost, test_acc, test_counts = [], [], []
    for k in keep.tolist():
        on_test = tst[int(all_variants[k])].evaluate(all_vectors[k : k + 1], costs)
        test_cost.append(on_test.cost)
        test_acc.append(on_test.accuracy)
        test_counts.append(on_test.exit_counts)
    return Curve(
        thresholds=all_vectors[keep],
        calibration_cost=all_cost[keep],
        calibration_accuracy=all_acc[keep],
        test_cost=torch.cat(test_cost),
        test_accuracy=torch.cat(test_acc),
        test_exit_counts=torch.cat(test_counts),
        candidates=int(all_vectors.shape[0]),
        variants=all_variants[keep],
    )
