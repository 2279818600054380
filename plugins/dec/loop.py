"""What every DEC training phase shares: budgeted mini-batches, optimisers, spend accounting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from eebench.api import BatchStream, Budget, check_finite_loss
from eebench_plugins.dec.recipes import DECRecipe


def linear_macs(layers: list[nn.Linear]) -> float:
    """Multiply-accumulates of a chain of dense layers for one sample (fvcore's count)."""
    return float(sum(layer.in_features * layer.out_features for layer in layers))


class Meter:
    """DEC's training under the cell's budget: the budget hands out every mini-batch and charges it.

    DEC trains on tensors it extracted, so its mini-batches are index batches the budget
    hands out (``Budget.index_batches``: reshuffled every epoch by DEC's generator, counted
    as training samples at 3x their forward MACs, forward plus backward, the harness's
    convention, and stopped when the budget is spent); full-data passes (k-means inputs,
    target distributions, frozen features, the exits' fit) are charged as extra forward
    samples (``Budget.charge_forward``). Those passes are needed even once the budget is spent
    (k-means of every exit), so a seconds budget too short for them leaves DEC over budget
    (the runner fails the cell): cap DEC with a samples budget, as the suites do.
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        budget.start()

    @property
    def exhausted(self) -> bool:
        return self.budget.exhausted()

    def batches(self, size: int, batch_size: int, generator: torch.Generator, forward_macs: float) -> BatchStream:
        """Index mini-batches into ``size`` samples until the budget is spent (or the phase stops)."""
        return self.budget.index_batches(size, batch_size, generator, macs_per_sample=3.0 * forward_macs)

    def forward(self, samples: int, forward_macs: float) -> None:
        self.budget.charge_forward(samples, forward_macs)


def make_optimizer(kind: str, params: list[nn.Parameter], lr: float, momentum: float) -> torch.optim.Optimizer:
    """Adam or SGD with momentum, fused: one kernel per step is 3-7x faster on a CPU than
    torch's default per-tensor loop, which dominates small-batch steps of these wide layers."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, fused=True)


def optimizer_for(params: list[nn.Parameter], recipe: DECRecipe) -> tuple[torch.optim.Optimizer, object]:
    """The pre-training optimiser: SGD with the paper's step decay, or Adam (quick recipe)."""
    optimizer = make_optimizer(recipe.optimizer, params, recipe.lr, recipe.momentum)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, recipe.lr_step, 0.1)


@torch.no_grad()
def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``fn`` over the rows of ``data`` in chunks, without gradients."""
    return torch.cat([fn(data[start : start + chunk]) for start in range(0, data.shape[0], chunk)])


def check_finite(loss: torch.Tensor, phase: str, step: int, key: str) -> None:
    """The core's NaN-loss check, naming the DEC phase and the lr parameter (``key``) that drives it."""
    check_finite_loss(loss, f"DEC {phase} loss at iteration {step}", key=key, hint=f"try a lower {key}")


@dataclass
class PhaseLog:
    """What one training phase did (kept in the result's fit_info)."""

    name: str
    iterations: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    seconds: float = 0.0
    stopped: str = "iterations"
    extra: dict[str, object] = field(default_factory=dict)

    def record(self, loss: float) -> None:
        if self.first_loss is None:
            self.first_loss = loss
        self.last_loss = loss
