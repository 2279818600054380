"""PABEE: patience-based early exit (Zhou et al., "BERT Loses Patience: Fast and Robust
Inference with Early Exit", NeurIPS 2020), as an eebench exit strategy.

An internal classifier (IC: global average pooling + one Linear layer) sits at every exit
point of the backbone except the last stage; the backbone's own head is the final exit.
The ICs are trained on the frozen backbone (eval mode, no gradient reaches it) with Adam
and the sum of the ICs' cross-entropies, as PABEE's weighted sum with equal weights.

At inference a sample leaves at exit j once the predictions of the last k exits
(j-k+1 .. j) all agree. In the ExitStrategy contract the score of exit j is the patience
counter: the number of consecutive exits up to and including j whose prediction equals
exit j's prediction. The rule is ``counter >= T`` (``strict = False``) with one threshold
T = k shared by every exit (the ``shared-threshold`` calibrator sweeps it). PABEE counts
"unchanged predictions" from 0, so its patience t is T = t + 1 here.

The counter is per-sample state: ``init_state`` starts it, and ``exit_step`` reads the previous
exit's prediction and counter from ``state`` and writes its own back, so the core's executor
(which drops rows as they leave) and the trace make the same calls. The counter at exit j needs
every earlier exit, so the method is ``chained``: the core evaluates every exit, even one that
is switched off, and the cost model pays for it.

Costs and their approximations:
- exit j pays the backbone up to its stage (``StageCosts.through``) plus every evaluated
  IC's MACs, counted like the backbone by ``count_macs`` on the IC module (C*H*W for the
  pooling + C*K for the Linear); the patience counter (one comparison with the previous
  exit's class) is the exit's decision, uncounted as every method's threshold test is
  (``eebench.costs``); the final exit is the plain backbone with no overhead of its own; ``chained``
  tells the harness that every IC before the exit is paid even when its own exit is off;
- training MACs per sample = backbone forward up to the last IC's stage (the only part the
  fit runs) + 3x the ICs' forward MACs (forward, plus a backward taken as twice the forward);
  the backbone gets no backward pass because it is frozen.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

from eebench.api import (
    Budget,
    ExitCosts,
    ExitState,
    ExitStrategy,
    MethodContext,
    MethodReport,
    StagedBackbone,
    StepOutput,
    check_finite_loss,
    count_macs,
    exit_costs_at,
    stage_taps,
)


def internal_classifier(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Global average pooling + one Linear to K classes, for a [C, H, W] (or flat [D]) feature."""
    if len(feature_shape) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(feature_shape[0], num_classes))
    if len(feature_shape) == 1:
        return nn.Linear(feature_shape[0], num_classes)
    raise ValueError(f"patience: exit features must be [C, H, W] or [D], got {list(feature_shape)}")


def patience_counters(preds: torch.Tensor) -> torch.Tensor:
    """[E, B] predictions -> [E, B] run lengths: how many consecutive exits up to and
    including j predict what exit j predicts (what ``exit_step`` computes one exit at a time)."""
    counters = torch.ones_like(preds)
    for j in range(1, preds.shape[0]):
        counters[j] = next_counter(preds[j], preds[j - 1], counters[j - 1])
    return counters


def next_counter(pred: torch.Tensor, previous: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """One exit's run length from the previous exit's prediction and run length."""
    return torch.where(pred == previous, counter + 1, 1)


class PatienceExit(ExitStrategy):
    """PABEE on a frozen backbone: linear ICs at every exit point, exit once k exits agree.

    The score of exit j is its patience counter, the rule is ``counter >= T`` (``strict =
    False``) and, as PABEE uses one patience value for every layer, the default calibrator
    is ``shared-threshold``: a single T (= patience k) shared by all exits is swept.
    """

    strict = False
    chained = True  # the counter at exit j needs every earlier IC: switching one off saves nothing
    default_calibrator = "shared-threshold"
    notes = (
        "Patience (PABEE, example plugin): GAP+Linear ICs trained on the frozen backbone (Adam, summed CE); "
        "exit when the last k exits agree, one shared k swept."
    )

    def __init__(self, backbone: StagedBackbone, context: MethodContext, lr: float = 1e-3) -> None:
        super().__init__(backbone, context)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = float(lr)
        final_stage = len(backbone.stages) - 1
        self.exit_stages = [s for s in backbone.exit_points if s != final_stage]
        shapes = context.stage_costs.stage_shapes
        self.classifiers = nn.ModuleList(
            internal_classifier(tuple(shapes[s]), context.num_classes) for s in self.exit_stages
        ).to(context.device)
        # fvcore, on CPU at batch 1, the same counter the core uses for the backbone.
        self.ic_macs = [
            count_macs(internal_classifier(tuple(shapes[s]), context.num_classes), torch.zeros(1, *shapes[s]))
            for s in self.exit_stages
        ]

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.classifiers]

    def exit_taps(self) -> list[int]:
        return list(self.exit_stages)

    def fit(self, train: Dataset, budget: Budget) -> None:
        ctx = self.context
        if not self.exit_stages:
            return  # nothing to train: the backbone's head is the only exit
        self.backbone.eval()  # frozen: eval-mode BatchNorm, and no_grad below
        self.classifiers.train()
        optimizer = torch.optim.Adam(self.classifiers.parameters(), lr=self.lr)
        loss_fn = nn.CrossEntropyLoss()
        last = self.exit_stages[-1]
        per_sample = ctx.stage_costs.through(last) + 3.0 * math.fsum(self.ic_macs)
        seen = 0
        for x, y in budget.batches(train, ctx.train_batch_size, device=ctx.device, augment=ctx.augment,
                                   seed=ctx.seed, description="patience ICs", macs_per_sample=per_sample):
            with torch.no_grad():
                features, _ = stage_taps(self.backbone, x, self.exit_stages, through=last)
            loss = sum(loss_fn(ic(out), y) for ic, out in zip(self.classifiers, features, strict=True))
            check_finite_loss(loss, f"patience IC loss after {seen} samples")  # one line naming methods[i].params.lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += int(y.shape[0])
        self.classifiers.eval()

    def init_state(self, x: torch.Tensor) -> ExitState:
        """No exit seen yet: no previous prediction (-1 matches no class) and a run length of 0."""
        rows = int(x.shape[0])
        return {"previous": torch.full((rows,), -1, dtype=torch.long, device=x.device),
                "counter": torch.zeros(rows, dtype=torch.long, device=x.device)}

    @torch.no_grad()
    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        """Exit j's class (its IC, or the backbone's head for the final exit) and its patience counter,
        carried in ``state`` from the previous exit."""
        head = self.classifiers[j] if j < len(self.classifiers) else self.backbone.head
        pred = head(features).argmax(1)
        counter = next_counter(pred, state["previous"], state["counter"])
        state["previous"], state["counter"] = pred, counter
        return StepOutput(pred, counter.float())

    def exit_costs(self) -> ExitCosts:
        return exit_costs_at(self.context.stage_costs, self.exit_stages, self.ic_macs)

    def report(self) -> MethodReport:
        return MethodReport(exit_names=[f"block{s}" for s in self.exit_stages] + ["final"], notes=self.notes)
