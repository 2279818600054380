"""Frozen-backbone activations, computed in one pass and shared by every method that needs them.

Methods that train heads on a frozen backbone (internal classifiers, decision functions)
ask the context for reduced stage outputs instead of running the backbone themselves; the
first request for a (base backbone, split, reducer) pays one forward pass, every later one
- in the same cell or another cell of the run - reads the cache. The backbone must be in
eval mode and unchanged, which is exactly the frozen-backbone setting.

Anything else a method derives from the frozen backbone on a split (class-mean statistics,
say) is shared the same way through ``ActivationCache.shared``: the first method to ask
computes it, every later one with the same name reads it.

Every entry keeps the wall seconds its computation took, so the core charges each reader
(``Budget.read_shared``, via ``ExitStrategy.shared_activations`` / ``shared_result``) the
same pass at the same price, whichever cell paid for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset

from eebench.model import StagedBackbone
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

    @torch.no_grad()
    def _compute(self, backbone: StagedBackbone, dataset: Dataset, reducer: Reducer, batch_size: int,
                 device: torch.device | str) -> Activations:
        """One pass; outputs are written into tensors sized on the first batch, so the cache never
        needs a second copy of itself (list-then-cat would hold twice its size at the end)."""
        backbone.eval()
        wanted = set(backbone.exit_points)
        total = len(dataset)
        features: dict[int, torch.Tensor] = {}
        logits: torch.Tensor | None = None
        labels = torch.empty(total, dtype=torch.long)
        start = 0
        for x, y in iterate_batches(dataset, batch_size, device=device, description="shared activations"):
            stop = start + int(y.shape[0])
            out = x
            for index, out in backbone.iter_stages(x):
                if index in wanted:
                    reduced = reducer(index, out)
                    if index not in features:
                        features[index] = torch.empty((total, *reduced.shape[1:]), dtype=self.storage_dtype)
                    features[index][start:stop] = reduced.to("cpu", self.storage_dtype)
            head = backbone.head(out).float().cpu()
            if logits is None:
                logits = torch.empty((total, *head.shape[1:]), dtype=head.dtype)
            logits[start:stop] = head
            labels[start:stop] = y.cpu()
            start = stop
        ordered = {s: features[s] for s in backbone.exit_points if s in features}
        return Activations(ordered, logits if logits is not None else torch.empty(0), labels)
