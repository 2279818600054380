"""Frozen-backbone activations, computed in one pass and shared by every method that needs them.

Methods that train heads on a frozen backbone (internal classifiers, decision functions)
ask the context for reduced stage outputs instead of running the backbone themselves; the
first request for a (base backbone, split, reducer) pays one forward pass, every later one
- in the same cell or another cell of the run - reads the cache. The backbone must be in
eval mode and unchanged, which is exactly the frozen-backbone setting.

Anything else a method derives from the frozen backbone on a split (class-mean statistics,
say) is shared the same way through ``ActivationCache.shared``: the first method to ask
computes it, every later one with the same name reads it. Such a method walks the split with
``frozen_pass``, and that pass also fills every activation product the run's methods declared
(``want``, from ``ExitStrategy.frozen_products``), so one forward pass feeds both.

Every entry keeps the wall seconds its computation took, so the core charges each reader
(``Budget.read_shared``, via ``ExitStrategy.shared_activations`` / ``shared_result``) the
same pass at the same price, whichever cell paid for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset

from eebench.model import StagedBackbone, stage_taps
from eebench.passes import iterate_batches

Reducer = Callable[[int, torch.Tensor], torch.Tensor]
Shared = TypeVar("Shared")


@dataclass
class Activations:
    """Reduced outputs of the backbone's exit-point stages for every sample of a split."""

    features: dict[int, torch.Tensor]  # stage index -> [N, ...] (CPU, storage dtype)
    logits: torch.Tensor  # [N, K] the backbone head's logits
    labels: torch.Tensor  # [N]
    passes: int = 1  # forward passes the cache has paid for these (for spend reports)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class FrozenBatch:
    """One batch of a frozen pass: every exit point's stage output, the last stage's output (the head's
    input) and the labels, on the pass's device."""

    outputs: dict[int, torch.Tensor]
    last: torch.Tensor
    labels: torch.Tensor


