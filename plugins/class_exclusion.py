"""Early exit with class exclusion (Wang, Li, Zhang, AICAS 2024; code ``TUDa-HWAI/eece``).

Each exit carries an exclusion head (average pooling to ``expansion``², flatten, one
Linear(C·e², K); a sigmoid per class at inference). Training is joint (backbone + heads):

    L = CE(final logits, y) + Σ_i w_i · BCEWithLogits(exit_i logits, onehot(y); pos_weight α)

with w_i = 1/(N − i + 1) for 0-based exit i of N (1/(N+1) first, 1/2 last) and
α = 4·(K − 1) by default (the reference's 36 for CIFAR-10 / 396 for CIFAR-100).

Inference (the reference ``LargeN``) keeps a per-sample set of alive classes: at exit i
with sigmoid scores s, the current top class is made alive again (recovery), then a
class stays alive only when s > β_i · max(s) or it is that top class; a sample leaves as
soon as one class is left. The top class always survives, so the alive set is never
empty: the reference's rule alone keeps it only for β < 1 (at β = 1 it empties the set
and the final argmax over all −inf returns class 0); here β = 1 (or more, clamped to 1)
keeps the top class alone, so every sample leaves at that exit with it. If none fires,
the final classifier decides among the alive classes (excluded logits masked with −inf,
identically in search and test — the reference masks with 0 in search and not at all in
test). Everything is vectorised over samples and β vectors with recovery per row (the
reference's batched search broadcasts the recovery over all rows). One exit's update
(``exclusion_step``) serves both the trace (``ClassExclusionTrace``, built by
``build_traces`` from the heads' sigmoids and the final logits that ``exit_step`` hands
over as ``detail``) and the executor (``decide``, with the alive sets kept in the
per-sample state), so the two cannot disagree.

β search (the reference ``_large_n_search``): on the calibration split, goal = accuracy
without exclusion − ``tolerance``; exits are visited in descending MACs of the segment
before them (backbone MACs from the previous exit to this one, the first from the input);
each β_i rises from 0.01 in 0.01 steps up to 0.99 while accuracy stays above the goal;
at the first level L that fails, β_i = L − 2·step clamped to [0.01, 0.99]; when no level
up to 0.99 fails, β_i = 0.99. Earlier exits keep their β. One β vector per tolerance in
``tolerances`` gives the curve (a harness addition; the paper reports one tolerance): 0 and
32 geometric steps from 0.05 % to 50 % by default, plus (``refine``) each searched vector
with one exit at β = 1 and each exit alone at β = 1, cheaper points than the 0.99 cap
reaches (harness additions; the hull on the calibration split picks among them). An exit
whose β is 0 never excludes anything, so it is switched off (not evaluated, not paid). The
search evaluates every level of one exit in one pass over the calibration trace
(``level_accuracies``): the same numbers as the reference's level-by-level climb.

Deviations, in ``notes``: the backbone starts from the cached base network and trains
for the suite's budget (``from_scratch: true`` starts from initialisation), with SGD
(lr 0.02, momentum 0.9, wd 5e-4, as the VGG config) under a cosine decay over the
budget's planned samples instead of the 200-epoch multistep schedule; heads at every exit
point but the last stage (``exit_stages`` to choose), as the VGG-small config puts one
after every layer; costs are MACs of the backbone plus every evaluated head, counted by the
core on the head module (``count_macs``: the adaptive average pool, one per input value
C·H·W, + Linear), not the reference's pruning-aware counter; the
exclusion test itself (sigmoids, the comparisons against β·max, the alive-set update) is the
exit's decision, uncounted as every method's threshold test is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from eebench.api import (
    Budget,
    Calibrator,
    EebenchError,
    ExitCosts,
    ExitState,
    ExitStrategy,
    ExitTrace,
    MethodContext,
    MethodReport,
    StagedBackbone,
    StepOutput,
    check_finite_loss,
    count_macs,
    exit_costs_at,
    seeded_modules,
)
from eebench_plugins.manifests.class_exclusion import (
    DEFAULT_TOLERANCES,
    MAX_BETA,
    MIN_STEP,
    ClassExclusionParams,
    ClassExclusionSearchParams,
)


class ExclusionHead(nn.Module):
    """Average-pool to e×e, flatten, one Linear(C·e², K): the reference "Snet"."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, expansion: int = 1) -> None:
        super().__init__()
        self.shape, self.expansion = tuple(shape), int(expansion)
        channels = shape[0]
        self.pool = nn.AdaptiveAvgPool2d(self.expansion) if len(shape) == 3 else nn.Identity()
        width = channels * self.expansion**2 if len(shape) == 3 else math.prod(shape)
        self.linear = nn.Linear(width, num_classes)
        self._macs = count_macs(self, torch.zeros(1, *self.shape))  # at batch 1, on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(x), 1))

    def macs(self) -> float:
        """MACs at batch 1 by the core's counter (``count_macs`` on this head when it was built:
        pooling + Linear)."""
        return self._macs


