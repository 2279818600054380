"""Budgets hand out batches and stop the method; the spend records what was used."""

from __future__ import annotations

import torch

from eebench.datasets import TensorImageDataset
from eebench_plugins.budgets import EpochsBudget, SamplesBudget, SecondsBudget


def dataset(n: int = 100) -> TensorImageDataset:
    return TensorImageDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 10)


def test_epochs_budget_hands_out_exactly_that_many_epochs() -> None:
    budget = EpochsBudget(2.5)
    budget.bind(100)
    seen = torch.cat([x.flatten() for x, _ in budget.batches(dataset(), 30, seed=1)])
    assert seen.numel() == 250 and budget.spend.samples == 250
    counts = seen.long().bincount(minlength=100)
    assert bool((counts >= 2).all()) and int((counts == 3).sum()) == 50  # two full epochs, half a third


def test_samples_budget_trims_the_last_batch() -> None:
    budget = SamplesBudget(45)
    batches = [len(y) for _, y in budget.batches(dataset(), 20)]
    assert batches == [20, 20, 5] and budget.spend.batches == 3


def test_seconds_budget_stops_the_loop() -> None:
    budget = SecondsBudget(0.2)
    for _ in budget.batches(dataset(10), 5):
        torch.ones(100, 100) @ torch.ones(100, 100)  # keep iterating well past 0.2 s if nothing stops us
        if budget.spend.samples > 10**7:
            break
    assert 0.2 <= budget.spend.seconds < 5.0
    assert budget.spend.samples < 10**7


def test_augmentation_only_where_asked() -> None:
    calls = []

    def augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        calls.append(len(x))
        return x + 1000

    budget = EpochsBudget(1)
    budget.bind(100)
    out = torch.cat([x.flatten() for x, _ in budget.batches(dataset(), 50, augment=augment, shuffle=False)])
    assert calls == [50, 50] and bool((out >= 1000).all())
