"""Plain batched passes over a dataset (no budget, no augmentation)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from eebench.datasets import TensorImageDataset
from eebench.memory import TRIM_EVERY, trim_heap
from eebench.progress import progress


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    description: str | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` on ``device``; in-memory tensors skip the DataLoader."""
    total = len(dataset)
    with progress(description or "pass", total) as bar:
        if isinstance(dataset, TensorImageDataset):
            order = torch.randperm(total, generator=generator) if shuffle else None
            for batch, start in enumerate(range(0, total, batch_size), 1):
                if order is None:
                    x = dataset.images[start : start + batch_size]
                    y = dataset.labels[start : start + batch_size]
                else:
                    idx = order[start : start + batch_size]
                    x, y = dataset.images[idx], dataset.labels[idx]
                bar.advance(len(y))
                yield _to_device(x, device), y.to(device, non_blocking=True)
                if batch % TRIM_EVERY == 0:
                    trim_heap()
            trim_heap()
            return
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
        for batch, (x, y) in enumerate(loader, 1):
            bar.advance(len(y))
            yield _to_device(x, device), torch.as_tensor(y).to(device)
            if batch % TRIM_EVERY == 0:
                trim_heap()
        trim_heap()


def _to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Images go channels-last: convolutions run 25-30 % faster that way on this CPU."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