def exclusion_step(scores: torch.Tensor, alive: torch.Tensor,
                   betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One exclusion exit for a batch of samples: the rule the trace and the executor share.

    scores: [..., K] sigmoids of the exit's head; alive: [..., K] alive sets before it; betas: [...]
    (broadcast against scores' leading dimensions; +inf or <= 0 = exit off: nothing changes, nobody
    leaves). The top class is made alive again, then only classes with s > β·max(s) (and the top
    class) stay alive. Returns (alive after, [...] leaving: one class left, [...] that class).
    """
    on = torch.isfinite(betas) & (betas > 0)
    top_value, top = scores.max(-1, keepdim=True)
    keep = scores > betas.clamp(max=1.0)[..., None] * top_value
    top = top.expand(*keep.shape[:-1], 1)
    keep = keep.scatter(-1, top, True)  # the top class survives even at β = 1: never an empty set
    updated = alive.expand_as(keep).scatter(-1, top, True) & keep  # recovery: each sample's own top class
    alive = torch.where(on[..., None], updated, alive)
    return alive, on & (alive.sum(-1) == 1), alive.int().argmax(-1)


def walk_exits(scores_at: Callable[[int], torch.Tensor], betas_at: Callable[[int], torch.Tensor],
               exits: Iterable[int], alive: torch.Tensor, active: torch.Tensor, pred: torch.Tensor,
               first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples still ``active`` through ``exits`` in order (``exclusion_step`` at each; an exit whose β is
    off for every row is skipped): the alive sets, who is still in, and the class of those who left
    (``first`` gets the exit they left at, in place, when given)."""
    for i in exits:
        beta = betas_at(i)
        if not bool((torch.isfinite(beta) & (beta > 0)).any()):
            continue
        updated, leaves, single = exclusion_step(scores_at(i), alive, beta)
        alive = torch.where(active[..., None], updated, alive)
        leaving = active & leaves
        if first is not None:
            first[leaving] = i
        pred = torch.where(leaving, single, pred)
        active = active & ~leaving
    return alive, active, pred


def exclusion_outcome(scores: torch.Tensor, final_logits: torch.Tensor, betas: torch.Tensor,
                      with_alive: bool = False) -> tuple[torch.Tensor, ...]:
    """First exit and prediction of every sample under each β vector.

    scores: [J, N, K] sigmoid outputs of the J exclusion heads; final_logits: [N, K];
    betas: [V, J] (+inf or 0 = exit off; β ≥ 1 keeps only the top class).
    Returns ([V, N] exit index, J = final; [V, N] class), plus the [V, N, K] alive sets
    at the end (at the exit taken, or after the last exit) when ``with_alive``.
    """
    num_heads, num_samples, k = scores.shape
    vectors = betas.shape[0]
    alive = torch.ones(vectors, num_samples, k, dtype=torch.bool)
    first = torch.full((vectors, num_samples), num_heads, dtype=torch.long)
    pred = torch.zeros(vectors, num_samples, dtype=torch.long)
    active = torch.ones(vectors, num_samples, dtype=torch.bool)  # not left yet
    alive, active, pred = walk_exits(lambda i: scores[i], lambda i: betas[:, i, None], range(num_heads),
                                     alive, active, pred, first)
    masked = final_logits[None].masked_fill(~alive, float("-inf"))
    pred = torch.where(active, masked.argmax(2), pred)
    return (first, pred, alive) if with_alive else (first, pred)


class ClassExclusionTrace(ExitTrace):
    """A trace whose decision is the class-exclusion rule; thresholds are β vectors."""

    def __init__(self, exclusion_scores: torch.Tensor, final_logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.exclusion_scores = exclusion_scores.double()  # [J, N, K]
        self.final_logits = final_logits.double()  # [N, K]
        top = self.exclusion_scores.max(2)
        preds = torch.cat([top.indices, self.final_logits.argmax(1)[None]])
        scores = torch.cat([top.values, torch.ones_like(top.values[:1])])
        super().__init__(preds=preds, scores=scores, labels=labels)

    def first_exit(self, thresholds: torch.Tensor) -> torch.Tensor:
        return self.outcome(thresholds)[0]

    def outcome(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, pred = self._exits(thresholds)
        return first, pred == self.labels[None]

    def predictions(self, thresholds: torch.Tensor) -> torch.Tensor:
        """The class each sample leaves with: the one alive class, or the masked argmax at the end."""
        return self._exits(thresholds)[1]

    def _exits(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        betas = torch.as_tensor(thresholds, dtype=torch.float64)
        return exclusion_outcome(self.exclusion_scores, self.final_logits, betas.reshape(-1, betas.shape[-1]))


class ClassExclusion(ExitStrategy):
    """Exclusion heads trained jointly with the backbone; see the module docstring."""

    Params = ClassExclusionParams
    default_calibrator = "class-exclusion-search"
    notes = (
        "Class exclusion: backbone + exclusion heads trained jointly from the cached base network under the "
        "budget (SGD lr 0.02, cosine decay; the paper trains 200 epochs from scratch), heads at every exit point "
        "but the last stage; β search per the paper (0.01 steps up to 0.99, back off two steps, exits by "
        "preceding-segment MACs) for 33 accuracy tolerances (0, 0.05–50 %), plus each searched vector with one "
        "exit at β = 1 and each exit alone at β = 1 (cheaper than the 0.99 cap; harness additions); the top "
        "class always survives exclusion (even at β = 1, where the reference empties the set); excluded final "
        "logits masked with −inf in search and test."
    )

    def __init__(
        self,
        backbone: StagedBackbone,
        context: MethodContext,
        exit_stages: Sequence[int] | None = None,
        expansion: int = 1,
        pos_weight: float | None = None,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        from_scratch: bool = False,
    ) -> None:
        super().__init__(backbone, context)
        last = len(backbone.stages) - 1
        stages = list(exit_stages) if exit_stages is not None else [p for p in backbone.exit_points if p < last]
        if not stages or any(s not in backbone.exit_points or s >= last for s in stages) or stages != sorted(
                set(stages)):
            raise EebenchError(f"exit_stages must be increasing exit points before the last stage "
                               f"{[p for p in backbone.exit_points if p < last]}, got {stages}", key="exit_stages")
        if not lr > 0:
            raise EebenchError(f"lr must be > 0, got {lr}", key="lr")
        if expansion < 1:
            raise EebenchError(f"expansion must be >= 1, got {expansion}", key="expansion")
        k = context.num_classes
        self.exit_stages = stages
        self.pos_weight = float(pos_weight) if pos_weight is not None else 4.0 * (k - 1)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.from_scratch = bool(from_scratch)
        shapes = context.stage_costs.stage_shapes
        self.heads = seeded_modules(context.seed, context.device,
                                    lambda: nn.ModuleList(ExclusionHead(shapes[s], k, expansion) for s in stages))
        n = len(stages)
        self.loss_weights = [1.0 / (n - i + 1) for i in range(n)]

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.heads]

    def _forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every head's logits and the final logits, from one pass (the training loop's forward)."""
        heads, out = [], x
        lookup = dict(zip(self.exit_stages, self.heads, strict=True))
        for index, stage in enumerate(self.backbone.stages):
            out = stage(out)
            if index in lookup:  # each head right after its stage: the autograd order, hence the numbers,
                heads.append(lookup[index](out))  # of the reference loop (stage_taps would reorder the sums)
        return heads, self.backbone.head(out)

    def loss(self, head_logits: list[torch.Tensor], final_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE on the final output plus the weighted, pos-weighted BCE of every exclusion head."""
        onehot = F.one_hot(y, self.context.num_classes).to(final_logits.dtype)
        pos_weight = torch.full((self.context.num_classes,), self.pos_weight, device=y.device)
        total = F.cross_entropy(final_logits, y)
        for weight, logits in zip(self.loss_weights, head_logits, strict=True):
            total = total + weight * F.binary_cross_entropy_with_logits(logits, onehot, pos_weight=pos_weight)
        return total

    def fit(self, train: Dataset, budget: Budget) -> None:
        ctx = self.context
        if self.from_scratch:
            if ctx.fresh_backbone is None:
                raise EebenchError("from_scratch needs a fresh backbone from the harness (context.fresh_backbone); "
                                   "expected a run through eebench", key="from_scratch")
            self.backbone.load_state_dict(ctx.fresh_backbone().state_dict())
        parameters = [*self.backbone.parameters(), *self.heads.parameters()]
        optimizer = torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        planned = budget.planned_samples
        self.backbone.train()
        self.heads.train()
        seen = 0
        per_sample = 3 * (ctx.stage_costs.total + sum(h.macs() for h in self.heads))  # forward + 2x backward
        for x, y in budget.batches(train, ctx.train_batch_size, device=ctx.device, augment=ctx.augment,
                                   seed=ctx.seed, description="class exclusion", macs_per_sample=per_sample):
            if planned:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * min(seen / planned, 1.0)))
            head_logits, final_logits = self._forward(x)
            loss = self.loss(head_logits, final_logits, y)
            check_finite_loss(loss, f"class exclusion training loss after {seen} samples")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += int(y.shape[0])
        self.eval()

    def exit_taps(self) -> list[int]:
        return list(self.exit_stages)

    @torch.no_grad()
    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        """Exclusion head j: its top class and top sigmoid (for inspection), with every class's sigmoid as
        ``detail`` (what the rule reads); the final exit: the softmax's top class, the logits as ``detail``."""
        if j < len(self.heads):
            sigmoids = torch.sigmoid(self.heads[j](features).double())
            top = sigmoids.max(1)
            return StepOutput(top.indices, top.values, sigmoids)
        logits = self.backbone.head(features).double()
        final = torch.softmax(logits, 1).max(1)
        return StepOutput(final.indices, final.values, logits)

    def init_state(self, x: torch.Tensor) -> ExitState:
        """Every class alive for every sample."""
        return {"alive": torch.ones(x.shape[0], self.context.num_classes, dtype=torch.bool, device=x.device)}

    def decide(self, j: int, out: StepOutput, thresholds: torch.Tensor, state: ExitState) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
        """``exclusion_outcome``'s rule one exit at a time, ``thresholds`` the rows' β (+inf or <= 0: exit off)."""
        if out.detail is None:
            raise ValueError("class exclusion decides from exit_step's detail; got none")
        if j == len(self.heads):  # the final classifier among the classes still alive
            pred = out.detail.masked_fill(~state["alive"], float("-inf")).argmax(1)
            return torch.ones_like(pred, dtype=torch.bool), pred
        alive, leaving, pred = exclusion_step(out.detail, state["alive"], thresholds.to(out.detail.device))
        state["alive"] = alive
        return leaving, pred

    def build_traces(self, preds: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                     details: list[torch.Tensor | None]) -> list[ExitTrace]:
        """One ``ClassExclusionTrace`` from every head's sigmoids and the final logits."""
        return [ClassExclusionTrace(torch.stack(details[:-1]), details[-1], labels)]

    def report(self) -> MethodReport:
        return MethodReport(exit_names=[f"excl@block{s}" for s in self.exit_stages] + ["final"], notes=self.notes)

    def exit_costs(self) -> ExitCosts:
        return exit_costs_at(self.context.stage_costs, self.exit_stages, [h.macs() for h in self.heads])


