"""The SDN internal classifier (Kaya et al., ICML 2019, ``InternalClassifier``): a shared
building block for every built-in method that hangs ICs on a backbone (SDN, BWDS,
E²CM+SDN).

For a [C, s, s] feature map the IC pools with kernel r = floor(s/4) (so the map shrinks
to about 4x4) when s >= 4, and does not pool when s < 4. The pooled map is the mix

    α · MaxPool_r(x) + (1 − α) · AvgPool_r(x)

with ONE learnable scalar α, initialised Uniform[0, 1) like the reference ``torch.rand(1)``
and never clamped; then flatten and a single ``Linear(C·(s/r)² [+ extra_inputs], K)``. No
BatchNorm, no ReLU, no hidden layer. A flat [D] feature gets a plain ``Linear(D, K)``.

Because the max- and avg-pooled maps do not depend on α, they can be computed once by a
frozen backbone and cached (``reduce_for_ic``: both maps stacked, [B, 2, C, s/r, s/r]);
``InternalClassifier.forward_pooled`` applies the α mix to such a cached pair, so training
on cached activations is the same function as running the IC on the live stage output.

MACs per IC (``InternalClassifier.macs``): ``count_macs`` on the IC itself at batch 1, the
core's counter (``eebench.costs``), which gives
- pooling (when r is defined): each of the two pools reads every value of its windows once,
  2·C·(s/r)²·r² (= 2·C·s² when r divides s), priced by the core's cost table (fvcore
  itself skips max- and avg-pooling);
- α mixing: 0 (elementwise arithmetic between tensors, free as the backbone's residual
  adds are);
- Linear: in · K with in = C·(s/r)² + extra_inputs (bias adds free).

Placement (``place_ics``). Each IC gets a cost fraction (SDN's 15, 30, ..., 90 %) and sits on an
exit point before the last stage (an IC there would duplicate the backbone's own head), chosen by
``placement``:
- ``"nearest"`` (default): the exit point whose cumulative backbone MACs are nearest the fraction,
  ties to the cheaper one. Fractions are served in ascending order and every IC gets its own exit
  point: a fraction whose nearest point is already taken gets the nearest free one (ties to the
  cheaper), so a backbone with at least as many exit points as fractions gets one IC per
  fraction; with fewer, each exit point gets one IC and the remaining fractions are dropped.
  On ResNet-20 (nine blocks of about 1/9 of the MACs each; 28x28 inputs) SDN's fractions give
  ICs at blocks 1, 3, 4, 5, 7, 8: 12.1/35.5/44.6/56.2/76.9/88.4 % of the MACs, the first below 20 %;
- ``"first-at-least"`` (the spec's §2.1 proposal, the rule before issue 13): the first exit point
  whose cumulative MACs reach the fraction; fractions reaching the same point share one IC; a
  fraction no point before the last stage reaches gets the last one (ResNet-56's 88.9 % IC for
  the nominal 90 %). On ResNet-20 that gives blocks 2, 3, 5, 6, 7, 8 (23.8 to 88.4 %), so no
  IC-based method can then exit below 0.24.
The methods report where their ICs really sit (``ICBank.placement_note``, in the notes, and
``ICBank.placement_info``, in ``fit_info``).

``ICBank`` is the bank of ICs SDN, BWDS and E²CM+SDN each hold (composition, not a shared
base class): where the ICs sit (``place_ics``), how they are built (seeded by the cell seed,
with optional extra inputs per sample), what they cost, how they train on the shared cached
activations (SDN's loop: Adam, summed CE, the lr drop) and the calibration-split outputs
from those cached activations (``ICBank.split_traces``), which the three methods turn into
exit outputs with the same per-exit function their ``exit_step`` uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from eebench.api import (
    Activations,
    Budget,
    EebenchError,
    ExitState,
    ExitStrategy,
    ExitTrace,
    MethodContext,
    StageCosts,
    StagedBackbone,
    StepOutput,
    TensorImageDataset,
    check_finite_loss,
    count_macs,
    seeded_modules,
    softmax_macs,
)
from eebench_plugins.manifests.internal_classifiers import (  # noqa: F401 (re-exported)
    PLACEMENTS,
    SDN_FRACTIONS,
    ICParams,
)

REDUCER_KEY = "sdn-pool"  # reduce_for_ic outputs: shared with every IC-based method
LR_DROP_AT = 0.6  # the reference drops the lr at epoch 15 of 25
LR_DROP_FACTOR = 0.1

#: exit j's outputs from its logits (an IC's, or the backbone head's for the final exit), the
#: running state and the IC's extra inputs: the one function a method's exit_step and its
#: cached calibration outputs share
LogitsStep = Callable[[int, torch.Tensor, ExitState, torch.Tensor | None], StepOutput]


def reduction_kernel(side: int) -> int | None:
    """The reference ``feature_reduction_formula``: floor(s/4) for s >= 4, else no pooling."""
    return side // 4 if side >= 4 else None


def _kernel_for(shape: tuple[int, ...]) -> int | None:
    """Pooling kernel for a [C, H, W] (or [B, C, H, W]) shape; non-square maps use the shorter side."""
    if len(shape) < 3:
        return None
    return reduction_kernel(min(shape[-2], shape[-1]))


def reduce_for_ic(x: torch.Tensor) -> torch.Tensor:
    """Max- and avg-pooled maps stacked as [B, 2, C, s/r, s/r]: what an IC needs, minus α.

    Without pooling (s < 4, or a flat [B, D] feature) both slots hold ``x`` itself, so the
    α mix is the identity and every cached tensor has the same layout.
    """
    kernel = _kernel_for(tuple(x.shape)) if x.ndim == 4 else None
    if kernel is None:
        return torch.stack([x, x], dim=1)
    return torch.stack([F.max_pool2d(x, kernel), F.avg_pool2d(x, kernel)], dim=1)


def ic_reducer(stage: int, out: torch.Tensor) -> torch.Tensor:
    """``reduce_for_ic`` in the ``Reducer`` signature the activation cache calls."""
    return reduce_for_ic(out)


def pooled_shape(feature_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one sample's mixed (pooled) feature: [C, s/r, s/r], or unchanged without pooling."""
    kernel = _kernel_for(feature_shape)
    if kernel is None:
        return tuple(feature_shape)
    channels, height, width = feature_shape
    return (channels, height // kernel, width // kernel)


class InternalClassifier(nn.Module):
    """SDN's IC: mixed max/avg pooling with one learnable α, then one Linear (see module doc)."""

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, extra_inputs: int = 0) -> None:
        super().__init__()
        feature_shape = tuple(int(d) for d in feature_shape)
        if len(feature_shape) not in (1, 3):
            raise ValueError(f"internal classifier: features must be [C, H, W] or [D], got {list(feature_shape)}")
        if extra_inputs < 0:
            raise ValueError(f"extra_inputs must be >= 0, got {extra_inputs}")
        self.feature_shape = feature_shape
        self.num_classes = int(num_classes)
        self.extra_inputs = int(extra_inputs)
        self.kernel = _kernel_for(feature_shape)
        # Only a pooling IC has α, as in the reference (its no-pooling IC is a bare Linear).
        self.alpha = nn.Parameter(torch.rand(1)) if self.kernel is not None else None
        self.pooled_numel = math.prod(pooled_shape(feature_shape))
        self.linear = nn.Linear(self.pooled_numel + self.extra_inputs, self.num_classes)
        example = torch.zeros(1, *self.feature_shape)
        extra = torch.zeros(1, self.extra_inputs) if self.extra_inputs else None
        self._macs = count_macs(self, (example, extra) if extra is not None else example)  # at batch 1, on CPU

    def mix(self, pair: torch.Tensor) -> torch.Tensor:
        """α · max + (1 − α) · avg on a ``reduce_for_ic`` pair [B, 2, ...] -> [B, ...]."""
        if self.alpha is None:
            return pair[:, 0]
        return self.alpha * pair[:, 0] + (1 - self.alpha) * pair[:, 1]

    def forward_pooled(self, pair: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a (possibly cached) ``reduce_for_ic`` pair, plus optional extra features."""
        features = self.mix(pair).flatten(1)
        if self.extra_inputs:
            if extra is None or extra.shape[-1] != self.extra_inputs:
                raise ValueError(f"this IC expects {self.extra_inputs} extra inputs per sample")
            features = torch.cat([features, extra.to(features.dtype)], dim=1)
        return self.linear(features)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the live stage output."""
        return self.forward_pooled(reduce_for_ic(x), extra)

    def macs(self) -> float:
        """MACs at batch 1 as the core counts them (``count_macs`` on this IC, when it was built;
        see the module doc)."""
        return self._macs


# -- the bank of ICs SDN, BWDS and E²CM+SDN hold ------------------------------------------------


def check_ic_params(fractions: Sequence[float], lr: float, weight_decay: float, placement: str = "nearest") -> None:
    """The bank's own checks (for direct use; the harness checks ``ICParams`` first)."""
    if not fractions or any(not 0 < float(f) <= 1 for f in fractions):
        raise EebenchError(f"fractions must be a non-empty list of numbers in (0, 1], got {list(fractions)}",
                           key="fractions")
    if placement not in PLACEMENTS:
        raise EebenchError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}", key="placement")
    if not lr > 0:
        raise EebenchError(f"lr must be > 0, got {lr}", key="lr")
    if not weight_decay >= 0:
        raise EebenchError(f"weight_decay must be >= 0, got {weight_decay}", key="weight_decay")


