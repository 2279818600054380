"""Dataset contract and the split logic every dataset shares.

A dataset plugin returns a DatasetBundle of *un-augmented* train and test sets. The core
applies seeded subsets and the calibration split; augmentation is a batch-level function
applied only inside training loops, so statistics and calibration passes never see it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Subset

Augment = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


class TensorImageDataset(Dataset):
    """Images held in memory as one float tensor [N, C, H, W]; the fast path on a CPU."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError("images must be [N, C, H, W] with one label per image")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@dataclass
class DatasetBundle:
    """Train and test sets of one dataset plus what a backbone needs to know about them."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: Augment | None = None
    class_names: list[str] | None = None
    extra: dict[str, object] = field(default_factory=dict)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Labels of a dataset without decoding images where the dataset allows it."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.labels
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices)]
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            return torch.as_tensor(values).long()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def seeded_subset_indices(
    labels: torch.Tensor,
    *,
    seed: int,
    total: int | None = None,
    per_class: int | None = None,
) -> torch.Tensor:
    """Indices of a reproducible subset: ``per_class`` of each class, or ``total`` at random."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.numel(), generator=generator)
    if per_class is not None:
        picked = []
        for cls in labels.unique(sorted=True).tolist():
            members = order[labels[order] == cls]
            picked.append(members[:per_class])
        order = torch.cat(picked).sort().values
    if total is not None:
        order = order[:total].sort().values
    return order


def random_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    padding: int = 2,
    flip: bool = True,
) -> torch.Tensor:
    """Batch augmentation: a random crop of the zero-padded image and an optional h-flip."""
    batch, _, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
    rows = (dy[:, None] + torch.arange(height, device=device)[None, :])  # [B, H]
    cols = (dx[:, None] + torch.arange(width, device=device)[None, :])  # [B, W]
    if flip:
        flips = torch.rand(batch, generator=generator).to(device) < 0.5
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    channels = images.shape[1]
    index_rows = rows[:, None, :, None].expand(batch, channels, height, padded.shape[-1])
    out = padded.gather(2, index_rows)
    index_cols = cols[:, None, None, :].expand(batch, channels, height, width)
    return out.gather(3, index_cols)


def take(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """A subset that keeps in-memory datasets in memory (and so on the fast path)."""
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[indices], dataset.labels[indices])
    return Subset(dataset, indices.tolist())