def level_accuracies(trace: ClassExclusionTrace, betas: torch.Tensor, exit_index: int,
                     levels: torch.Tensor) -> torch.Tensor:
    """[L] calibration accuracy of ``betas`` with β[exit_index] set to each level (0 < level < 1).

    Exact and one pass instead of one per level: the exits before ``exit_index`` do not depend on its β,
    so their alive sets are computed once; at the exit, level L keeps the candidates (the alive set plus
    the top class) scoring above L·max, which is always the m(L) best of them, so only the K prefix sets
    of the candidates sorted by score are carried through the later exits, and each level reads the
    outcome of its own prefix size per sample. Same comparisons, same float64 products as
    ``exclusion_outcome``, same mean: the numbers of evaluating every level in full.
    """
    scores, final, labels = trace.exclusion_scores, trace.final_logits, trace.labels
    num_heads, num_samples, k = scores.shape
    before = betas.clone()
    before[exit_index:] = 0  # the exits up to this one, as they are
    alive, active, settled = walk_exits(  # settled: the class of samples that already left
        lambda i: scores[i], lambda i: before[i], range(exit_index), torch.ones(num_samples, k, dtype=torch.bool),
        torch.ones(num_samples, dtype=torch.bool), torch.zeros(num_samples, dtype=torch.long))
    here = scores[exit_index]  # [N, K]
    top_value, top = here.max(-1, keepdim=True)
    candidates = alive.scatter(-1, top, True)  # recovery: the top class is alive again
    # m(L): the candidates scoring above L·max (the rule's own float64 product and strict comparison);
    # L·max climbs with L, so class c stays for the levels below its cutoff: the first with L·max >= s_c
    products = top_value * levels[None, :]  # [N, L], ascending per sample
    cutoff = torch.searchsorted(products, here.contiguous(), side="left")  # [N, K]
    cutoff = torch.where(candidates, cutoff, torch.zeros_like(cutoff))
    counts = torch.zeros(num_samples, levels.numel() + 1, dtype=torch.long).scatter_add_(
        1, cutoff, torch.ones_like(cutoff))  # [N, L + 1] candidates by cutoff (non-candidates at 0)
    gone_by = counts.cumsum(1)[:, :-1]  # [N, L]: classes with cutoff <= l
    size = (k - gone_by).clamp(min=1)  # [N, L] survivors: cutoff > l; the top class stays
    # only the (sample, prefix size) pairs some level reaches go through the later exits
    reached = torch.zeros(num_samples, k + 1, dtype=torch.bool).scatter_(1, size, True)
    reached &= active[:, None]
    sample, kept = reached.nonzero(as_tuple=True)
    ranked = here.masked_fill(~candidates, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(k).expand(num_samples, k))
    pair_alive = (rank[sample] < kept[:, None]) & candidates[sample]  # [P, K]: the `kept` best candidates
    pair_active = kept > 1  # one class left: the sample leaves here
    pair_alive, pair_active, pred = walk_exits(  # through the later exits (those already searched)
        lambda i: scores[i][sample], lambda i: betas[i], range(exit_index + 1, num_heads), pair_alive, pair_active,
        pair_alive.int().argmax(-1))
    masked = final[sample].masked_fill(~pair_alive, float("-inf")).argmax(-1)
    pred = torch.where(pair_active, masked, pred)
    table = torch.zeros(num_samples, k + 1, dtype=torch.bool)
    table[sample, kept] = pred == labels[sample]
    correct_here = table.gather(1, size).T  # [L, N]
    gone = ~active  # samples gone before this exit keep their earlier answer
    if bool(gone.any()):
        correct_here[:, gone] = (settled[gone] == labels[gone])[None]
    return correct_here.double().mean(1)


