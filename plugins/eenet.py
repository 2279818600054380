"""EENets: Early-exit CNNs (Demir & Akbas; code ``eksuas/eenets.pytorch``).

``num_ee`` exit blocks, each a softmax classifier and a sigmoid confidence head h_i on a
shared feature vector:

* ``plain``: the flattened feature map (the reference sizes it from the network *input*'s
  H×W, which only works at full resolution; eebench uses the real feature shape);
* ``pool``: global average pooling (the reference's default);
* ``bnpool``: BatchNorm2d(C) → global average pooling, as the reference ``ExitBlock``
  builds it (no ReLU; the paper's Fig. 2 draws BN → ReLU → pool). The BatchNorm is a
  registered submodule, so it is optimised, moved to the device and saved in the
  state_dict (the reference keeps it in a plain Python list, so its parameters are never
  trained and it stays in training mode: at the reference's test batch of 1 it
  standardises each channel over H×W, and the average pool of that is exactly 0);
* ``poolbn`` (default; eebench's, not in the reference): global average pooling →
  BatchNorm1d(C), i.e. the pooled vector the two Linear heads see is standardised
  (batch statistics in training, running statistics at inference; a training batch of
  one sample uses the running ones). Why the default (issue 13): the pooled features of
  a trained backbone are post-ReLU averages over H×W, all positive with a small spread
  across images, so the fresh Linear heads need large weights that Adam at lr 1e-3
  (≤ ~lr per step) cannot reach in one epoch's 469 steps. On the 1-epoch board with the
  two-stage schedule below, forced test accuracy of the two exits after fit: ``pool``
  19 / 19 % (¹⁄₆ warm-up), ``bnpool`` 41 / 55 % (½ warm-up), ``poolbn`` 71 / 76 %.

The final exit is the backbone's own head (global average pooling + Linear + softmax,
exactly the reference's final classifier); the reference's final confidence head is used
only by its loss v3, so it is omitted.

Placement (spec §5.2): thresholds over F, the plain backbone's MACs — ``pareto``
F·(1−0.8^(i+1)), ``fine`` F·(1−0.95^(i+1)) (default), ``linear`` F·(i+1)/(N+1),
``golden_ratio`` F·φ^(i−N) with φ = 1.61803398875, and ``quadratic``, which the PyTorch
code lacks: the legacy Keras ``quad`` puts exit i at the cost of block ⌊(S+1)/(N+1)⌋·(i+1)
of the list [stem, blocks..., head] (S stages), i.e. evenly by block count, not
quadratically in cost (flagged in ``notes``). Walking the exit points in order, exit i
goes to the first one whose cumulative backbone MACs reach threshold i, at most one exit
per point (the reference's loop); never after the stem nor after the last stage (whose
output feeds the head). A backbone that cannot host ``num_ee`` exits raises a ValueError
(the reference asserts "too much for the model capacity"). With ``num_ee: 2`` on resnet20
(1×28×28 inputs, option-B shortcuts) the exits sit at these fractions of backbone MACs:
fine 12 / 24 % (blocks 1, 2), pareto 24 / 45 % (2, 4), golden_ratio 45 / 68 % (4, 6),
linear 36 / 68 % (3, 6), quadratic 36 / 68 % (3, 6); the paper's EENet-20 tables list
13 / 24 / 36 % for fine with three exits.

Loss L_v2 (``eenet_loss``): from the back, P_N = p_N, C_N = c_N,
P_i = h_i·p_i + (1−h_i)·P_{i+1}, C_i = h_i·c_i + (1−h_i)·C_{i+1};
L = Σ_{i=0..N} NLL(log P_i) + λ·mean_batch(C_i), with log P clamped at 1e-12. The costs
c_i are the exit costs normalised to the plain backbone under the accounting in use.

Inference: exit i fires when h_i > T (strict; score = h_i). The paper's T = 0.5 is
reported as the operating point "T = 0.5"; the curve comes from a sweep of one threshold
shared by all exits (``shared-threshold``, the paper's single-T rule; name
``per-exit-bisection`` as the calibrator for per-exit thresholds).

Costs: the harness's accounting by default — exit i costs the backbone up to its point
plus every evaluated exit block (MACs counted by the core on the block, ``count_macs``:
the optional BatchNorm, the average pool, both Linears; the sigmoid on h_i is the exit's
decision, free as every method's threshold test is). ``native_cost: true`` reproduces the paper's
accounting instead: exit i costs the stages up to it plus *only* exit block i, and the
final exit costs exactly 1.0 (the blocks passed on the way are free); this is expressed
by folding each block's MACs into the exit's backbone cost with no overheads.

Training: Adam, lr 1e-3, weight decay 1e-4 (the reference defaults), jointly on backbone
and exits, from the cached base network for the suite's budget (``from_scratch: true``
reloads the backbone plugin's initialisation first, as the paper trains), in two stages,
the reference's ``--two-stage`` (``main.py``: ``loss_func = "v0"`` while ``epoch <= 25``,
then ``"v1"``): first L_v0 = Σ_{i=0..N} NLL(log p_i) (``eenet_warmup_loss``: every exit's
own cross-entropy, the confidence heads idle), then L_v2. Both stages draw their batches
from the one budget: the warm-up is the first ``warmup_fraction`` of the budget's planned
samples (the batch that starts before that share is a warm-up batch, so the switch falls
on a batch boundary; a budget with only a clock switches at that share of its seconds;
one that says neither, at that share of one epoch), one optimizer and one lr schedule
run across both (the reference keeps its optimizer across the switch); ``fit_info``
records the samples of each stage. Deviations:

* two stages by default: the paper trains in a single stage and ``--two-stage`` is off by
  default in the reference. From a trained backbone L_v2 alone does not train the early
  classifiers: it is a mixture NLL, so exit i's classifier gets the cross-entropy
  gradient weighted by its responsibility h_i·p_i(y)/P_i(y); the final exit is already
  good, h_i is pushed down and the exits learn only from the final exit's mistakes. On
  the 1-epoch board (single stage, ``pool``) every test sample forced to exit 0 / 1 is
  right 11.9 / 10.0 % of the time (exit 1 predicts one class), h_0 ≈ 0.20 and h_1 ≈ 0.07
  for every image, so T = 0.5 sends all to the final exit. ``warmup_fraction: 0`` gives
  the paper's single stage;
* the second stage is L_v2 (the paper's loss and the default here), not the reference's
  L_v1 (its ``--two-stage`` help: "two stage learning for loss version 1"; the paper
  reports L_v1 "performed poorly");
* ``warmup_fraction`` defaults to ½, not the reference's 25 of its 150 default epochs
  (¹⁄₆): with one epoch at batch 128 ¹⁄₆ is 78 Adam steps. 1-epoch board, ``poolbn``:
  forced exit accuracy 59 / 66 % at ¹⁄₆, 71 / 76 % at ½, 71 / 78 % at ¾; accuracy at
  φ = 0.5: 81.9 / 84.0 / 83.0 %;
* the lr decays to 0 over the budget by a half cosine (``schedule: constant`` for the
  paper's constant lr), since a converged base fine-tuned at a constant Adam lr 1e-3 for
  one epoch ends clearly below where it started.

What limits the early exits on the 1-epoch board (``poolbn``, ½ warm-up; measured on the
saved state): the exits sit at 12 / 24 % of the MACs (``fine``), on 16-channel maps, so
each head is linear on 16 pooled features; a logistic-regression probe on the fitted
features reaches 78.5 / 79.8 % on test (the heads 70.5 / 75.7 %). At φ = 0.5 the
calibrated policy gives 84.0 % (full cost 90.7 %); the best shared T on h chosen on test
gives 83.9 %, the same rule on the exits' max softmax would give 87.7 %: the linear
sigmoid confidence h ranks the samples worse than the classifier's own softmax does, and
that h is the method. At the reference's batch size 32 (the suite's
``train_batch_size``; 4× the steps) the exits reach 77 / 79 % and φ = 0.5 86.1 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from eebench.api import (
    Budget,
    ExitCosts,
    ExitState,
    ExitStrategy,
    MethodContext,
    MethodReport,
    OperatingPoint,
    StageCosts,
    StagedBackbone,
    StepOutput,
    count_macs,
    exit_costs_at,
    seeded_modules,
    stage_taps,
)
from eebench_plugins.joint_training import (
    MethodConfigError,
    check_positive,
    check_schedule,
    reset_to_fresh,
    train_jointly,
)
from eebench_plugins.manifests.eenet import EENetParams

EXIT_TYPES = ("plain", "pool", "bnpool", "poolbn")
DISTRIBUTIONS = ("pareto", "golden_ratio", "fine", "linear", "quadratic")
GOLDEN_RATIO = 1.61803398875
LOG_EPS = 1e-12
WARMUP_FRACTION = 0.5  # share of the budget trained with L_v0 (the reference: 25 of its 150 epochs)


class PooledBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over pooled feature vectors; a training batch of one sample (a budget's trimmed last
    batch) has no batch statistics, so it is normalised with the running ones instead of failing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ExitBlock(nn.Module):
    """Features (plain / pool / bnpool / poolbn), then a Linear classifier and a Linear → sigmoid confidence."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, kind: str = "pool") -> None:
        super().__init__()
        if kind not in EXIT_TYPES:
            raise MethodConfigError(f"exit_type must be one of {', '.join(EXIT_TYPES)}, got {kind!r}",
                                    key="exit_type")
        self.shape, self.kind = tuple(int(d) for d in shape), kind
        channels = self.shape[0]
        if kind != "plain" and len(self.shape) != 3:
            raise MethodConfigError(f"exit_type {kind!r} needs [C, H, W] features, got {list(self.shape)}",
                                    key="exit_type")
        if kind == "plain":
            self.features: nn.Module = nn.Flatten(1)
            width = math.prod(self.shape)
        elif kind == "pool":
            self.features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            width = channels
        elif kind == "bnpool":
            self.features = nn.Sequential(nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            width = channels
        else:  # poolbn (eebench's): the pooled vector standardised, so the heads start well conditioned
            self.features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), PooledBatchNorm(channels))
            width = channels
        self.classifier = nn.Linear(width, num_classes)
        self.confidence = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits [B, K], confidence h ∈ (0, 1) [B])."""
        v = self.features(x)
        return self.classifier(v), torch.sigmoid(self.confidence(v)).squeeze(1)

    def macs(self) -> float:
        """MACs at batch 1 by the core's counter (``count_macs`` on this block)."""
        device = next(self.parameters()).device
        return count_macs(self, torch.zeros(1, *self.shape, device=device))


