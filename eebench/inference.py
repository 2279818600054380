"""Runnable early-exit networks built from finished cells.

A finished cell holds the fitted strategy's state (``RUN_DIR/states/<cell>.pt``) and, in its
result, the calibration hull's threshold vectors and the φ policies chosen on it. An
``EarlyExitNetwork`` is the strategy plus one policy: each sample gets its hull vertex by
its position in the split's fixed order (the same seeded rule ``eebench.policy`` evaluated),
and ``eebench.stepping.run_early_exit`` runs it in one of three modes:

* ``batch1``: one sample at a time, stopping at the first exit that fires;
* ``compact``: a batch whose exited rows leave it, the survivors alone running on;
* ``masked``: a batch that runs whole until every row has left (for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eebench.costs import ExitCosts
from eebench.errors import EebenchError
from eebench.policy import runs_high
from eebench.stepping import ExitPlan, run_early_exit, run_one
from eebench.strategy import ExitStrategy
from eebench.trace import paid_exits

MODES = ("batch1", "compact", "masked")
STATES = "states"


def state_path(run_dir: Path, cell_id: str) -> Path:
    return run_dir / STATES / f"{cell_id}.pt"


def save_state(run_dir: Path, cell_id: str, config_hash: str, strategy: ExitStrategy) -> Path:
    """The fitted strategy's tensors, next to the cell's result (written first, so a finished cell
    always has its state). Written atomically, like results."""
    path = state_path(run_dir, cell_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"config_hash": config_hash, "state": _to_cpu(strategy.state_dict())}, tmp)
    tmp.replace(path)
    return path


def load_state(run_dir: Path, cell_id: str, config_hash: str) -> dict[str, Any]:
    path = state_path(run_dir, cell_id)
    if not path.is_file():
        raise EebenchError(f"no saved state {path.name} for cell {cell_id}; expected a cell finished by this "
                           "eebench version (rerun it)", where=str(run_dir), key=STATES)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("config_hash") != config_hash:
        raise EebenchError(f"state {path.name} belongs to another configuration of cell {cell_id}; expected "
                           "the state written with its result (rerun the cell)", where=str(run_dir), key=STATES)
    return payload["state"]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def thresholds_from_json(row: list[float | str | None]) -> torch.Tensor:
    """The inverse of ``trace.thresholds_to_json``: null = +inf (exit off), "-inf" = always exit."""
    return torch.tensor([float("inf") if t is None else float("-inf") if t == "-inf" else float(t) for t in row],
                        dtype=torch.float64)


@dataclass(frozen=True)
class ExitPolicy:
    """A φ policy of a cell: hull vertex ``low`` on a share 1 − ``weight`` of the samples, ``high`` on the
    rest, picked per sample position by the seeded rule of ``eebench.policy.runs_high``."""

    target: str
    low: torch.Tensor  # [E-1] thresholds
    high: torch.Tensor
    low_variant: int
    high_variant: int
    weight: float
    seed: int

    @classmethod
    def no_exit(cls, num_exits: int) -> ExitPolicy:
        off = torch.full((num_exits - 1,), float("inf"), dtype=torch.float64)
        return cls("no exit", off, off, 0, 0, 0.0, 0)

    @classmethod
    def from_result(cls, result: dict[str, Any], target: str) -> ExitPolicy | None:
        """The policy ``accuracy_at[target]`` of a result (None where the method cannot reach φ)."""
        entry = result["accuracy_at"].get(target)
        if entry is None:
            return None
        curve = result["curve"]
        variants = curve.get("variants") or []
        points = entry["points"]
        low, high = points[0], points[-1]
        rows = curve["thresholds"]
        return cls(target, thresholds_from_json(rows[low]), thresholds_from_json(rows[high]),
                   int(variants[low]) if variants else 0, int(variants[high]) if variants else 0,
                   float(entry["weight"]), int(entry["mixing_seed"]))

    def rows(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[count, E-1] thresholds and [count] variants of the samples at positions start..start+count-1."""
        high = runs_high(count, self.weight, self.seed, start)[:, None]
        thresholds = torch.where(high, self.high[None], self.low[None])
        variants = torch.where(high[:, 0], self.high_variant, self.low_variant).long()
        return thresholds, variants

    def row_costs(self, exit_index: torch.Tensor, start: int, costs: ExitCosts, chained: bool) -> torch.Tensor:
        """[N] normalised MACs each sample paid (the MAC model the leaderboard uses)."""
        thresholds, _ = self.rows(start, int(exit_index.numel()))
        table = costs.normalised(paid_exits(thresholds, chained))  # [N, E]
        return table.gather(1, exit_index.cpu()[:, None])[:, 0]


class EarlyExitNetwork:
    """A fitted strategy run as a real early-exit network under one policy, on a stream of ``count``
    samples in a fixed order (the policy's per-sample rows are laid out once, before any timing)."""

    def __init__(self, strategy: ExitStrategy, policy: ExitPolicy, count: int, device: torch.device | str) -> None:
        self.strategy, self.policy = strategy, policy
        strategy.eval()
        self.plan = ExitPlan(strategy)
        thresholds, variants = policy.rows(0, count)
        self.thresholds, self.variants = thresholds.to(device), variants.to(device)
        self.rows = thresholds.tolist()  # batch 1 decides on Python floats
        self.single_variants = [variants[i : i + 1].to(device) for i in range(count)] if policy.low_variant \
            or policy.high_variant else None

    @torch.inference_mode()
    def run(self, x: torch.Tensor, start: int, mode: str = "compact") -> tuple[torch.Tensor, torch.Tensor] | tuple[
            int, int]:
        """The samples at positions start..start+B-1: ([B] exit index, [B] prediction) in a batched mode,
        (exit index, prediction) for the one sample of mode ``batch1``."""
        if mode == "batch1":
            return run_one(self.plan, x, self.rows[start],
                           None if self.single_variants is None else self.single_variants[start])
        stop = start + int(x.shape[0])
        return run_early_exit(self.plan, x, self.thresholds[start:stop], self.variants[start:stop],
                              compact=mode != "masked")

    def predict(self, images: torch.Tensor, batch_size: int, mode: str = "compact") -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        """Exit indices and predictions of the stream ``images`` (its first ``count`` samples)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "batch1":
            pairs = [self.run(images[i : i + 1], i, mode) for i in range(int(images.shape[0]))]
            return torch.tensor([e for e, _ in pairs]), torch.tensor([p for _, p in pairs])
        exits, preds = [], []
        for start in range(0, int(images.shape[0]), batch_size):
            e, p = self.run(images[start : start + batch_size], start, mode)
            exits.append(e)
            preds.append(p)
        return torch.cat(exits).cpu(), torch.cat(preds).cpu()
