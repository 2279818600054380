"""Which test samples each policy of a cell got right, stored compactly in its result.

A confidence interval from one seed (a bootstrap over test samples) needs only how many samples a
policy got right; a paired difference between two methods on the same test samples needs *which*:
each policy's per-sample correctness is kept in the result's ``test_outcomes`` block as a bit string
(``numpy.packbits`` of the booleans in the test split's fixed order, big-endian bit order, base64),
about N / 6 characters for N test samples. ``pack`` / ``unpack`` are numpy only: reading a result needs no torch.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

ENCODING = "base64 of numpy.packbits(correct), test split order"


def pack(correct: Sequence[bool] | np.ndarray) -> str:
    """Booleans -> base64 text of their packed bits."""
    bits = np.packbits(np.asarray(correct, dtype=bool))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack(text: str, count: int) -> np.ndarray:
    """``pack``'s text back to ``count`` booleans."""
    bits = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(bits, count=count).astype(bool)


def outcome_block(curve: Any, test: list[Any], costs: Any, targets: Sequence[float], seed: int) -> dict[str, Any]:
    """The ``test_outcomes`` block of a result: per-sample correctness on test of each φ policy (the same
    policies as ``accuracy_at``: ``targets`` and φ = 1), of the hull end and of the plain backbone (every
    exit off). ``curve`` is the cell's ``calibration.Curve``, ``test`` its test traces (one per variant)."""
    import torch

    from eebench.policy import PhiPolicy, policy_outcome, select_policy, vector_outcome

    calibration_cost = curve.calibration_cost.tolist()
    memo: dict = {}  # each hull vertex evaluated once

    def correct(policy: PhiPolicy | None) -> str | None:
        if policy is None:
            return None
        outcome = policy_outcome(policy, curve.thresholds, curve.variants, test, costs, seed, memo)
        return pack(outcome.correct.cpu().numpy())

    last = len(calibration_cost) - 1
    exits_off = torch.full((test[0].num_exits - 1,), float("inf"), dtype=torch.float64)
    return {
        "encoding": ENCODING,
        "samples": len(test[0].labels),
        "accuracy_at": {f"{t:g}": correct(select_policy(calibration_cost, t)) for t in sorted({*targets, 1.0})},
        "hull_end": correct(PhiPolicy(calibration_cost[last], last, last, 0.0, "vertex")),
        "no_exit": pack(vector_outcome(test[0], exits_off, costs).correct.cpu().numpy()),
    }