class _ActivationWriter:
    """Fills one ``Activations`` batch by batch, into tensors sized on the first batch (list-then-cat
    would hold twice the cache's size at the end)."""

    def __init__(self, total: int, reducer: Reducer, storage_dtype: torch.dtype) -> None:
        self.total, self.reducer, self.storage_dtype = total, reducer, storage_dtype
        self.features: dict[int, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        self.labels = torch.empty(total, dtype=torch.long)
        self.start = 0

    def add(self, batch: FrozenBatch, head: torch.Tensor) -> None:
        stop = self.start + int(batch.labels.shape[0])
        for index, out in batch.outputs.items():
            reduced = self.reducer(index, out)
            if index not in self.features:
                self.features[index] = torch.empty((self.total, *reduced.shape[1:]), dtype=self.storage_dtype)
            self.features[index][self.start:stop] = reduced.to("cpu", self.storage_dtype)
        head = head.float().cpu()
        if self.logits is None:
            self.logits = torch.empty((self.total, *head.shape[1:]), dtype=head.dtype)
        self.logits[self.start:stop] = head
        self.labels[self.start:stop] = batch.labels.cpu()
        self.start = stop

    def finish(self, exit_points: list[int]) -> Activations:
        ordered = {s: self.features[s] for s in exit_points if s in self.features}
        return Activations(ordered, self.logits if self.logits is not None else torch.empty(0), self.labels)


@dataclass(frozen=True)
class SharedPass:
    """One read of the cache: the value, whether it was already held, and the wall seconds its
    computation took (whoever paid for it)."""

    value: Any
    cached: bool
    seconds: float


class ActivationCache:
    """In-process store keyed by (base backbone, split, name); one per run."""

    def __init__(self, storage_dtype: torch.dtype = torch.float16, share: bool = True) -> None:
        self.storage_dtype = storage_dtype
        self.share = share  # False: every request pays its own pass (to measure what sharing saves)
        self._store: dict[tuple[str, int, str], tuple[Dataset, Any, float]] = {}  # (dataset, value, seconds)
        self.forward_samples = 0  # what the activations really cost, summed over the run
        self.computed: dict[str, int] = {}  # name -> how many times it was computed (sharing off: every ask)
        self._wanted: dict[str, Reducer] = {}  # activation products a frozen pass fills on its way

    def want(self, reducer_key: str, reducer: Reducer) -> None:
        """Declare an activation product some method of the run will read (``read_activations`` with
        ``reducer_key``): the first ``frozen_pass`` over a split fills it from the same forward pass."""
        self._wanted.setdefault(reducer_key, reducer)

    def get(self, backbone: StagedBackbone, dataset: Dataset, reducer: Reducer,
            **keys: Any) -> tuple[Activations, bool]:
        """Activations of every exit point of ``backbone`` on ``dataset``; (value, was_cached).
        ``keys`` are ``read_activations``' keyword arguments."""
        shared = self.read_activations(backbone, dataset, reducer, **keys)
        return shared.value, shared.cached

    def read_activations(
        self,
        backbone: StagedBackbone,
        dataset: Dataset,
        reducer: Reducer,
        *,
        backbone_key: str,
        reducer_key: str,
        batch_size: int,
        device: torch.device | str,
    ) -> SharedPass:
        """``get`` with the pass's recorded seconds (what ``Budget.read_shared`` charges)."""
        shared = self.read(
            backbone_key, dataset, reducer_key, lambda: self._compute(backbone, dataset, reducer, batch_size, device))
        if not shared.cached:
            self.forward_samples += len(dataset)
        return shared

    def shared(self, backbone_key: str, dataset: Dataset, name: str,
               compute: Callable[[], Shared]) -> tuple[Shared, bool]:
        """``compute()``'s value for (backbone, ``dataset``, ``name``), computed once per run;
        (value, was_cached). With sharing off every ask computes its own."""
        shared = self.read(backbone_key, dataset, name, compute)
        return shared.value, shared.cached

    def read(self, backbone_key: str, dataset: Dataset, name: str, compute: Callable[[], Any]) -> SharedPass:
        """``shared`` with the seconds the computation took (recorded once, returned to every reader)."""
        key = (backbone_key, id(dataset), name)
        held = self._store.get(key)
        if held is not None and held[0] is dataset:  # the dataset is held, so its id cannot be reused
            return SharedPass(held[1], True, held[2])
        started = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - started
        self.computed[name] = self.computed.get(name, 0) + 1
        if self.share:
            self._store[key] = (dataset, value, seconds)
        return SharedPass(value, False, seconds)

    def peek(self, backbone_key: str, dataset: Dataset, name: str) -> Any | None:
        """The value already held for ``dataset`` under ``name`` (None: not computed, or sharing is off)."""
        held = self._store.get((backbone_key, id(dataset), name))
        return held[1] if held is not None and held[0] is dataset else None

    def keep_only(self, backbone_key: str) -> None:
        """Free everything computed for other backbones (cells come grouped by backbone)."""
        for key in [k for k in self._store if k[0] != backbone_key]:
            del self._store[key]

    def frozen_pass(self, backbone: StagedBackbone, dataset: Dataset, *, backbone_key: str, batch_size: int,
                    device: torch.device | str, description: str = "frozen pass") -> Iterator[FrozenBatch]:
        """One pass of the frozen ``backbone`` over ``dataset``, batch by batch (every exit point's output);
        on the way it fills each wanted activation product not yet held for ``dataset`` (sharing on), which
        then reads as already computed, at this pass's wall seconds."""
        fill = {key: reducer for key, reducer in self._wanted.items()
                if self.share and self.peek(backbone_key, dataset, key) is None}
        writers = {key: _ActivationWriter(len(dataset), reducer, self.storage_dtype) for key, reducer in fill.items()}
        started = time.perf_counter()
        for batch in _frozen_batches(backbone, dataset, batch_size, device, description):
            if writers:
                with torch.no_grad():
                    head = backbone.head(batch.last)
                for writer in writers.values():
                    writer.add(batch, head)
            yield batch
        seconds = time.perf_counter() - started
        for key, writer in writers.items():
            self._store[(backbone_key, id(dataset), key)] = (dataset, writer.finish(list(backbone.exit_points)),
                                                             seconds)
            self.computed[key] = self.computed.get(key, 0) + 1  # no forward samples: the pass was its runner's

    def _compute(self, backbone: StagedBackbone, dataset: Dataset, reducer: Reducer, batch_size: int,
                 device: torch.device | str) -> Activations:
        """One pass writing one product."""
        writer = _ActivationWriter(len(dataset), reducer, self.storage_dtype)
        for batch in _frozen_batches(backbone, dataset, batch_size, device, "shared activations"):
            with torch.no_grad():
                writer.add(batch, backbone.head(batch.last))
        return writer.finish(list(backbone.exit_points))


def _frozen_batches(backbone: StagedBackbone, dataset: Dataset, batch_size: int, device: torch.device | str,
                    description: str) -> Iterator[FrozenBatch]:
    """Every exit point's output of the frozen ``backbone`` (eval mode, no autograd), batch by batch."""
    backbone.eval()
    points = sorted(backbone.exit_points)
    for x, y in iterate_batches(dataset, batch_size, device=device, description=description):
        with torch.no_grad():
            outputs, last = stage_taps(backbone, x, points)
        yield FrozenBatch(dict(zip(points, outputs, strict=True)), last, y)
