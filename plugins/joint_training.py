"""Joint training of a backbone and its exit heads under a Budget, shared by BranchyNet and EENet.

Both methods start from the cached base network the harness passes in (``from_scratch``
reloads the backbone plugin's own initialisation first, as their papers train), train the
backbone and the heads together with Adam on augmented batches handed out by the Budget
(lr constant as the papers, or, by default, decayed to zero over the budget's planned
samples by a half cosine: fine-tuning a converged network at the papers' constant Adam lr
for a single epoch leaves it noticeably worse than where it started); the budget charges
the training MACs as forward + backward ≈ 3 × forward per sample (the convention every
built-in method follows) as it hands the batches out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from eebench.api import Budget, EebenchError, MethodContext, StagedBackbone, check_finite_loss


class MethodConfigError(EebenchError, ValueError):
    """A bad method parameter: a ValueError for callers, one clean line for the CLI."""


def reset_to_fresh(backbone: StagedBackbone, context: MethodContext, key: str) -> None:
    """Load freshly initialised weights (the backbone plugin's own init) into ``backbone``."""
    if context.fresh_backbone is None:
        raise MethodConfigError("from_scratch needs a fresh backbone from the harness (context.fresh_backbone)",
                                key=key)
    backbone.load_state_dict(context.fresh_backbone().state_dict())


def train_jointly(
    backbone: StagedBackbone,
    heads: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train: Dataset,
    budget: Budget,
    context: MethodContext,
    *,
    lr: float,
    weight_decay: float,
    per_sample_macs: float,
    description: str,
    key: str,
    schedule: str = "cosine",
) -> None:
    """Adam on backbone + heads, batches (augmented by ``context.augment``) from the budget.

    ``per_sample_macs`` is one forward pass of the whole multi-exit network; a sample is
    charged three times that (forward plus a backward taken as twice the forward).
    ``schedule`` "cosine" decays the lr to 0 over ``budget.planned_samples`` (constant when
    the budget cannot say, e.g. a seconds budget); "constant" keeps it.
    """
    parameters = [*backbone.parameters(), *heads.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    backbone.train()
    heads.train()
    seen = 0
    planned = budget.planned_samples if schedule == "cosine" else None
    for x, y in budget.batches(train, context.train_batch_size, device=context.device, augment=context.augment,
                               seed=context.seed, description=description, macs_per_sample=3.0 * per_sample_macs):
        if planned:
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(seen / planned, 1.0)))
        loss = loss_fn(x, y)
        check_finite_loss(loss, f"{description} training loss after {seen} samples", key=key)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += int(y.shape[0])
    backbone.eval()
    heads.eval()


SCHEDULES = ("cosine", "constant")


def check_schedule(schedule: str, key: str) -> str:
    if schedule not in SCHEDULES:
        raise MethodConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}", key=key)
    return schedule


def check_positive(value: float, key: str, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``allow_zero``); ``key`` is the parameter's name."""
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise MethodConfigError(f"{key} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}",
                                key=key)
    return value
