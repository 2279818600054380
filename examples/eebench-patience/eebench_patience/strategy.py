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
    ExitOutputs,
    ExitStrategy,
    MethodContext,
    StagedBackbone,
    check_finite_loss,
    count_macs,
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
    including j predict what exit j predicts."""
    counters = torch.ones_like(preds)
    for j in range(1, preds.shape[0]):
        counters[j] = torch.where(preds[j] == preds[j - 1], counters[j - 1] + 1, 1)
    return counters


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

    def _features(self, x: torch.Tensor, *, through: int | None = None):
        """Yield (classifier, feature) at each IC stage; stops after stage ``through`` if given.
        The last stage output is kept in ``self._last`` when the whole backbone ran."""
        by_stage = dict(zip(self.exit_stages, self.classifiers, strict=True))
        for index, out in self.backbone.iter_stages(x):
            if index in by_stage:
                yield by_stage[index], out
            if through is not None and index >= through:
                return
        self._last = out

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
                features = [(ic, out) for ic, out in self._features(x, through=last)]
            loss = sum(loss_fn(ic(out), y) for ic, out in features)
            check_finite_loss(loss, f"patience IC loss after {seen} samples")  # one line naming methods[i].params.lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += int(y.shape[0])
        self.classifiers.eval()

    @torch.no_grad()
    def exit_outputs(self, x: torch.Tensor) -> ExitOutputs:
        preds = [ic(out).argmax(1) for ic, out in self._features(x)]
        preds.append(self.backbone.head(self._last).argmax(1))
        stacked = torch.stack(preds)
        return ExitOutputs(stacked, patience_counters(stacked).float())

    def exit_costs(self) -> ExitCosts:
        stage_costs = self.context.stage_costs
        backbone = [stage_costs.through(s) for s in self.exit_stages] + [stage_costs.total]
        overhead = [*self.ic_macs, 0.0]
        return ExitCosts(torch.tensor(backbone, dtype=torch.float64),
                         torch.tensor(overhead, dtype=torch.float64), stage_costs.total)

    def exit_names(self) -> list[str]:
        return [f"block{s}" for s in self.exit_stages] + ["final"]
