"""BranchyNet (Teerapittayanon, McDanel, Kung, ICPR 2016), set up as the E²CM paper compares it.

Two side branches: one after the first convolution (the stem, stage 0) and one at the exit
point whose cumulative backbone cost is nearest ``second_at`` (1/3) of the whole network;
the backbone's own head is the final exit. Each branch is small, in the spirit of
B-LeNet's branch (max-pool 2, conv, pool, FC): MaxPool 2×2 (when the map is at least 8
wide), conv3×3 + BatchNorm + ReLU (``branch_channels``, default the input width),
adaptive average pooling to at most 4×4, and one Linear classifier.

Training is joint (backbone + branches) with the weighted sum of per-exit cross-entropies
Σ_n w_n·CE(exit_n). ``weights`` is a list of three numbers (branch 1, branch 2, final) or
a preset: ``e2cm`` = [1/6, 1/4, 1] (the E²CM paper's best, the default), ``equal`` =
[1, 1, 1] (what the reference code really does: its ``Branch`` ignores its weight), and
``paper`` = [1, 1, 0.3]: the BranchyNet paper's 2-exit B-AlexNet used 1.0 for the branch
and 0.3 for the final exit ("weighting early branches more"); with two branches each branch
gets 1.0 and the final exit 0.3. Adam (lr 1e-3, no weight decay, as the reference's Adam
runs), batches augmented as the dataset prescribes; the lr decays to 0 over the budget by a
half cosine (``schedule: constant`` keeps the paper's constant lr).

Inference: exit n fires when the entropy of its softmax (natural log, so T ∈ [0, ln K]) is
strictly below T_n. The trace reports score = −entropy with ``strict = True``, which is the
same rule (−H > −T ⇔ H < T); ``entropy_thresholds`` turns calibrated score thresholds back
into entropy thresholds clamped to [0, ln K] (+inf, an exit switched off, becomes 0: no
entropy is below 0). Per-branch thresholds come from the per-exit bisection on the
calibration split (the reference sweeps a Cartesian grid on the test set).

Deviations, in ``notes``: starts from the cached base network and trains for the suite's
budget (``from_scratch: true`` reloads the backbone plugin's initialisation first, as the
paper trains; the paper also pre-trains the trunk for 50 epochs before joint training);
branch architecture as above instead of the paper's per-network branches (B-ResNet-110's
first branch alone is 28,800-wide); costs are MACs of the backbone plus each evaluated
branch, counted by the core on the branch module (fvcore's conv, BatchNorm, average pool
and Linear, the max-pool from the core's cost table, which fvcore skips; the paper measures
wall-clock time), with the softmax + entropy (3K + 2K, the cost table's) only when
``count_softmax`` is set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
    count_macs,
    entropy_macs,
    exit_costs_at,
    seeded_modules,
    softmax_macs,
    stage_taps,
)
from eebench_plugins.joint_training import (
    MethodConfigError,
    check_positive,
    check_schedule,
    reset_to_fresh,
    train_jointly,
)
from eebench_plugins.manifests.branchynet import WEIGHT_PRESETS, BranchyNetParams


class Branch(nn.Module):
    """MaxPool 2 (maps ≥ 8 wide), conv3×3+BN+ReLU, average-pool to ≤ 4×4, Linear."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, channels: int | None = None) -> None:
        super().__init__()
        if len(shape) != 3:
            raise MethodConfigError(f"a BranchyNet branch needs a [C, H, W] feature map, got {list(shape)}")
        in_channels, height, width = (int(d) for d in shape)
        self.shape = (in_channels, height, width)
        out_channels = int(channels or in_channels)
        halve = min(height, width) >= 8
        side = min(height, width) // 2 if halve else min(height, width)
        squeeze = min(4, side)
        self.body = nn.Sequential(
            nn.MaxPool2d(2) if halve else nn.Identity(),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(squeeze),
            nn.Flatten(1),
        )
        self.linear = nn.Linear(out_channels * squeeze * squeeze, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.body(x))

    def macs(self) -> float:
        """MACs at batch 1 by the core's counter: fvcore's conv, BN, average pool and Linear, plus
        the max-pool from the cost table (every value each window reads; ReLU free)."""
        device = next(self.parameters()).device
        return count_macs(self, torch.zeros(1, *self.shape, device=device))


def resolve_weights(weights: str | Sequence[float]) -> tuple[float, float, float]:
    """A preset name or three non-negative numbers (branch 1, branch 2, final), not all zero."""
    if isinstance(weights, str):
        if weights not in WEIGHT_PRESETS:
            raise MethodConfigError(f"weights must be one of {', '.join(WEIGHT_PRESETS)} or a list of 3 numbers, "
                                    f"got {weights!r}", key="weights")
        return WEIGHT_PRESETS[weights]
    values = [float(w) for w in weights]
    if len(values) != 3 or any(w < 0 or not math.isfinite(w) for w in values) or not any(values):
        raise MethodConfigError(f"weights must be 3 non-negative numbers (branch 1, branch 2, final), got {values}",
                                key="weights")
    return values[0], values[1], values[2]


