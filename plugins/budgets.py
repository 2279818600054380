"""Built-in training budgets: epochs, samples and wall seconds."""

from __future__ import annotations

from eebench import hookimpl
from eebench.api import TrainingBudget


class EpochsBudget(TrainingBudget):
    """``epochs`` passes over the training split (fractions allowed)."""

    name = "epochs"

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

    def __init__(self, samples: int) -> None:
        if samples <= 0:
            raise ValueError("samples must be > 0")
        super().__init__(max_samples=int(samples))


class SecondsBudget(TrainingBudget):
    """Wall-clock seconds of fitting; machine-dependent by nature, so results say so."""

    name = "seconds"

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        super().__init__(max_seconds=float(seconds))


@hookimpl
def register_budgets(register) -> None:
    register("epochs", EpochsBudget)
    register("samples", SamplesBudget)
    register("seconds", SecondsBudget)
