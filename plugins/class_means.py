"""Class means of a frozen backbone's features and E²CM's eq. 4 divisors, computed once per run.

E²CM and E²CM+SDN both need, at every exit they use, the per-class mean of the exit's
(optionally max-pooled, flattened) features over the training split, the mean distance of
the training samples to each class mean (eq. 4's divisors) and, for their calibration
traces, every training sample's distances. That is two passes of the backbone over the
training split. ``shared_statistics`` computes them for every exit point of the backbone at
once and puts them in the run's shared cache (``ExitStrategy.shared_result``), so the second
method (in any cell of the run) pays no pass at all; ``--no-shared-activations`` turns the
sharing off to measure what it saves. The shared statistics cover the whole split, so a
method takes them only when its budget certainly hands out that split (``Budget.covers``);
otherwise it computes its own with ``compute_statistics`` from batches its budget hands out
(E²CM's ``Budget.batches``, E²CM+SDN's ``Budget.statistics_batches``: the same first samples
in the same order) and a second pass its budget charges (``Budget.forward_batches``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from eebench.api import (
    Budget,
    Charge,
    ExitStrategy,
    FrozenBatch,
    StagedBackbone,
    count_macs,
    elementwise_macs,
    iterate_batches,
    multiply_add_macs,
    squared_distance_macs,
    stage_taps,
    take,
)


def pool_side(shape: tuple[int, ...], pool_to: int | None, auto_pool_above: int | None) -> int | None:
    """Spatial side to max-pool a [C, H, W] feature to, or None to keep it as it is."""
    if len(shape) != 3:
        return None
    channels, height, _ = shape
    if pool_to is not None:
        return pool_to if height > pool_to else None
    if auto_pool_above is not None and math.prod(shape) > auto_pool_above:
        return max(1, int(math.sqrt(auto_pool_above / channels)))
    return None


class ClassMeansExit(nn.Module):
    """Distances from one exit's (pooled, flattened) features to the class means."""

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, pool: int | None) -> None:
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(pool) if pool else None
        pooled = (feature_shape[0], pool, pool) if pool else feature_shape
        self.dim = math.prod(pooled)
        self.input_numel = math.prod(feature_shape)
        # the pool's MACs at batch 1 (adaptive max-pooling: one per input value, from the core's cost table)
        self.pool_macs = count_macs(self.pool, torch.zeros(1, *feature_shape)) if self.pool is not None else 0.0
        self.register_buffer("sums", torch.zeros(num_classes, self.dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("divisors", torch.ones(num_classes, dtype=torch.float64))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        return x.flatten(1).double()

    def accumulate(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        feats = self.features(x)
        self.sums.index_add_(0, labels, feats)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def set_divisors(self, raw_distances: torch.Tensor) -> None:
        """Eq. 4: the mean distance of the given samples to each class mean (1 where undefined)."""
        divisors = raw_distances.mean(0).to(self.divisors.device)
        self.divisors.copy_(torch.where(torch.isfinite(divisors) & (divisors > 0), divisors, 1.0))

    def load(self, sums: torch.Tensor, counts: torch.Tensor, divisors: torch.Tensor) -> None:
        self.sums.copy_(sums)
        self.counts.copy_(counts)
        self.divisors.copy_(divisors)

    @property
    def means(self) -> torch.Tensor:
        """Class means [K, D]; a class the budget never showed gets NaN (never predicted)."""
        return self._derived()[0]

    def _derived(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Means, their transpose, squared norms [1, K] and whether any class is unseen: computed once per
        change of the statistics (the buffers' version counters), not at every call, so that an exit at
        batch 1 runs only the work that depends on the sample."""
        key = (self.sums._version, self.counts._version, self.sums.data_ptr(), self.counts.data_ptr())
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != key:
            means = self.sums / self.counts[:, None]
            cached = (key, (means, means.T, (means * means).sum(1)[None], bool(torch.isnan(means).any())))
            self._cache = cached
        return cached[1]

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Raw Euclidean distances [B, K] (float64, via the expanded square)."""
        feats = self.features(x)
        _, means_t, means_squared, unseen = self._derived()
        squared = (feats * feats).sum(1, keepdim=True) - 2 * feats @ means_t + means_squared
        distance = squared.clamp_min(0).sqrt()
        if not unseen:  # NaN comes only from an unseen class's mean
            return distance
        return torch.where(torch.isnan(distance), torch.full_like(distance, float("inf")), distance)

    def overhead_macs(self, num_classes: int) -> float:
        """MACs of ``distances`` and eq. 4's division for one sample, in the core's cost table:
        the max-pool when the features are pooled (``pool_macs``), the squared distances to the
        K means via the expansion (D·K + K), ‖x‖² for the true distance (D multiply-adds, added
        to each of the K: K), then the square root and the division by the divisor (2K). The
        softmax that reads them is the caller's (``count_softmax``)."""
        k = int(num_classes)
        norm = multiply_add_macs(self.dim) + elementwise_macs(k)
        return self.pool_macs + squared_distance_macs(self.dim, k) + norm + elementwise_macs(2 * k)


@dataclass
class ClassMeanStatistics:
    """What the two passes give, per exit stage: class sums and counts (the means), eq. 4
    divisors and the raw distances [N, K] of the divisor pass's samples, plus those samples'
    head logits and labels (so a trace of them costs no further pass). CPU tensors."""

    sums: dict[int, torch.Tensor]
    counts: torch.Tensor
    divisors: dict[int, torch.Tensor]
    distances: dict[int, torch.Tensor]
    head_logits: torch.Tensor
    labels: torch.Tensor
    samples: int  # samples the class means saw (the divisors come from the same ones)
    seconds: float  # wall time of both passes, whoever paid for them

    def normalised(self, stage: int) -> torch.Tensor:
        """Eq. 4-normalised distances [N, K] at ``stage``: what the exit's softmax reads."""
        return self.distances[stage] / self.divisors[stage]

    def load_into(self, exits: Mapping[int, ClassMeansExit]) -> None:
        for stage, module in exits.items():
            module.load(self.sums[stage], self.counts, self.divisors[stage])


def inner_exit_points(backbone: StagedBackbone) -> list[int]:
    """Exit points before the last stage: the last one feeds the backbone's own head, which is
    the final exit of E²CM and E²CM+SDN alike, so no class means are kept there."""
    return [s for s in backbone.exit_points if s != len(backbone.stages) - 1]


def build_exits(stages: Iterable[int], feature_shapes: Mapping[int, tuple[int, ...]], num_classes: int,
                pool_to: int | None, auto_pool_above: int | None,
                device: torch.device | str) -> dict[int, ClassMeansExit]:
    """Empty class-mean exits at ``stages``, pooled as ``pool_to`` / ``auto_pool_above`` say."""
    return {s: ClassMeansExit(feature_shapes[s], num_classes, pool_side(feature_shapes[s], pool_to, auto_pool_above))
            .to(device) for s in stages}


def _stage_outputs(backbone: StagedBackbone, x: torch.Tensor,
                   wanted: Mapping[int, object]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    stages = sorted(wanted)
    outputs, last = stage_taps(backbone, x, stages)
    return dict(zip(stages, outputs, strict=True)), last


def _batch_outputs(backbone: StagedBackbone, batch: FrozenBatch | tuple[torch.Tensor, torch.Tensor],
                   wanted: Mapping[int, object]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Stage outputs and labels of a frozen-pass batch as it is, or of (images, labels) run here."""
    if isinstance(batch, FrozenBatch):
        return batch.outputs, batch.labels
    x, y = batch
    return _stage_outputs(backbone, x, wanted)[0], y


@torch.no_grad()
def compute_statistics(backbone: StagedBackbone, exits: Mapping[int, ClassMeansExit],
                       batches: Iterable[FrozenBatch | tuple[torch.Tensor, torch.Tensor]], train: Dataset,
                       batch_size: int, device: torch.device | str, *,
                       second_pass: Callable[[Dataset], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                       distances_of_all: bool = False) -> ClassMeanStatistics:
    """Pass 1 accumulates the class means from ``batches`` (the first samples of ``train``, in
    order: (images, labels), or a ``frozen_pass``'s batches); pass 2 runs over the samples pass 1
    saw (``distances_of_all``: over all of ``train``, for a method that needs every training
    sample's distances), for the distances, and the
    divisors come from the samples pass 1 saw. ``second_pass(dataset)`` yields pass 2's batches
    (a budget's ``forward_batches``; default a plain pass, for the shared statistics, whose
    reader the core charges). A pass 2 cut short by the clock gives divisors from what it saw.
    Fills ``exits``."""
    started = time.perf_counter()
    backbone.eval()
    seen = 0
    for batch in batches:
        outputs, y = _batch_outputs(backbone, batch, exits)
        for stage, module in exits.items():
            module.accumulate(outputs[stage], y)
        seen += int(y.shape[0])
    subset = take(train, torch.arange(seen)) if seen < len(train) and not distances_of_all else train
    if second_pass is None:
        def second_pass(data: Dataset) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            return iterate_batches(data, batch_size, device=device, description="class-mean distances")
    raw: dict[int, list[torch.Tensor]] = {s: [] for s in exits}
    heads, labels = [], []
    for x, y in second_pass(subset):
        outputs, last = _stage_outputs(backbone, x, exits)
        for stage, module in exits.items():
            raw[stage].append(module.distances(outputs[stage]).cpu())
        heads.append(backbone.head(last).cpu())
        labels.append(y.cpu())
    k = next(iter(exits.values())).counts.shape[0] if exits else 0
    none = torch.empty(0, k, dtype=torch.float64)  # a pass 2 the clock stopped before its first batch
    distances = {s: torch.cat(chunks) if chunks else none for s, chunks in raw.items()}
    for stage, module in exits.items():
        module.set_divisors(distances[stage][:seen])
    counts = next(iter(exits.values())).counts.cpu().clone() if exits else torch.zeros(0)
    return ClassMeanStatistics(
        sums={s: m.sums.cpu().clone() for s, m in exits.items()}, counts=counts,
        divisors={s: m.divisors.cpu().clone() for s, m in exits.items()}, distances=distances,
        head_logits=torch.cat(heads) if heads else torch.empty(0), labels=torch.cat(labels) if labels else
        torch.empty(0, dtype=torch.long), samples=seen, seconds=time.perf_counter() - started,
    )


def shared_statistics(strategy: ExitStrategy, train: Dataset, pool_to: int | None,
                      auto_pool_above: int | None, budget: Budget, charge: Charge) -> ClassMeanStatistics:
    """Statistics of the whole of ``train`` at every inner exit point of the strategy's frozen
    backbone, computed by the first method of the run that asks (with the same pooling) and shared;
    the core charges ``budget`` what ``charge`` says the two passes cost the method, plus their
    recorded seconds. Only when ``budget.covers(len(train))``."""
    ctx = strategy.context
    backbone = strategy.backbone
    stages = inner_exit_points(backbone)
    shapes = ctx.stage_costs.stage_shapes
    sides = ",".join(f"{s}:{pool_side(shapes[s], pool_to, auto_pool_above) or '-'}" for s in stages)

    def compute() -> ClassMeanStatistics:
        exits = build_exits(stages, shapes, ctx.num_classes, pool_to, auto_pool_above, ctx.device)
        batches = strategy.frozen_pass(train, description="class means")  # also fills the ICs' activations
        return compute_statistics(backbone, exits, batches, train, ctx.batch_size, ctx.device)

    return strategy.shared_result(train, f"class-means[{sides}]", compute, budget, charge)
