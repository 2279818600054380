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
reference's batched search broadcasts the recovery over all rows). Alive sets are packed
into int64 words (``pack``), and the classes an exit keeps are the best few by score, found
by one ``searchsorted`` per sample and β in the exit's ``ExitTable``: one exit costs O(V·N)
integer operations for V vectors and N samples, not O(V·N·K). One exit's update
(``exclusion_update``) serves both the trace (``ClassExclusionTrace``, built by
``build_traces`` from the heads' sigmoids and the final logits that ``exit_step`` hands
over as ``detail``) and the executor (``decide``, with the alive sets kept in the
per-sample state), so the two cannot disagree. The trace walks vectors that share their
first β together (``tables_outcome``).

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
from dataclasses import dataclass, field
from typing import NamedTuple

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


BITS = 63  # classes per int64 word of a packed class set (the sign bit stays clear)
CHUNK = 1 << 22  # elements per block of the final masked argmax: bounds its float64 temporaries


def set_words(k: int) -> int:
    """Words of a packed set of ``k`` classes."""
    return (k + BITS - 1) // BITS


def class_bits(classes: torch.Tensor, k: int) -> torch.Tensor:
    """[..., W] the packed set holding only ``classes`` [...] (of ``k``)."""
    words = torch.zeros(*classes.shape, set_words(k), dtype=torch.long, device=classes.device)
    bit = torch.ones_like(classes).bitwise_left_shift(classes % BITS)
    return words.scatter_(-1, (classes // BITS)[..., None], bit[..., None])


def pack(mask: torch.Tensor) -> torch.Tensor:
    """[..., K] bool to the packed [..., W] set: the rule's alive sets as a few integers per sample, so
    that one exit over V β vectors costs O(V·N) integer operations instead of O(V·N·K)."""
    k = mask.shape[-1]
    classes = torch.arange(k, device=mask.device)
    words = torch.zeros(*mask.shape[:-1], set_words(k), dtype=torch.long, device=mask.device)
    return words.index_add_(-1, classes // BITS, mask.long().bitwise_left_shift(classes % BITS))


def unpack(words: torch.Tensor, k: int) -> torch.Tensor:
    """[..., W] packed sets of ``k`` classes to [..., K] bool."""
    classes = torch.arange(k, device=words.device)
    return words[..., classes // BITS].bitwise_right_shift(classes % BITS).bitwise_and(1).bool()


def members(words: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """[R, M] bool: whether each of ``classes`` [R, M] is in its row's packed set ([R, W])."""
    return words.gather(1, classes // BITS).bitwise_right_shift(classes % BITS).bitwise_and(1).bool()


@dataclass(frozen=True)
class ExitTable:
    """One exclusion exit's sigmoids ([R, K], R samples) arranged for the rule, once per exit.

    The set the rule keeps, {c: s_c > β·max(s)}, is always the best few classes by score, so it is read
    from ``prefixes`` at the count ``searchsorted`` finds in ``ascending``: the same float64 products and
    strict comparisons as testing every class, O(log K) per sample and β.
    """

    top_value: torch.Tensor  # [R] max(s)
    top: torch.Tensor  # [R] its class (``max``'s own index, as the rule always had)
    top_bit: torch.Tensor  # [R, W] the set {top}
    order: torch.Tensor  # [R, K] the classes ``by_score``
    ascending: torch.Tensor  # [R, K] the scores, ascending
    prefixes: torch.Tensor  # [R, K + 1, W] the set of the first c classes of ``by_score``, c = 0..K

    @classmethod
    def of(cls, scores: torch.Tensor) -> ExitTable:
        k = scores.shape[-1]
        top_value, top = scores.max(-1)
        order = by_score(scores)
        bits = class_bits(order, k)  # [R, K, W], one bit each: their running sum is the running union
        prefixes = torch.cat([torch.zeros_like(bits[:, :1]), bits.cumsum(1)], 1)
        ascending = scores.gather(-1, order).flip(-1).contiguous()
        return cls(top_value, top, class_bits(top, k), order, ascending, prefixes)


def by_score(scores: torch.Tensor) -> torch.Tensor:
    """[R, K] classes by descending score, ties by class index (a stable sort)."""
    return scores.argsort(dim=-1, descending=True, stable=True)


def exit_on(betas: torch.Tensor) -> torch.Tensor:
    """Where an exit applies: β finite and > 0 (+inf or <= 0: the exit is off)."""
    return torch.isfinite(betas) & (betas > 0)


def kept_classes(table: ExitTable, betas: torch.Tensor) -> torch.Tensor:
    """[R, V, W] the classes an exit keeps at β (``betas`` [R or 1, V]): s > β·max(s), and the top class
    even at β = 1."""
    bound = (betas.clamp(max=1.0) * table.top_value[:, None]).contiguous()
    count = table.ascending.shape[-1] - torch.searchsorted(table.ascending, bound, right=True)  # s > β·max
    keep = table.prefixes.gather(1, count[..., None].expand(*count.shape, table.prefixes.shape[-1]))
    return keep | table.top_bit[:, None]


def exclusion_update(table: ExitTable, alive: torch.Tensor, betas: torch.Tensor, on: torch.Tensor,
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One exclusion exit: the rule the trace and the executor share.

    alive: [R, V, W] packed alive sets before the exit (V β vectors per sample); betas: broadcast to
    [R, V]; on: [R, V] where the exit applies (elsewhere nothing changes and nobody leaves). The top
    class is made alive again, then only classes with s > β·max(s) (and the top class) stay alive.
    ``rows``: row r is the table's sample rows[r] (one β for all rows: each sample's kept classes are
    found once, whatever the number of its rows). Returns (alive after, [R, V] leaving: the top class is
    the one left).
    """
    keep, top = kept_classes(table, betas), table.top_bit[:, None]
    if rows is not None:
        keep, top = keep[rows], top[rows]
    updated = (alive | top) & keep  # recovery, then the rule
    alive = torch.where(on[..., None], updated, alive)
    return alive, on & (alive == top).all(-1)


def walk_exit(table: ExitTable, index: int, beta: torch.Tensor, alive: torch.Tensor, active: torch.Tensor,
              pred: torch.Tensor, first: torch.Tensor | None = None,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows [R, V] still ``active`` through exit ``index`` (``exclusion_update``, ``rows`` as there): the
    alive sets, who is still in, and the class of those who left (``first`` gets ``index`` where they
    left, in place)."""
    alive, leaving = exclusion_update(table, alive, beta, exit_on(beta) & active, rows)
    if first is not None:
        first[leaving] = index
    top = table.top if rows is None else table.top[rows]
    return alive, active & ~leaving, torch.where(leaving, top[:, None], pred)


def walk_exits(tables: Sequence[ExitTable], betas_at: Callable[[int], torch.Tensor], exits: Iterable[int],
               alive: torch.Tensor, active: torch.Tensor, pred: torch.Tensor, first: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``walk_exit`` through ``exits`` in order; an exit whose β is off for every row is skipped."""
    for i in exits:
        beta = betas_at(i)
        if bool(exit_on(beta).any()):
            alive, active, pred = walk_exit(tables[i], i, beta, alive, active, pred, first, rows)
    return alive, active, pred


def masked_argmax(logits: torch.Tensor, rows: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """[P] the final classifier's answer among each packed set ([P, W]) for samples ``rows`` [P] of
    ``logits`` [N, K]: excluded logits masked with −inf, then argmax, in blocks of bounded size."""
    k = logits.shape[-1]
    out = torch.empty(rows.shape, dtype=torch.long, device=logits.device)
    step = max(1, CHUNK // k)
    for start in range(0, rows.numel(), step):
        block = slice(start, start + step)
        out[block] = logits[rows[block]].masked_fill(~unpack(sets[block], k), float("-inf")).argmax(-1)
    return out


def final_answer(logits: torch.Tensor, samples: torch.Tensor | None, alive: torch.Tensor, active: torch.Tensor,
                 pred: torch.Tensor) -> torch.Tensor:
    """``pred`` [R, V] with the rows still ``active`` answered by the final classifier among their alive
    classes; row r reads ``logits[samples[r]]`` (``logits[r]`` when ``samples`` is None)."""
    row, column = active.nonzero(as_tuple=True)
    pred = pred.clone()
    pred[row, column] = masked_argmax(logits, row if samples is None else samples[row], alive[row, column])
    return pred


@dataclass(frozen=True)
class ExclusionTables:
    """A trace's exits as ``ExitTable``s and its final logits [N, K], built once per trace; the β search's
    level cutoffs (``level_cutoffs``) are kept in ``cutoffs`` as they are first asked for."""

    exits: list[ExitTable]
    final: torch.Tensor
    final_rank: torch.Tensor  # [N, K] each class's place in argmax order: by descending logit, ties by index
    cutoffs: dict[tuple[int, bytes], torch.Tensor] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, scores: torch.Tensor, final: torch.Tensor) -> ExclusionTables:
        order = final.argsort(dim=-1, descending=True, stable=True)  # NaN first, as argmax picks it
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(final.shape[-1]).expand_as(order))
        return cls([ExitTable.of(s) for s in scores], final, rank)

    def best_so_far(self, rows: torch.Tensor, order: torch.Tensor, is_candidate: torch.Tensor) -> torch.Tensor:
        """[R, K] for samples ``rows``: the final classifier's answer among the first m candidates of an
        exit's ``by_score`` ``order`` ([R, K]; ``is_candidate`` [R, K] bool in that order), m = the
        candidates up to each position: the lowest ``final_rank`` so far, which is ``masked_argmax`` of that
        set (0 when all its logits are −inf, as there). Valid at the candidates' positions."""
        ranks = self.final_rank[rows].gather(1, order).masked_fill(~is_candidate, self.final.shape[-1])
        best = order.gather(1, ranks.cummin(1).indices)
        return best.masked_fill(self.final[rows].gather(1, best) == float("-inf"), 0)

    def level_cutoffs(self, exit_index: int, levels: torch.Tensor) -> torch.Tensor:
        """[N, K] for each exit's classes in ``order``: the first level L (index, len(levels) if none) with
        L·max >= s, the level from which the rule drops the class; independent of every β."""
        key = (exit_index, levels.numpy().tobytes())
        if key not in self.cutoffs:
            table = self.exits[exit_index]
            products = table.top_value[:, None] * levels[None, :]  # [N, L], the rule's float64 product
            self.cutoffs[key] = torch.searchsorted(products, table.ascending.flip(-1).contiguous(), side="left")
        return self.cutoffs[key]


class Walk(NamedTuple):
    """Samples × groups of β vectors part-way through the exits: [N, U, W] alive sets, [N, U] still in,
    [N, U] class of those who left, [N, U] the exit they left at."""

    alive: torch.Tensor
    active: torch.Tensor
    pred: torch.Tensor
    first: torch.Tensor

    def columns(self, index: torch.Tensor) -> Walk:
        return Walk(*(part.index_select(1, index) for part in self))


class Outcome(NamedTuple):
    """Every vector's [V, N] exit and class, and (when asked for) its [V, N, W] alive sets at the end."""

    first: torch.Tensor
    pred: torch.Tensor
    alive: torch.Tensor | None

    def write(self, vectors: torch.Tensor, walk: Walk, columns: torch.Tensor) -> None:
        """The results of ``vectors``, each the walk's column ``columns``, written out."""
        self.first[vectors] = walk.first[:, columns].T
        self.pred[vectors] = walk.pred[:, columns].T
        if self.alive is not None:
            self.alive[vectors] = walk.alive[:, columns].transpose(0, 1)


def every_class(shape: tuple[int, ...], k: int, device: torch.device | None = None) -> torch.Tensor:
    """[*shape, W] the packed set of all ``k`` classes (an expanded view: clone it to write into it)."""
    return pack(torch.ones(k, dtype=torch.bool, device=device)).expand(*shape, set_words(k))


def tables_outcome(tables: ExclusionTables, betas: torch.Tensor,
                   with_alive: bool = False) -> tuple[torch.Tensor, ...]:
    """``exclusion_outcome`` from a trace's tables.

    Vectors that share β_0..β_j share everything up to exit j, so the walk runs on groups: at each exit
    every group splits by its vectors' β there (the distinct prefixes so far), and a group nobody is
    left in (β = 1 somewhere, typically) is written out and dropped. Each vector's numbers are those of
    walking it alone; the candidate vectors of a search share most of their walk.
    """
    num_samples, k = tables.final.shape
    vectors, num_heads = betas.shape
    out = Outcome(torch.empty(vectors, num_samples, dtype=torch.long),
                  torch.empty(vectors, num_samples, dtype=torch.long),
                  torch.empty(vectors, num_samples, set_words(k), dtype=torch.long) if with_alive else None)
    group = torch.zeros(vectors, dtype=torch.long)  # each vector's column of the walk (-1: written out)
    walk = Walk(every_class((num_samples, 1), k), torch.ones(num_samples, 1, dtype=torch.bool),
                torch.zeros(num_samples, 1, dtype=torch.long), torch.full((num_samples, 1), num_heads))
    for i in range(num_heads):
        live = (group >= 0).nonzero()[:, 0]
        if not live.numel():
            break
        split, group[live] = torch.stack([group[live].double(), betas[live, i]], 1).unique(
            dim=0, return_inverse=True)  # sorted by (group, β): a group that does not split keeps its column
        if split.shape[0] != walk.active.shape[1]:
            walk = walk.columns(split[:, 0].long())
        beta = split[None, :, 1]
        if bool(exit_on(beta).any()):
            walk = Walk(*walk_exit(tables.exits[i], i, beta, *walk), walk.first)
        done = ~walk.active.any(0)
        if bool(done.any()):
            finished = live[done[group[live]]]
            out.write(finished, walk, group[finished])
            kept = (~done).nonzero()[:, 0]
            column = torch.full_like(done, -1, dtype=torch.long)
            column[kept] = torch.arange(kept.numel())
            group[live] = column[group[live]]
            walk = walk.columns(kept)
    live = (group >= 0).nonzero()[:, 0]
    if live.numel():
        walk = walk._replace(pred=final_answer(tables.final, None, walk.alive, walk.active, walk.pred))
        out.write(live, walk, group[live])
    if with_alive:
        return out.first, out.pred, unpack(out.alive, k)
    return out.first, out.pred


def exclusion_outcome(scores: torch.Tensor, final_logits: torch.Tensor, betas: torch.Tensor,
                      with_alive: bool = False) -> tuple[torch.Tensor, ...]:
    """First exit and prediction of every sample under each β vector.

    scores: [J, N, K] sigmoid outputs of the J exclusion heads; final_logits: [N, K];
    betas: [V, J] (+inf or 0 = exit off; β ≥ 1 keeps only the top class).
    Returns ([V, N] exit index, J = final; [V, N] class), plus the [V, N, K] alive sets
    at the end (at the exit taken, or after the last exit) when ``with_alive``.
    """
    return tables_outcome(ExclusionTables.of(scores, final_logits), betas, with_alive)


class ClassExclusionTrace(ExitTrace):
    """A trace whose decision is the class-exclusion rule; thresholds are β vectors."""

    def __init__(self, exclusion_scores: torch.Tensor, final_logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.exclusion_scores = exclusion_scores.double()  # [J, N, K]
        self.final_logits = final_logits.double()  # [N, K]
        top = self.exclusion_scores.max(2)
        preds = torch.cat([top.indices, self.final_logits.argmax(1)[None]])
        scores = torch.cat([top.values, torch.ones_like(top.values[:1])])
        super().__init__(preds=preds, scores=scores, labels=labels)
        self.tables = ExclusionTables.of(self.exclusion_scores, self.final_logits)

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
        return tables_outcome(self.tables, betas.reshape(-1, betas.shape[-1]))


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
        """Every class alive for every sample (packed sets, ``pack``)."""
        return {"alive": every_class((x.shape[0],), self.context.num_classes, x.device).clone()}

    def decide(self, j: int, out: StepOutput, thresholds: torch.Tensor, state: ExitState) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
        """``exclusion_outcome``'s rule one exit at a time, ``thresholds`` the rows' β (+inf or <= 0: exit off)."""
        if out.detail is None:
            raise ValueError("class exclusion decides from exit_step's detail; got none")
        rows = torch.arange(out.detail.shape[0], device=out.detail.device)
        if j == len(self.heads):  # the final classifier among the classes still alive
            return torch.ones_like(rows, dtype=torch.bool), masked_argmax(out.detail, rows, state["alive"])
        table = ExitTable.of(out.detail)
        betas = thresholds.to(out.detail.device, torch.float64)[:, None]
        alive, leaving = exclusion_update(table, state["alive"][:, None], betas, exit_on(betas))
        state["alive"] = alive[:, 0]
        return leaving[:, 0], table.top

    def build_traces(self, preds: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                     details: list[torch.Tensor | None]) -> list[ExitTrace]:
        """One ``ClassExclusionTrace`` from every head's sigmoids and the final logits."""
        return [ClassExclusionTrace(torch.stack(details[:-1]), details[-1], labels)]

    def report(self) -> MethodReport:
        return MethodReport(exit_names=[f"excl@block{s}" for s in self.exit_stages] + ["final"], notes=self.notes)

    def exit_costs(self) -> ExitCosts:
        return exit_costs_at(self.context.stage_costs, self.exit_stages, [h.macs() for h in self.heads])


Prefix = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # [N, 1, W] alive sets, [N, 1] still in, [N, 1] class


def walk_before(tables: ExclusionTables, betas: torch.Tensor, exit_index: int,
                walks: dict[tuple[float, ...], Prefix]) -> Prefix:
    """``betas`` through the exits before ``exit_index``: the alive sets, who is still in, the class of who
    left. ``walks`` keeps the walk of every β prefix asked for, so a search that fills its vector one exit
    at a time walks each exit once instead of from the first exit at every step."""
    key = tuple(betas[:exit_index].tolist())
    if key not in walks:
        if exit_index == 0:
            num_samples, k = tables.final.shape
            walks[key] = (every_class((num_samples, 1), k), torch.ones(num_samples, 1, dtype=torch.bool),
                          torch.zeros(num_samples, 1, dtype=torch.long))
        else:
            j = exit_index - 1
            walks[key] = walk_exits(tables.exits, lambda _: betas[j].reshape(1, 1), [j],
                                    *walk_before(tables, betas, j, walks))
    return walks[key]


def level_accuracies(trace: ClassExclusionTrace, betas: torch.Tensor, exit_index: int, levels: torch.Tensor,
                     walks: dict[tuple[float, ...], Prefix] | None = None) -> torch.Tensor:
    """[L] calibration accuracy of ``betas`` with β[exit_index] set to each level (0 < level < 1).

    Exact and one pass instead of one per level: the exits before ``exit_index`` do not depend on its β,
    so their alive sets are computed once (``walk_before``; ``walks`` shares them between calls); at the
    exit, level L keeps the candidates (the alive set plus the top class) scoring above L·max, always the
    m(L) best of them. Each candidate, the last of the best m kept, is so for one run of levels (between
    its cutoff and the next candidate's, from ``level_cutoffs``); only those (sample, m) pairs go on to
    the later exits and the final classifier, and each adds its correctness to its run of levels (a
    difference array). Same comparisons, same float64 products as ``exclusion_outcome``, and correct
    counts / N: the numbers of evaluating every level in full.
    """
    tables, labels = trace.tables, trace.labels
    (num_samples, k), count = tables.final.shape, levels.numel()
    alive, active, settled = walk_before(tables, betas, exit_index, {} if walks is None else walks)
    here = tables.exits[exit_index]
    still = active[:, 0].nonzero()[:, 0]  # [A] the samples that reach this exit: all of what follows is theirs
    order = tables.exits[exit_index].order[still]
    candidates = alive[still, 0] | here.top_bit[still]  # [A, W] recovery: the top class is alive again
    is_candidate = members(candidates, order)  # [A, K] in descending score order
    upper = torch.where(is_candidate, tables.level_cutoffs(exit_index, levels)[still], 0)  # kept below it
    later = upper.flip(1).cummax(1).values.flip(1)  # max over this position and after: cutoffs never rise
    lower = torch.cat([later[:, 1:], torch.zeros_like(later[:, :1])], 1)  # the next candidate's cutoff
    kept = is_candidate.cumsum(1)  # the candidates up to this position
    upper = torch.where(kept == 1, count, upper)  # the best candidate stays alone above its cutoff too
    pair = (is_candidate & (upper > lower)).flatten().nonzero()[:, 0]  # (row, position) flat
    row, pred = pair // k, order.flatten()[pair]  # one kept: the sample leaves here with that class
    sample = still[row]
    on = (kept.flatten()[pair] > 1).nonzero()[:, 0]  # more kept: the sample goes on
    exits_on = [i for i in range(exit_index + 1, len(tables.exits)) if bool(exit_on(betas[i]))]
    if exits_on:  # through the later exits (those already searched), then the final classifier
        rows = sample[on]
        pair_alive = here.prefixes[rows, pair[on] % k + 1] & candidates[row[on]]  # [P, W] the kept best
        pair_alive, pair_active, pair_pred = walk_exits(
            tables.exits, lambda i: betas[i].reshape(1, 1), exits_on, pair_alive[:, None],
            torch.ones(on.numel(), 1, dtype=torch.bool), pred[on, None], rows=rows)
        pred[on] = final_answer(tables.final, rows, pair_alive, pair_active, pair_pred)[:, 0]
    else:  # straight to the final classifier
        pred[on] = tables.best_so_far(still, order, is_candidate).flatten()[pair[on]]
    correct = (pred == labels[sample]).long()
    runs = torch.zeros(count + 1, dtype=torch.long)
    runs.index_add_(0, lower.flatten()[pair], correct).index_add_(0, upper.flatten()[pair], -correct)
    gone = ~active[:, 0]  # samples gone before this exit keep their earlier answer
    correct_counts = runs.cumsum(0)[:count] + int((settled[gone, 0] == labels[gone]).sum())
    return correct_counts.double() / num_samples


def search_betas(trace: ClassExclusionTrace, order: Sequence[int], tolerance: float,
                 step: float = 0.01, memo: dict | None = None) -> torch.Tensor:
    """The reference's greedy β search for one accuracy tolerance; returns [J] β.

    For each exit in ``order`` (earlier exits keep their β, later ones sit at 0), the
    candidate βs step, 2·step, … up to 0.99 are evaluated in climbing order; the first
    level L whose accuracy is no longer above the goal stops the climb and β = L − 2·step,
    clamped to [step, 0.99]; if no level fails, β = 0.99. Levels stop at 0.99: β = 1
    would leave only the top class at that exit. Every level's accuracy comes from one
    ``level_accuracies`` pass (``memo`` shares them between tolerances that reach the same
    state; the walks of this vector's prefixes are shared between its own steps).
    """
    num_heads = trace.exclusion_scores.shape[0]
    betas = torch.zeros(num_heads, dtype=torch.float64)
    start = float(trace.outcome(betas[None])[1].double().mean())
    goal = start - tolerance
    count = int(math.floor(MAX_BETA / step + 1e-9))
    levels = torch.tensor([min(round(k * step, 12), MAX_BETA) for k in range(1, count + 1)],
                          dtype=torch.float64)  # 0.01 .. 0.99
    memo, walks = {} if memo is None else memo, {}
    for exit_index in order:
        key = (exit_index, step, tuple(betas.tolist()))
        if key not in memo:
            memo[key] = level_accuracies(trace, betas, exit_index, levels, walks)
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