def placement_thresholds(distribution: str, num_ee: int, costs: StageCosts) -> list[float]:
    """Cumulative-MAC threshold of each exit under ``distribution`` (spec §5.2)."""
    total, n = costs.total, num_ee
    if distribution == "pareto":
        return [total * (1 - 0.8 ** (i + 1)) for i in range(n)]
    if distribution == "fine":
        return [total * (1 - 0.95 ** (i + 1)) for i in range(n)]
    if distribution == "linear":
        return [total * (i + 1) / (n + 1) for i in range(n)]
    if distribution == "golden_ratio":
        return [total * GOLDEN_RATIO ** (i - n) for i in range(n)]
    if distribution == "quadratic":
        blocks = [costs.through(s) for s in range(len(costs.stage_macs))] + [total]  # [stem, blocks..., head]
        margin = len(blocks) // (n + 1)
        return [blocks[min(margin * (i + 1), len(blocks) - 1)] for i in range(n)]
    raise MethodConfigError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}",
                            key="distribution")


def place_exits(backbone: StagedBackbone, costs: StageCosts, distribution: str, num_ee: int) -> list[int]:
    """Exit i at the first exit point (after earlier exits) whose cumulative MACs reach threshold i."""
    thresholds = placement_thresholds(distribution, num_ee, costs)
    last = len(backbone.stages) - 1
    stages: list[int] = []
    for s in (p for p in backbone.exit_points if 0 < p < last):
        if len(stages) < num_ee and costs.through(s) >= thresholds[len(stages)]:
            stages.append(s)
    if len(stages) < num_ee:
        raise MethodConfigError(
            f"{backbone.backbone_name} can host only {len(stages)} of num_ee={num_ee} exits with distribution "
            f"{distribution!r} (the desired number of exit blocks is too much for the model capacity)",
            key="num_ee")
    return stages


