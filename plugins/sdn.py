"""SDN: Shallow-Deep Networks (Kaya, Hong, Dumitras, ICML 2019), IC-only training on a
frozen backbone.

Six internal classifiers (``eebench_plugins.internal_classifiers``, the reference
``InternalClassifier``) sit at the first exit points whose cumulative backbone cost
reaches 15, 30, 45, 60, 75 and 90 % of the total (``fractions``; a coarse backbone may
give fewer, duplicates are dropped). The backbone's own head is the final exit. At
inference exit j predicts argmax of its IC's softmax and exits when the max softmax is
>= T (``strict = False``); one threshold shared by all ICs is swept by default, as SDN
does, and ``calibrator: {name: per-exit-bisection}`` gives per-exit thresholds.

Training (spec §2.3, IC-only): Adam (lr 1e-3, ``weight_decay`` default 0), loss = the sum
of the ICs' cross-entropies with equal weights (the final output is excluded); when the
budget plans more than one epoch the lr drops ×0.1 after 60 % of the planned samples (the
reference's epoch 15 of 25). The backbone stays in eval mode and is never run in training
mode, so its weights and BatchNorm buffers are untouched (the reference calls
``model.train()`` and lets the frozen BN statistics drift; that bug is not reproduced).

Deviations, all in ``notes``:
- ICs train on CACHED, UN-AUGMENTED activations: one shared pass of the frozen backbone
  over the training split stores each exit point's max- and avg-pooled maps (float16,
  cast to float32 for training); every budgeted batch reads them by sample index. The
  reference trains ICs on augmented images; eebench trades that for never paying the
  frozen backbone twice. The core charges the pass to the method as if it ran alone
  (``extra_forward_samples`` = training size, that many full-backbone MACs, and the pass's
  recorded seconds whoever paid for it, so seconds do not depend on cell order);
- fallback ``"most_confident"`` (the reference): when no IC fires, SDN returns the most
  confident output among all ICs and the final head. The trace contract makes the last
  exit always exit, so the final exit's prediction (and score) here is that of the most
  confident exit for the sample, computed in ``exit_outputs``; as that needs every IC,
  the method is then ``chained`` (switching an IC off saves nothing). ``"final"``
  (default) returns the backbone head's prediction, like every other method;
- costs: exit j pays the backbone through its stage plus each evaluated IC's MACs, counted
  by the core on the IC module (``InternalClassifier.macs``: its two poolings from the core's
  cost table, every value each window reads, + Linear in·K; the α mix is free); the softmax
  (3K, the cost table's) only with ``count_softmax``; the final exit is the plain backbone,
  overhead 0. Training MACs =
  budgeted samples × 3 × Σ IC MACs (forward + a backward taken as twice the forward) +
  training size × the full backbone (the shared activation pass).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from eebench import hookimpl
from eebench.api import (
    Activations,
    Budget,
    EebenchError,
    ExitCosts,
    ExitOutputs,
    ExitStrategy,
    MethodContext,
    Params,
    StagedBackbone,
    TensorImageDataset,
    check_finite_loss,
    softmax_macs,
)
from eebench_plugins.internal_classifiers import InternalClassifier, ic_reducer

SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)
REDUCER_KEY = "sdn-pool"  # reduce_for_ic outputs: shared with every IC-based method
FALLBACKS = ("final", "most_confident")
LR_DROP_AT = 0.6  # the reference drops the lr at epoch 15 of 25
LR_DROP_FACTOR = 0.1


def index_dataset(labels: torch.Tensor) -> TensorImageDataset:
    """Sample indices posing as 1x1 images, so the Budget hands out (and counts) cached samples."""
    count = int(labels.shape[0])
    return TensorImageDataset(torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1), labels)


class ICParams(Params):
    """The internal-classifier parameters SDN, E²CM+SDN and BWDS share."""

    fractions: list[float] = Field(default_factory=lambda: list(SDN_FRACTIONS))
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < f <= 1 for f in value):
            raise ValueError(f"fractions must be a non-empty list of numbers in (0, 1], got {value}")
        return value


class SDNParams(ICParams):
    fallback: Literal["final", "most_confident"] = "final"
    count_softmax: bool = False


class SDN(ExitStrategy):
    """SDN internal classifiers on a frozen backbone (see the module docstring)."""

    Params = SDNParams

    strict = False
    default_calibrator = "shared-threshold"
    notes = (
        "SDN (IC-only, frozen backbone): 6 mixed-pooling ICs at 15–90 % of backbone MACs, Adam, summed CE; "
        "ICs trained on cached un-augmented activations (the reference augments); exit when max softmax ≥ T. "
        "Calibration trace scored from the shared fp16 activations the ICs trained on; test trace from the images."
    )

    def __init__(
        self,
        backbone: StagedBackbone,
        context: MethodContext,
        fractions: Sequence[float] = SDN_FRACTIONS,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        fallback: str = "final",
        count_softmax: bool = False,
    ) -> None:
        super().__init__(backbone, context)
        _check_params(fractions, lr, weight_decay, fallback)
        self.lr, self.weight_decay, self.fallback = float(lr), float(weight_decay), fallback
        self.count_softmax = bool(count_softmax)
        self.chained = fallback == "most_confident"  # the final output needs every IC
        if self.chained:
            self.notes += " Fallback: most confident of all exits (SDN's rule); every IC is paid."
        self.ic_stages = place_ics(backbone, context, list(fractions))
        self.ics = self._build_ics()

    def _build_ics(self, extra_inputs: int = 0) -> nn.ModuleList:
        """ICs seeded by the cell seed (α ~ U[0,1), Linear default init) without touching the global RNG."""
        shapes = self.context.stage_costs.stage_shapes
        k = self.context.num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.context.seed)
            ics = nn.ModuleList(InternalClassifier(shapes[s], k, extra_inputs) for s in self.ic_stages)
        return ics.to(self.context.device)

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.ics]

    def ic_macs(self) -> list[float]:
        extra = softmax_macs(self.context.num_classes) if self.count_softmax else 0.0
        return [ic.macs() + extra for ic in self.ics]

    def fit(self, train: Dataset, budget: Budget) -> None:
        if not self.ic_stages:
            return  # nothing to train: the backbone's head is the only exit
        self.backbone.eval()
        activations = self.shared_activations(train, ic_reducer, REDUCER_KEY, budget)
        features = [activations.features[s] for s in self.ic_stages]
        self._train_ics(features, activations.labels, budget)

    def _train_ics(self, features: list[torch.Tensor], labels: torch.Tensor, budget: Budget,
                   extras: list[torch.Tensor] | None = None) -> None:
        """Adam on the summed IC losses, batches (of cached-sample indices) from the budget, which
        charges 3 × Σ IC MACs per sample.

        ``extras`` holds per-IC extra inputs per sample (E²CM+SDN's distances), if any.
        """
        ctx = self.context
        self.ics.train()
        optimizer = torch.optim.Adam(self.ics.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        drop_at = _lr_drop_at(budget, len(labels))
        per_sample = 3.0 * math.fsum(self.ic_macs())
        seen = 0
        for x, y in budget.batches(index_dataset(labels), ctx.train_batch_size, device="cpu", seed=ctx.seed,
                                   description="sdn ICs", macs_per_sample=per_sample):
            rows = x.view(-1).long()
            target = y.to(ctx.device)
            loss = sum(
                loss_fn(ic.forward_pooled(f[rows].to(ctx.device).float(),
                                          None if extras is None else extras[k][rows].to(ctx.device)), target)
                for k, (ic, f) in enumerate(zip(self.ics, features, strict=True))
            )
            check_finite_loss(loss, f"{type(self).__name__} IC loss after {seen} samples")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += int(y.shape[0])
            if drop_at is not None and seen >= drop_at:
                drop_lr(optimizer, self.lr)
                drop_at = None
        self.ics.eval()

    def _walk(self, x: torch.Tensor) -> Iterator[tuple[InternalClassifier, torch.Tensor]]:
        """(IC, stage output) at every IC stage; the last stage output is kept in ``self._last``."""
        by_stage = dict(zip(self.ic_stages, self.ics, strict=True))
        out = x
        for index, out in self.backbone.iter_stages(x):
            if index in by_stage:
                yield by_stage[index], out
        self._last = out

    @torch.no_grad()
    def exit_outputs(self, x: torch.Tensor) -> ExitOutputs:
        ic_logits = [ic(out) for ic, out in self._walk(x)]
        return self.outputs_from_logits(ic_logits, self.backbone.head(self._last))

    def outputs_from_logits(self, ic_logits: list[torch.Tensor], head_logits: torch.Tensor,
                            extras: list[torch.Tensor] | None = None) -> ExitOutputs:
        """The exit rule on the ICs' and the head's logits: one code path for live and cached inputs."""
        logits = [*ic_logits, head_logits]
        scores = torch.stack([torch.softmax(z.double(), dim=1).max(1).values for z in logits])
        preds = torch.stack([z.argmax(1) for z in logits])
        if self.fallback == "most_confident":
            preds, scores = most_confident_final(preds, scores)
        return ExitOutputs(preds, scores)

    def cached_extras(self, dataset: Dataset) -> list[torch.Tensor] | None:
        """Per-IC extra inputs for the samples of ``dataset`` (E²CM+SDN's distances); none for SDN."""
        return None

    def cached_outputs(self, dataset: Dataset) -> Iterator[tuple[ExitOutputs, torch.Tensor]] | None:
        """Exit outputs from the shared activations (calibration = training split by default), so the
        calibration trace does not run the backbone again. The ICs read the same cached (fp16) features
        they were trained on; the test trace still runs the images."""
        activations = self.cached_activations(dataset, REDUCER_KEY)
        needs_extras = any(ic.extra_inputs for ic in self.ics)
        extras = self.cached_extras(dataset) if needs_extras else None
        if activations is None or not self.ic_stages or (needs_extras and extras is None):
            return None
        return self._outputs_from_cache(activations, extras)

    def _outputs_from_cache(self, activations: Activations,
                            extras: list[torch.Tensor] | None) -> Iterator[tuple[ExitOutputs, torch.Tensor]]:
        device, step = self.context.device, self.context.batch_size
        for start in range(0, len(activations), step):
            rows = slice(start, start + step)
            batch_extras = None if extras is None else [e[rows].to(device) for e in extras]
            with torch.no_grad():
                ic_logits = [ic.forward_pooled(activations.features[s][rows].to(device).float(),
                                               None if batch_extras is None else batch_extras[k])
                             for k, (s, ic) in enumerate(zip(self.ic_stages, self.ics, strict=True))]
                outputs = self.outputs_from_logits(ic_logits, activations.logits[rows].to(device), batch_extras)
            yield outputs, activations.labels[rows]

    def exit_costs(self) -> ExitCosts:
        stage_costs = self.context.stage_costs
        backbone = [stage_costs.through(s) for s in self.ic_stages] + [stage_costs.total]
        overhead = [*self.ic_macs(), 0.0]
        return ExitCosts(torch.tensor(backbone, dtype=torch.float64),
                         torch.tensor(overhead, dtype=torch.float64), stage_costs.total)

    def exit_names(self) -> list[str]:
        return [f"ic@block{s}" for s in self.ic_stages] + ["final"]


def most_confident_final(preds: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the last exit's prediction and score by the most confident exit's (ties: earliest),
    the reference's output when no IC fires."""
    best = scores.argmax(0, keepdim=True)  # [1, B]
    preds, scores = preds.clone(), scores.clone()
    preds[-1] = preds.gather(0, best)[0]
    scores[-1] = scores.gather(0, best)[0]
    return preds, scores


def lr_drop_at(planned: int | None, train_size: int) -> float | None:
    """Samples after which the lr drops: 60 % of a plan (a budget's, or a BWDS phase's share),
    only for plans over one epoch."""
    if planned is None or planned <= train_size:
        return None
    return LR_DROP_AT * planned


def _lr_drop_at(budget: Budget, train_size: int) -> float | None:
    return lr_drop_at(budget.planned_samples, train_size)


def drop_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The reference's single step decay: every group to ``lr`` × 0.1."""
    for group in optimizer.param_groups:
        group["lr"] = lr * LR_DROP_FACTOR


def _check_params(fractions: Sequence[float], lr: float, weight_decay: float, fallback: str) -> None:
    """The constructor's own checks (for direct use; the harness checks ``SDNParams`` first)."""
    if not fractions or any(not 0 < float(f) <= 1 for f in fractions):
        raise EebenchError(f"fractions must be a non-empty list of numbers in (0, 1], got {list(fractions)}",
                           key="fractions")
    if not lr > 0:
        raise EebenchError(f"lr must be > 0, got {lr}", key="lr")
    if not weight_decay >= 0:
        raise EebenchError(f"weight_decay must be >= 0, got {weight_decay}", key="weight_decay")
    if fallback not in FALLBACKS:
        raise EebenchError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}", key="fallback")


def place_ics(backbone: StagedBackbone, context: MethodContext, fractions: list[float]) -> list[int]:
    """First exit point reaching each cost fraction, the last stage excluded.

    The last stage feeds the backbone's own classifier, so an IC there would duplicate the
    final exit; a fraction no earlier exit point reaches gets the last one before it (on
    ResNet-56 that is the reference code's 88.9 % IC for the nominal 90 %).
    """
    candidates = [s for s in backbone.exit_points if s != len(backbone.stages) - 1]
    stages = context.stage_costs.stages_at_fractions(candidates, fractions)
    costs = context.stage_costs
    unreached = bool(candidates) and any(costs.through(candidates[-1]) < f * costs.total for f in fractions)
    if unreached and candidates[-1] not in stages:  # not when fractions merely share an exit point
        stages.append(candidates[-1])
    return stages


@hookimpl
def register_exit_strategies(register) -> None:
    register("sdn", SDN)