def place_branches(backbone: StagedBackbone, context: MethodContext, second_at: float) -> list[int]:
    """The stem (stage 0) and the exit point (not the last stage) whose cost is nearest ``second_at``."""
    costs = context.stage_costs
    last = len(backbone.stages) - 1
    candidates = [s for s in backbone.exit_points if 0 < s < last]
    if not candidates:
        raise MethodConfigError(f"{backbone.backbone_name} has no exit point between its stem and its last stage "
                                "for the second branch")
    second = min(candidates, key=lambda s: (abs(costs.through(s) / costs.total - second_at), s))
    return [0, second]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of softmax(logits) along dim 1, in float64 (0·log 0 = 0)."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(1)


def entropy_thresholds(score_thresholds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Score thresholds (score = −entropy, strict) as entropy thresholds T ∈ [0, ln K].

    −H > t ⇔ H < −t; clamping keeps the rule: no entropy is below 0 (an exit switched off,
    t = +inf, becomes T = 0) and none is above ln K.
    """
    t = torch.as_tensor(score_thresholds, dtype=torch.float64)
    return (-t).clamp(0.0, math.log(num_classes))


class BranchyNet(ExitStrategy):
    """Two entropy-gated side branches trained jointly with the backbone (module docstring)."""

    Params = BranchyNetParams

    strict = True
    default_calibrator = "per-exit-bisection"

    def __init__(
        self,
        backbone: StagedBackbone,
        context: MethodContext,
        weights: str | Sequence[float] = "e2cm",
        second_at: float = 1 / 3,
        branch_channels: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        from_scratch: bool = False,
        schedule: str = "cosine",
        count_softmax: bool = False,
    ) -> None:
        super().__init__(backbone, context)
        self.loss_weights = resolve_weights(weights)
        if not 0 < float(second_at) < 1:  # NaN fails too
            raise MethodConfigError(f"second_at must be in (0, 1), got {second_at}", key="second_at")
        self.lr = check_positive(lr, "lr")
        self.schedule = check_schedule(schedule, "schedule")
        self.weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)
        self.from_scratch, self.count_softmax = bool(from_scratch), bool(count_softmax)
        self.branch_stages = place_branches(backbone, context, float(second_at))
        shapes = context.stage_costs.stage_shapes
        self.branches = seeded_modules(context.seed, context.device, lambda: nn.ModuleList(
            Branch(shapes[s], context.num_classes, branch_channels) for s in self.branch_stages))
        self._branch_macs = [b.macs() for b in self.branches]
        label = weights if isinstance(weights, str) else "custom"
        w = ", ".join(f"{v:.3g}" for v in self.loss_weights)
        self.notes = (
            f"BranchyNet: branches after the stem and at block {self.branch_stages[1]} (nearest {second_at:.2f} of "
            "backbone MACs), each maxpool 2 → conv3×3+BN+ReLU → avgpool ≤4×4 → linear; backbone + branches "
            + ("trained from scratch" if self.from_scratch else "trained jointly from the cached base network")
            + f" under the budget (Adam lr {self.lr:g}, {self.schedule} schedule; the paper trains from scratch at a "
            "constant lr), loss Σ w·CE with "
            f"weights [{w}] ({label}); exit when softmax entropy < T_n (natural log), per-branch T from the "
            "calibration split (the reference sweeps a grid on test); MACs instead of the paper's wall-clock time."
        )

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.branches]

    def branch_macs(self) -> list[float]:
        k = self.context.num_classes
        extra = softmax_macs(k) + entropy_macs(k) if self.count_softmax else 0.0
        return [m + extra for m in self._branch_macs]

    def exit_taps(self) -> list[int]:
        return list(self.branch_stages)

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Both branches' logits and the final head's, from one pass (the training loop's view)."""
        features, last = stage_taps(self.backbone, x, self.branch_stages)
        return [branch(f) for branch, f in zip(self.branches, features, strict=True)] + [self.backbone.head(last)]

    def loss(self, logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Σ_n w_n · CE(exit_n)."""
        ce = nn.functional.cross_entropy
        return sum(w * ce(z, y) for w, z in zip(self.loss_weights, logits, strict=True))

    def fit(self, train: Dataset, budget: Budget) -> None:
        if self.from_scratch:
            reset_to_fresh(self.backbone, self.context, "from_scratch")
        per_sample = self.context.stage_costs.total + math.fsum(self._branch_macs)
        train_jointly(self.backbone, self.branches, lambda x, y: self.loss(self.logits(x), y), train, budget,
                      self.context, lr=self.lr, weight_decay=self.weight_decay, per_sample_macs=per_sample,
                      description="branchynet", schedule=self.schedule, key="lr")

    def entropy_units(self, thresholds: torch.Tensor) -> dict[str, Any]:
        """Calibrated score thresholds as the paper's entropy thresholds T_n ∈ [0, ln K] (exit when H < T_n)."""
        values = entropy_thresholds(thresholds, self.context.num_classes)
        return {"name": "entropy T_n (nats; exit when H < T_n; 0 = branch off)", "values": values.tolist()}

    @torch.no_grad()
    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        """Branch ``j`` (or the backbone's head) on its stage's output: argmax class, score −entropy."""
        head = self.branches[j] if j < len(self.branches) else self.backbone.head
        logits = head(features)
        return StepOutput(logits.argmax(1), -entropy(logits))

    def exit_costs(self) -> ExitCosts:
        return exit_costs_at(self.context.stage_costs, self.branch_stages, self.branch_macs())

    def report(self) -> MethodReport:
        names = ["branch@stem", f"branch@block{self.branch_stages[1]}", "final"]
        return MethodReport(exit_names=names, notes=self.notes, native_thresholds=self.entropy_units)