def index_dataset(labels: torch.Tensor) -> TensorImageDataset:
    """Sample indices posing as 1x1 images, so the Budget hands out (and counts) cached samples."""
    count = int(labels.shape[0])
    return TensorImageDataset(torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1), labels)


def lr_drop_at(planned: int | None, train_size: int) -> float | None:
    """Samples after which the lr drops: 60 % of a plan (a budget's, or a BWDS phase's share),
    only for plans over one epoch."""
    if planned is None or planned <= train_size:
        return None
    return LR_DROP_AT * planned


def drop_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The reference's single step decay: every group to ``lr`` × 0.1."""
    for group in optimizer.param_groups:
        group["lr"] = lr * LR_DROP_FACTOR


def place_ics(backbone: StagedBackbone, context: MethodContext, fractions: list[float],
              placement: str = "nearest") -> list[int]:
    """The exit point (stage index) of each IC, increasing: ``placement`` picks one per cost fraction
    among the exit points before the last stage (module doc, Placement)."""
    candidates = [s for s in backbone.exit_points if s != len(backbone.stages) - 1]
    costs = context.stage_costs
    if placement == "nearest":
        return nearest_stages(costs, candidates, fractions)
    if placement != "first-at-least":
        raise EebenchError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}", key="placement")
    stages = costs.stages_at_fractions(candidates, fractions)
    unreached = bool(candidates) and any(costs.through(candidates[-1]) < f * costs.total for f in fractions)
    if unreached and candidates[-1] not in stages:  # not when fractions merely share an exit point
        stages.append(candidates[-1])
    return stages


