"""Fixed operating points are evaluated on both splits exactly like a calibrated vector."""

from __future__ import annotations

import torch

from eebench.costs import ExitCosts
from eebench.runner import evaluate_operating_points
from eebench.strategy import OperatingPoint
from eebench.trace import ExitTrace


def test_operating_point_matches_trace_evaluation() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (50,), generator=generator)
    preds = torch.randint(0, 3, (3, 50), generator=generator)
    scores = torch.rand(3, 50, generator=generator, dtype=torch.float64)
    trace = ExitTrace(preds=preds, scores=scores, labels=labels)
    costs = ExitCosts(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), torch.tensor([0.5, 0.5, 0.0],
                      dtype=torch.float64), 4.0)
    point = OperatingPoint("T = 0.5", torch.tensor([0.5, 0.5]))
    [row] = evaluate_operating_points([point], [trace], [trace], costs)
    first = trace.first_exit(torch.tensor([[0.5, 0.5]]))[0]
    assert row["test"]["exit_counts"] == torch.bincount(first, minlength=3).tolist()
    expected_accuracy = (preds.gather(0, first[None])[0] == labels).double().mean().item()
    assert row["test"]["accuracy"] == row["calibration"]["accuracy"] == expected_accuracy
    assert 0.25 < row["test"]["cost"] <= 1.0
