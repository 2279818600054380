"""Built-in training budgets: epochs, samples and wall seconds.

Each declares its parameters (``Params``, from ``eebench_plugins.manifests.budgets``): a positive,
finite amount with a sane ceiling, so ``eebench validate`` refuses a budget the run could not honour
(``epochs: .inf`` would overflow the sample count).
"""

from __future__ import annotations

from eebench.api import TrainingBudget
from eebench_plugins.manifests.budgets import EpochsParams, SamplesParams, SecondsParams


class EpochsBudget(TrainingBudget):
    """``epochs`` passes over the training split (fractions allowed)."""

    name = "epochs"
    Params = EpochsParams

    def __init__(self, epochs: float = 1) -> None:
        if epochs <= 0:
            raise ValueError("epochs must be > 0")
        super().__init__()
        self.epochs = float(epochs)

    def bind(self, train_size: int) -> None:
        self.max_samples = int(round(self.epochs * train_size))

    def describe(self) -> str:
        return f"{self.epochs:g} epoch" + ("" if self.epochs == 1 else "s")


class SamplesBudget(TrainingBudget):
    """A fixed number of training samples, whatever the dataset size."""

    name = "samples"
    Params = SamplesParams

    def __init__(self, samples: int) -> None:
        if samples <= 0:
            raise ValueError("samples must be > 0")
        super().__init__(max_samples=int(samples))


class SecondsBudget(TrainingBudget):
    """Wall-clock seconds of fitting; machine-dependent by nature, so results say so."""

    name = "seconds"
    Params = SecondsParams

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        super().__init__(max_seconds=float(seconds))
