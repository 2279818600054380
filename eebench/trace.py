"""ExitTrace: every exit's prediction and score for every sample, as plain tensors.

One batched pass per split fills it; afterwards any threshold vector is evaluated with
tensor operations, so a thousand cost targets cost nothing next to one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from eebench.costs import ExitCosts
from eebench.passes import iterate_batches
from eebench.strategy import ExitStrategy


@dataclass
class Evaluation:
    """Results of V threshold vectors on one trace."""

    cost: torch.Tensor  # [V] mean cost, normalised to the plain backbone
    accuracy: torch.Tensor  # [V]
    exit_counts: torch.Tensor  # [V, E] samples leaving at each exit


@dataclass
class ExitTrace:
    preds: torch.Tensor  # [E, N] long
    scores: torch.Tensor  # [E, N] float
    labels: torch.Tensor  # [N] long
    strict: bool = True

    @property
    def num_exits(self) -> int:
        return int(self.preds.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def correct(self) -> torch.Tensor:
        return self.preds == self.labels[None, :]

    def fires(self, thresholds: torch.Tensor) -> torch.Tensor:
        """[V, E-1, N] bool: would exit j let sample n leave under threshold vector v."""
        scores = self.scores[None, :-1, :]
        limits = thresholds[:, :, None].to(self.scores.dtype)
        return scores > limits if self.strict else scores >= limits

    def first_exit(self, thresholds: torch.Tensor) -> torch.Tensor:
        """[V, N] index of the exit each sample leaves at (the last exit if none fires)."""
        fires = self.fires(thresholds)
        always = torch.ones_like(fires[:, :1, :])
        return torch.cat([fires, always], dim=1).to(torch.uint8).argmax(dim=1)

    def evaluate(self, thresholds: torch.Tensor, costs: ExitCosts, chunk: int = 0) -> Evaluation:
        """Cost, accuracy and exit counts of each threshold vector ([V, E-1]).

        A threshold of +inf disables its exit: it never fires and its overhead is not paid.
        """
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
        if thresholds.ndim == 1:
            thresholds = thresholds[None, :]
        if thresholds.shape[1] != self.num_exits - 1:
            raise ValueError(f"expected {self.num_exits - 1} thresholds, got {thresholds.shape[1]}")
        chunk = chunk or max(1, int(4e7 // max(1, self.num_exits * self.num_samples)))
        correct = self.correct
        out_cost, out_acc, out_counts = [], [], []
        for start in range(0, thresholds.shape[0], chunk):
            block = thresholds[start : start + chunk]
            enabled = torch.cat([torch.isfinite(block), torch.ones_like(block[:, :1], dtype=torch.bool)], 1)
            exit_cost = costs.normalised(enabled)  # [v, E]
            first = self.first_exit(block)  # [v, N]
            counts = torch.zeros(block.shape[0], self.num_exits, dtype=torch.long)
            counts.scatter_add_(1, first, torch.ones_like(first))
            out_counts.append(counts)
            out_cost.append((counts.double() * exit_cost).sum(1) / self.num_samples)
            hit = correct.gather(0, first)  # hit[v, n] = correct[first[v, n], n]
            out_acc.append(hit.double().mean(1))
        return Evaluation(torch.cat(out_cost), torch.cat(out_acc), torch.cat(out_counts))


@torch.no_grad()
def compute_trace(
    strategy: ExitStrategy,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str,
    description: str = "trace",
) -> ExitTrace:
    """One batched pass over ``dataset`` collecting every exit's prediction and score."""
    strategy.eval()
    preds, scores, labels = [], [], []
    for x, y in iterate_batches(dataset, batch_size, device=device, description=description):
        out = strategy.exit_outputs(x)
        preds.append(out.preds.cpu())
        scores.append(out.scores.float().cpu())
        labels.append(y.cpu())
    return ExitTrace(
        preds=torch.cat(preds, dim=1).long(),
        scores=torch.cat(scores, dim=1),
        labels=torch.cat(labels).long(),
        strict=strategy.strict,
    )
