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


def exit_fires(scores: torch.Tensor, limits: torch.Tensor, strict: bool) -> torch.Tensor:
    """The exit rule: score > T (strict) or score >= T; a score of -inf vetoes the exit."""
    passed = scores > limits if strict else scores >= limits
    return passed & (scores != float("-inf"))


def thresholds_to_json(row: torch.Tensor) -> list[float | str | None]:
    """One threshold vector as JSON: null = exit off (+inf), "-inf" = always exit, else the float."""
    return [None if t == float("inf") else "-inf" if t == float("-inf") else float(t) for t in row]


@dataclass
class Evaluation:
    """Results of V threshold vectors on one trace."""

    cost: torch.Tensor  # [V] mean cost, normalised to the plain backbone
    accuracy: torch.Tensor  # [V]
    exit_counts: torch.Tensor  # [V, E] samples leaving at each exit


@dataclass
class ExitTrace:
    preds: torch.Tensor  # [E, N] long
    scores: torch.Tensor  # [E, N] float64
    labels: torch.Tensor  # [N] long
    strict: bool = True
    chained: bool = False  # an exit's score needs every earlier exit evaluated (e.g. patience)

    def __post_init__(self) -> None:
        self.scores = self.scores.double()  # thresholds sit between adjacent scores: keep full precision

    @property
    def num_exits(self) -> int:
        return int(self.preds.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def correct(self) -> torch.Tensor:
        return self.preds == self.labels[None, :]

    def first_exit(self, thresholds: torch.Tensor) -> torch.Tensor:
        """[V, N] index of the exit each sample leaves at (the last exit if none fires)."""
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
        first = torch.full((thresholds.shape[0], self.num_samples), self.num_exits - 1, dtype=torch.long)
        for j in range(self.num_exits - 2, -1, -1):  # walking backwards leaves the earliest firing exit
            first.masked_fill_(exit_fires(self.scores[j], thresholds[:, j, None], self.strict), j)
        return first

    def outcome(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[V, N] exit index and [V, N] correctness of every sample under each vector.

        A method whose decision is not "the first exit whose score passes its threshold"
        (e.g. class exclusion, which carries a per-sample set of alive classes from exit
        to exit) subclasses ExitTrace, overrides this and ``first_exit``, and returns its
        trace from ``ExitStrategy.precomputed_trace``; costs and hulls then work unchanged.
        """
        first = self.first_exit(thresholds)
        return first, self.correct.gather(0, first)

    def evaluate(self, thresholds: torch.Tensor, costs: ExitCosts, chunk: int = 0) -> Evaluation:
        """Cost, accuracy and exit counts of each threshold vector ([V, E-1]).

        A threshold of +inf disables its exit: it never fires and its overhead is not paid
        (for ``chained`` methods every exit before the last enabled one is still paid).
        A threshold of -inf is the opposite, "always exit here": the exit is evaluated and paid.
        """
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
        if thresholds.ndim == 1:
            thresholds = thresholds[None, :]
        if thresholds.shape[1] != self.num_exits - 1:
            raise ValueError(f"expected {self.num_exits - 1} thresholds, got {thresholds.shape[1]}")
        chunk = chunk or max(1, int(2e7 // max(1, self.num_samples)))
        out_cost, out_acc, out_counts = [], [], []
        for start in range(0, thresholds.shape[0], chunk):
            block = thresholds[start : start + chunk]
            enabled = torch.cat([block != float("inf"), torch.ones_like(block[:, :1], dtype=torch.bool)], 1)
            if self.chained:
                enabled = enabled.flip(-1).cummax(-1).values.flip(-1)
            first, correct = self.outcome(block)  # [v, N] each
            rows = torch.arange(block.shape[0])[:, None] * self.num_exits
            counts = (first + rows).flatten().bincount(minlength=block.shape[0] * self.num_exits)
            counts = counts.view(block.shape[0], self.num_exits)
            out_counts.append(counts)
            out_cost.append((counts.double() * costs.normalised(enabled)).sum(1) / self.num_samples)
            out_acc.append(correct.sum(1).double() / self.num_samples)
        return Evaluation(torch.cat(out_cost), torch.cat(out_acc), torch.cat(out_counts))


@torch.no_grad()
def compute_traces(
    strategy: ExitStrategy,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str,
    description: str = "trace",
) -> list[ExitTrace]:
    """One batched pass over ``dataset`` collecting every exit's prediction and score.

    A method whose outputs carry a leading variant dimension ([P, E, B]: one decision rule
    per hyper-parameter value, e.g. BWDS's lambda) gets one trace per variant, all from
    the same pass.
    """
    cached = strategy.precomputed_trace(dataset)
    if cached is not None:
        return cached if isinstance(cached, list) else [cached]
    strategy.eval()
    batches = strategy.cached_outputs(dataset)
    if batches is None:  # the usual case: one batched pass over the images
        batches = ((strategy.exit_outputs(x), y)
                   for x, y in iterate_batches(dataset, batch_size, device=device, description=description))
    preds, scores, labels = [], [], []
    for out, y in batches:
        preds.append(out.preds.cpu())
        scores.append(out.scores.double().cpu())
        labels.append(y.cpu())
    all_preds, all_scores = torch.cat(preds, dim=-1).long(), torch.cat(scores, dim=-1)
    if all_preds.ndim == 2:
        all_preds, all_scores = all_preds[None], all_scores[None]
    targets = torch.cat(labels).long()
    return [
        ExitTrace(preds=p, scores=s, labels=targets, strict=strategy.strict, chained=strategy.chained)
        for p, s in zip(all_preds, all_scores, strict=True)
    ]


def compute_trace(strategy: ExitStrategy, dataset: Dataset, *, batch_size: int, device: torch.device | str,
                  description: str = "trace") -> ExitTrace:
    """The trace of a single-variant method (see ``compute_traces``)."""
    traces = compute_traces(strategy, dataset, batch_size=batch_size, device=device, description=description)
    if len(traces) != 1:
        raise ValueError(f"{type(strategy).__name__} has {len(traces)} variants; use compute_traces")
    return traces[0]