def nearest_stages(costs: StageCosts, candidates: Sequence[int], fractions: Sequence[float]) -> list[int]:
    """For each fraction (ascending), the free candidate whose cumulative MACs share is nearest it, ties
    to the cheaper (then the earlier) one; a fraction left without a free candidate is dropped. Increasing."""
    share = {s: costs.through(s) / costs.total for s in candidates}
    picked: list[int] = []
    for fraction in sorted(float(f) for f in fractions):
        free = [s for s in candidates if s not in picked]
        if not free:
            break
        picked.append(min(free, key=lambda s: (abs(share[s] - fraction), share[s])))
    return sorted(picked)


def _no_state(rows: int, device: torch.device) -> ExitState:
    return {}


def _exits_first(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B] or [P, B] per exit -> [P, E, B] (a [B] exit is shared by every variant)."""
    variants = max((p.shape[0] for p in parts if p.ndim == 2), default=1)
    return torch.stack([p if p.ndim == 2 else p[None].expand(variants, -1) for p in parts], dim=1)


class ICBank:
    """SDN's internal classifiers on a frozen backbone, held by each IC-based method (module doc).

    ``stages``: the backbone stage each IC reads (the method's exit taps); ``ics``: the ICs, one
    ``nn.ModuleList`` the method lists in its ``modules()``; ``lr`` / ``weight_decay``: their Adam;
    ``placement``: how ``fractions`` pick the stages (``place_ics``); ``count_softmax``: whether an
    IC's cost includes its softmax; ``owner``: the method's name in loss messages.
    """

    def __init__(self, backbone: StagedBackbone, context: MethodContext, fractions: Sequence[float],
                 lr: float, weight_decay: float, *, placement: str = "nearest", extra_inputs: int = 0,
                 count_softmax: bool = False, owner: str = "SDN") -> None:
        check_ic_params(fractions, lr, weight_decay, placement)
        self.context = context
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.count_softmax = bool(count_softmax)
        self.owner = owner
        self.fractions, self.placement = [float(f) for f in fractions], placement
        self.stages = place_ics(backbone, context, list(fractions), placement)
        self.ics = self._build(extra_inputs)

    def _build(self, extra_inputs: int) -> nn.ModuleList:
        """ICs seeded by the cell seed (α ~ U[0,1), Linear default init) without touching the global RNG."""
        shapes, k = self.context.stage_costs.stage_shapes, self.context.num_classes
        return seeded_modules(self.context.seed, self.context.device, lambda: nn.ModuleList(
            InternalClassifier(shapes[s], k, extra_inputs) for s in self.stages))

    def exit_names(self) -> list[str]:
        return [f"ic@block{s}" for s in self.stages] + ["final"]

    def cost_shares(self) -> list[float]:
        """Each IC's stage's cumulative share of the backbone's MACs (what ``fractions`` asked for, as placed)."""
        costs = self.context.stage_costs
        return [costs.through(s) / costs.total for s in self.stages]

    def placement_note(self) -> str:
        """Where the ICs really sit, for a method's notes: "ICs at 12.1/35.5/... % of backbone MACs (...)"."""
        asked = "/".join(f"{100 * f:g}" for f in self.fractions)
        if not self.stages:
            return f"No IC: the backbone has no exit point before its last stage (fractions {asked} %)."
        shares = "/".join(f"{100 * f:.1f}" for f in self.cost_shares())
        return f"ICs at {shares} % of backbone MACs ({self.placement} placement for {asked} %)."

    def placement_info(self) -> dict[str, Any]:
        """The placement for a method's ``fit_info``: rule, fractions asked for, IC stages and their cost shares."""
        return {"placement": self.placement, "fractions": list(self.fractions), "ic_stages": list(self.stages),
                "ic_cost_shares": self.cost_shares()}

    def exit_logits(self, j: int, features: torch.Tensor, backbone: StagedBackbone) -> torch.Tensor:
        """Exit j's logits: IC j's on its stage's output, or the backbone head's at the final exit."""
        return backbone.head(features) if j == len(self.stages) else self.ics[j](features)

    def macs(self) -> list[float]:
        """Each IC's MACs at batch 1, its softmax (3K) too with ``count_softmax``."""
        extra = softmax_macs(self.context.num_classes) if self.count_softmax else 0.0
        return [ic.macs() + extra for ic in self.ics]

    def training_features(self, activations: Activations) -> list[torch.Tensor]:
        """The cached pooled pairs each IC reads, [N, 2, ...] per IC."""
        return [activations.features[s] for s in self.stages]

    def train(self, features: list[torch.Tensor], labels: torch.Tensor, budget: Budget,
              extras: list[torch.Tensor] | None = None) -> None:
        """Adam on the summed IC losses, batches (of cached-sample indices) from the budget, which
        charges 3 × Σ IC MACs per sample; the lr drops after 60 % of a plan over one epoch.

        ``extras`` holds per-IC extra inputs per sample (E²CM+SDN's distances), if any.
        """
        ctx = self.context
        self.ics.train()
        optimizer = torch.optim.Adam(self.ics.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        drop_at = lr_drop_at(budget.planned_samples, len(labels))
        per_sample = 3.0 * math.fsum(self.macs())
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
            check_finite_loss(loss, f"{self.owner} IC loss after {seen} samples")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += int(y.shape[0])
            if drop_at is not None and seen >= drop_at:
                drop_lr(optimizer, self.lr)
                drop_at = None
        self.ics.eval()

    @torch.no_grad()
    def split_traces(self, owner: ExitStrategy, dataset: Dataset, step: LogitsStep,
                     extras: list[torch.Tensor] | None = None,
                     fresh_state: Callable[[int, torch.device], ExitState] = _no_state) -> list[ExitTrace] | None:
        """``owner``'s traces of ``dataset`` from the shared cached activations (fp16 pooled pairs,
        the head's logits), or None when none are cached for it: the ICs read the features they were
        trained on, so the calibration split costs no second backbone pass.

        ``step`` turns exit j's logits into its outputs (what ``exit_step`` does after the IC);
        ``extras``: each IC's extra inputs for every sample of ``dataset``; ``fresh_state(rows,
        device)``: the state ``init_state`` gives a batch of that many rows.
        """
        activations = owner.cached_activations(dataset, REDUCER_KEY)
        if activations is None or not self.stages:
            return None
        preds, scores, labels, details = [], [], [], []
        for logits, batch_extras, y in self._cached_logits(activations, extras):
            state = fresh_state(int(y.shape[0]), self.context.device)
            outs = [step(j, z, state, e) for j, (z, e) in enumerate(zip(logits, batch_extras, strict=True))]
            preds.append(_exits_first([o.preds for o in outs]).cpu())
            scores.append(_exits_first([o.scores.double() for o in outs]).cpu())
            details.append([None if o.detail is None else o.detail.cpu() for o in outs])
            labels.append(y)
        per_exit = [None if column[0] is None else torch.cat(list(column)) for column in zip(*details, strict=True)]
        return owner.build_traces(torch.cat(preds, -1).long(), torch.cat(scores, -1), torch.cat(labels).long(),
                                  per_exit)

    @torch.no_grad()
    def _cached_logits(self, activations: Activations, extras: list[torch.Tensor] | None,
                       ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]]:
        """Per batch of ``context.batch_size`` cached samples: every exit's logits (the ICs', then the
        head's), each exit's extra inputs (None at the head) and the labels."""
        device, size = self.context.device, self.context.batch_size
        for start in range(0, len(activations), size):
            rows = slice(start, start + size)
            batch_extras = [None] * len(self.stages) if extras is None else [e[rows].to(device) for e in extras]
            logits = [ic.forward_pooled(activations.features[s][rows].to(device).float(), extra)
                      for s, ic, extra in zip(self.stages, self.ics, batch_extras, strict=True)]
            yield [*logits, activations.logits[rows].to(device)], [*batch_extras, None], activations.labels[rows]
