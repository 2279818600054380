"""Training budgets: the harness, not the method, hands out batches and stops when spent.

A method asks its Budget for training batches; the iterator ends when the budget is
spent, and the Spend records what was really used, so methods are compared at matched
training cost.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Dataset

from eebench.datasets import Augment
from eebench.passes import iterate_batches


@dataclass
class Spend:
    """What a method really used while fitting."""

    samples: int = 0
    batches: int = 0
    seconds: float = 0.0
    training_macs: float = 0.0
    extra_forward_samples: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class Budget(ABC):
    """A rule for how much training data a method may consume."""

    name: str = "budget"

    def __init__(self) -> None:
        self.spend = Spend()
        self._started: float | None = None

    @abstractmethod
    def exhausted(self) -> bool:
        """True once no further batch may be handed out."""

    @abstractmethod
    def describe(self) -> str:
        """Short human label, e.g. ``1 epoch``."""

    def bind(self, train_size: int) -> None:
        """Learn the training-set size (epoch budgets turn epochs into samples here)."""
        return None

    @property
    def planned_samples(self) -> int | None:
        """Samples the budget will hand out, when known in advance (for LR schedules)."""
        return None

    def covers(self, samples: int) -> bool:
        """True when the budget will certainly hand out ``samples`` samples, whatever the clock:
        a method may then take a result computed on exactly those samples from a shared cache
        instead of drawing them one batch at a time (it still records them in ``spend``)."""
        return False

    def start(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def elapsed(self) -> float:
        return 0.0 if self._started is None else time.perf_counter() - self._started

    def batches(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        augment: Augment | None = None,
        shuffle: bool = True,
        seed: int = 0,
        description: str = "fit",
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches until the budget is spent (epoch after epoch)."""
        self.start()
        generator = torch.Generator().manual_seed(seed)
        epoch = 0
        try:
            while not self.exhausted():
                stream = iterate_batches(
                    dataset, batch_size, device=device, shuffle=shuffle, generator=generator,
                    description=f"{description} epoch {epoch + 1}",
                )
                for x, y in stream:
                    if self.exhausted():
                        stream.close()
                        return
                    x, y = self._trim(x, y)
                    if augment is not None:
                        x = augment(x, generator)
                    self.spend.samples += int(y.shape[0])
                    self.spend.batches += 1
                    yield x, y
                epoch += 1
        finally:
            self.spend.seconds = self.elapsed()

    def _trim(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut the last batch so a sample budget is met exactly."""
        return x, y


class TrainingBudget(Budget):
    """Budgets counted in samples (epochs are a number of samples too)."""

    def __init__(self, max_samples: int | None = None, max_seconds: float | None = None) -> None:
        super().__init__()
        self.max_samples = max_samples
        self.max_seconds = max_seconds

    @property
    def planned_samples(self) -> int | None:
        return self.max_samples

    def covers(self, samples: int) -> bool:
        return self.max_seconds is None and (self.max_samples is None or self.max_samples >= samples)

    def exhausted(self) -> bool:
        if self.max_samples is not None and self.spend.samples >= self.max_samples:
            return True
        return self.max_seconds is not None and self.elapsed() >= self.max_seconds

    def _trim(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_samples is None:
            return x, y
        left = self.max_samples - self.spend.samples
        return x[:left], y[:left]

    def describe(self) -> str:
        parts = []
        if self.max_samples is not None:
            parts.append(f"{self.max_samples} samples")
        if self.max_seconds is not None:
            parts.append(f"{self.max_seconds:g} s")
        return ", ".join(parts) or "unlimited"