def search_betas(trace: ClassExclusionTrace, order: Sequence[int], tolerance: float,
                 step: float = 0.01, memo: dict | None = None) -> torch.Tensor:
    """The reference's greedy β search for one accuracy tolerance; returns [J] β.

    For each exit in ``order`` (earlier exits keep their β, later ones sit at 0), the
    candidate βs step, 2·step, … up to 0.99 are evaluated in climbing order; the first
    level L whose accuracy is no longer above the goal stops the climb and β = L − 2·step,
    clamped to [step, 0.99]; if no level fails, β = 0.99. Levels stop at 0.99: β = 1
    would leave only the top class at that exit. Every level's accuracy comes from one
    ``level_accuracies`` pass (``memo`` shares them between tolerances that reach the same
    state).
    """
    num_heads = trace.exclusion_scores.shape[0]
    betas = torch.zeros(num_heads, dtype=torch.float64)
    start = float(trace.outcome(betas[None])[1].double().mean())
    goal = start - tolerance
    count = int(math.floor(MAX_BETA / step + 1e-9))
    levels = torch.tensor([min(round(k * step, 12), MAX_BETA) for k in range(1, count + 1)],
                          dtype=torch.float64)  # 0.01 .. 0.99
    memo = {} if memo is None else memo
    for exit_index in order:
        key = (exit_index, step, tuple(betas.tolist()))
        if key not in memo:
            memo[key] = level_accuracies(trace, betas, exit_index, levels)
        failing = (memo[key] <= goal).nonzero()
        beta = MAX_BETA  # never failing: the climb ran through 0.99
        if failing.numel():
            stop = float(levels[int(failing[0])])
            beta = min(max(round(stop - 2 * step, 12), step), MAX_BETA)
        betas[exit_index] = beta
    return betas