def eenet_loss(probs: list[torch.Tensor], confidences: list[torch.Tensor], costs: torch.Tensor,
               target: torch.Tensor, lambda_coef: float) -> torch.Tensor:
    """L_v2: Σ_{i=0..N} NLL(log P_i, y) + λ·mean(C_i) over recursive soft outputs and costs.

    probs: N+1 tensors [B, K] (early exits, then final); confidences: N tensors [B];
    costs: [N+1] normalised exit costs (the last = the final exit's).
    """
    if len(probs) != len(confidences) + 1 or costs.numel() != len(probs):
        raise ValueError("eenet_loss needs N+1 probability tensors, N confidences and N+1 costs")
    soft = probs[-1]
    cost = costs[-1].to(soft.dtype).expand(soft.shape[0])
    total = F.nll_loss(soft.clamp_min(LOG_EPS).log(), target) + lambda_coef * cost.mean()
    for i in range(len(confidences) - 1, -1, -1):
        h = confidences[i]
        soft = h[:, None] * probs[i] + (1 - h[:, None]) * soft
        cost = h * costs[i] + (1 - h) * cost
        total = total + F.nll_loss(soft.clamp_min(LOG_EPS).log(), target) + lambda_coef * cost.mean()
    return total


def eenet_warmup_loss(logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """L_v0, the reference's first stage of ``--two-stage``: Σ_{i=0..N} NLL(log p_i, y), every exit's
    plain cross-entropy (on logits, the same value as the reference's log of its softmax output); the
    confidence heads get no gradient."""
    return sum((F.cross_entropy(z, target) for z in logits), torch.zeros((), device=target.device))


class EENet(ExitStrategy):
    """Exit blocks with learned confidences, warmed with L_v0 then trained with L_v2 (module docstring).

    Deviations from the paper / reference (each also in ``notes``): exit blocks ``poolbn``
    by default (pool → BatchNorm1d, eebench's; the reference default is ``pool``); the
    reference's two-stage schedule on by default, its first stage (L_v0) the first
    ``warmup_fraction`` = ½ of the budget (the reference: 25 of 150 epochs), its second stage
    L_v2 (the reference: L_v1); the lr decays by a half cosine (the paper: constant); costs
    include every evaluated exit block (``native_cost: true`` for the paper's); a registered,
    trained BatchNorm in ``bnpool``; ``plain`` sized from the real feature map.
    """

    Params = EENetParams

    strict = True
    default_calibrator = "shared-threshold"

    def __init__(
        self,
        backbone: StagedBackbone,
        context: MethodContext,
        num_ee: int = 2,
        distribution: str = "fine",
        exit_type: str = "poolbn",
        lambda_coef: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        native_cost: bool = False,
        from_scratch: bool = False,
        schedule: str = "cosine",
        warmup_fraction: float = WARMUP_FRACTION,
    ) -> None:
        super().__init__(backbone, context)
        if int(num_ee) != num_ee or num_ee < 1:
            raise MethodConfigError(f"num_ee must be an integer >= 1, got {num_ee}", key="num_ee")
        if exit_type not in EXIT_TYPES:
            raise MethodConfigError(f"exit_type must be one of {', '.join(EXIT_TYPES)}, got {exit_type!r}",
                                    key="exit_type")
        self.num_ee, self.distribution, self.exit_type = int(num_ee), distribution, exit_type
        self.lambda_coef = check_positive(lambda_coef, "lambda_coef", allow_zero=True)
        self.lr = check_positive(lr, "lr")
        self.schedule = check_schedule(schedule, "schedule")
        self.weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)
        self.native_cost, self.from_scratch = bool(native_cost), bool(from_scratch)
        self.warmup_fraction = check_positive(warmup_fraction, "warmup_fraction", allow_zero=True)
        if self.warmup_fraction >= 1:
            raise MethodConfigError(f"warmup_fraction must be < 1 (a share of the budget), got {warmup_fraction}",
                                    key="warmup_fraction")
        self.fit_info: dict[str, Any] = {}
        self.exit_stages = place_exits(backbone, context.stage_costs, distribution, self.num_ee)
        shapes = context.stage_costs.stage_shapes
        self.exits = seeded_modules(context.seed, context.device, lambda: nn.ModuleList(
            ExitBlock(shapes[s], context.num_classes, exit_type) for s in self.exit_stages))
        self._exit_macs = [e.macs() for e in self.exits]
        fractions = ", ".join(f"{100 * context.stage_costs.through(s) / context.stage_costs.total:.0f}%"
                              for s in self.exit_stages)
        self.notes = (
            f"EENet: {self.num_ee} {exit_type} exit blocks placed by the {distribution!r} distribution (blocks "
            f"{self.exit_stages}, at {fractions} of backbone MACs"
            + ("; 'quadratic' follows the legacy Keras code: evenly spaced by block count" if distribution ==
               "quadratic" else "")
            + "), L_v2 (λ = lambda_coef, default 1); "
            + (f"two stages as the reference's --two-stage: the first {self.warmup_fraction:.0%} of the budget's "
               "samples train every exit with its own cross-entropy (L_v0), the rest with L_v2 (the reference: L_v0 "
               "for 25 of 150 epochs, then L_v1; the paper: L_v2 alone); " if self.warmup_fraction > 0 else
               "single stage as the paper; ")
            + "backbone + exits "
            + ("trained from scratch" if self.from_scratch else "trained jointly from the cached base network")
            + f" under the budget (Adam lr {self.lr:g}, wd {self.weight_decay:g}, {self.schedule} schedule; the paper "
            "trains from scratch at a constant lr); "
            + ("poolbn exits = avgpool → BatchNorm1d, eebench's (the reference's default is pool: un-normalised "
               "pooled features leave the fresh heads near chance in a short budget); " if exit_type == "poolbn"
               else "")
            + "final exit = the backbone's head; curve from a shared-T sweep of h > T, paper point T = 0.5; "
            + ("costs in the paper's accounting (exit i: stages + its own block only; final = 1.0)."
               if self.native_cost else "costs include every evaluated exit block (the paper counts only the "
               "exit's own block and sets the final exit to 1.0).")
            + (" bnpool = BN → avgpool with the BN registered and trained." if exit_type == "bnpool" else "")
        )

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.exits]

    def exit_taps(self) -> list[int]:
        return list(self.exit_stages)

    def outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Logits of every exit (early exits, then the final head) and the N confidences, from one pass
        (the training loop's view)."""
        features, last = stage_taps(self.backbone, x, self.exit_stages)
        logits, confidences = [], []
        for block, f in zip(self.exits, features, strict=True):
            z, h = block(f)
            logits.append(z)
            confidences.append(h)
        return [*logits, self.backbone.head(last)], confidences

    def loss_costs(self) -> torch.Tensor:
        """c_i for the loss: the exit costs normalised to the plain backbone, all exits enabled."""
        return self.exit_costs().normalised().float()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, confidences = self.outputs(x)
        probs = [torch.softmax(z, dim=1) for z in logits]
        return eenet_loss(probs, confidences, self.loss_costs().to(y.device), y, self.lambda_coef)

    def warmup_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Stage 1 of the two-stage schedule: L_v0, every exit's cross-entropy (``eenet_warmup_loss``)."""
        logits, _ = self.outputs(x)
        return eenet_warmup_loss(logits, y)

    def _in_warmup(self, budget: Budget, train_size: int) -> Callable[[int], bool]:
        """Whether the batch that starts after ``seen`` samples belongs to the warm-up: the first
        ``warmup_fraction`` of the budget's planned samples, else of its clock, else of one epoch."""
        fraction = self.warmup_fraction
        if fraction == 0:
            return lambda seen: False
        planned = budget.planned_samples
        seconds = budget.limits().get("seconds")
        if planned is None and seconds is not None:
            return lambda seen: budget.elapsed() < fraction * seconds
        cut = fraction * (planned if planned is not None else train_size)
        return lambda seen: seen < cut

    def fit(self, train: Dataset, budget: Budget) -> None:
        if self.from_scratch:
            reset_to_fresh(self.backbone, self.context, "from_scratch")
        in_warmup = self._in_warmup(budget, len(train))
        spent = {"warmup_samples": 0, "lv2_samples": 0}

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            warm = in_warmup(spent["warmup_samples"] + spent["lv2_samples"])
            spent["warmup_samples" if warm else "lv2_samples"] += int(y.shape[0])
            return self.warmup_loss(x, y) if warm else self.loss(x, y)

        per_sample = self.context.stage_costs.total + math.fsum(self._exit_macs)
        train_jointly(self.backbone, self.exits, loss, train, budget, self.context, lr=self.lr,
                      weight_decay=self.weight_decay, per_sample_macs=per_sample, description="eenet",
                      schedule=self.schedule, key="lr")
        self.fit_info = {"warmup_fraction": self.warmup_fraction, **spent}

    @torch.no_grad()
    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        """Exit block ``j`` on its stage's output: argmax class, score h_j; the final exit (the backbone's
        head) scores 1, as it always exits."""
        if j < self.num_ee:
            logits, confidence = self.exits[j](features)
            return StepOutput(logits.argmax(1), confidence.double())
        logits = self.backbone.head(features)
        return StepOutput(logits.argmax(1), torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device))

    def exit_costs(self) -> ExitCosts:
        costs = self.context.stage_costs
        if not self.native_cost:
            return exit_costs_at(costs, self.exit_stages, self._exit_macs)
        # the paper's: own block only, final = 1.0
        own = [costs.through(s) + m for s, m in zip(self.exit_stages, self._exit_macs, strict=True)]
        backbone = torch.tensor([*own, costs.total], dtype=torch.float64).cummax(0).values
        return ExitCosts(backbone, torch.zeros_like(backbone), costs.total)

    def report(self) -> MethodReport:
        names = [f"ee@block{s}" for s in self.exit_stages] + ["final"]
        paper = OperatingPoint("T = 0.5", torch.full((self.num_ee,), 0.5, dtype=torch.float64))
        return MethodReport(exit_names=names, notes=self.notes, operating_points=[paper], fit_info=dict(self.fit_info))