def search_order(costs: ExitCosts) -> list[int]:
    """Exclusion exits by the MACs of the backbone segment before each, descending (ties: earlier first)."""
    reach = costs.backbone_macs[:-1].double()
    segments = reach - torch.cat([reach.new_zeros(1), reach[:-1]])
    return sorted(range(segments.numel()), key=lambda j: -float(segments[j]))


class ClassExclusionSearch(Calibrator):
    """β vectors from the paper's greedy search, one per accuracy tolerance, and (``refine``) cheaper
    neighbours of each: the vector with one exit at β = 1 (every sample still in leaves there with its
    top class), for every exit, and every exit alone at β = 1. The search caps β at 0.99, so without them
    the cheapest candidate is 0.99 everywhere; the calibration hull decides which are worth keeping."""

    Params = ClassExclusionSearchParams
    for_methods = ("class-exclusion",)  # it searches only this method's trace; checked by validate

    def __init__(self, tolerances: Sequence[float] = DEFAULT_TOLERANCES, step: float = 0.01,
                 order: Sequence[int] | None = None, refine: bool = True) -> None:
        if not tolerances or any(not 0 <= t <= 1 for t in tolerances) or not MIN_STEP <= step <= MAX_BETA:
            raise ValueError(f"tolerances must be a non-empty list of values in [0, 1] and {MIN_STEP} <= step <= "
                             f"{MAX_BETA}")
        self.tolerances, self.step = [float(t) for t in tolerances], float(step)
        self.order = list(order) if order is not None else None
        self.refine = bool(refine)

    def thresholds(self, trace: ExitTrace, costs: ExitCosts, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(trace, ClassExclusionTrace):
            raise EebenchError(f"class-exclusion-search calibrates only the class-exclusion method, got a "
                               f"{type(trace).__name__}; expected calibrator: class-exclusion-search only on "
                               "method class-exclusion")
        order = self.order if self.order else search_order(costs)
        heads = int(trace.exclusion_scores.shape[0])
        if any(not 0 <= j < heads for j in order):
            raise EebenchError(f"order {list(order)} names exits outside 0..{heads - 1}; expected indices of this "
                               f"method's {heads} exclusion exits", key="order")
        memo: dict = {}
        vectors = torch.stack([search_betas(trace, order, t, self.step, memo) for t in self.tolerances])
        if self.refine:
            vectors = torch.cat([vectors, *forced_neighbours(vectors)]).unique(dim=0)
        return torch.where(vectors > 0, vectors, torch.full_like(vectors, float("inf")))  # β = 0: exit off


def forced_neighbours(vectors: torch.Tensor) -> list[torch.Tensor]:
    """For [V, J] β vectors: each with exit j at β = 1 (one block per j), and each exit alone at β = 1."""
    heads = vectors.shape[1]
    blocks = []
    for j in range(heads):
        block = vectors.clone()
        block[:, j] = 1.0
        blocks.append(block)
    blocks.append(torch.eye(heads, dtype=vectors.dtype))
    return blocks
