"""E²CM+SDN consulting (Görmez et al., IJCNN 2022, Sec. III-B): SDN internal classifiers
that also read the distances to the class means, and exit only when E²CM agrees.

At each SDN IC stage the IC's input is its mixed-pooled features concatenated with the
K eq.-4-normalised distances of that stage's features to the class means (computed on
the fly from the live features, never from a stale augmented pass: spec §1.2 item 7's
pitfall). The ICs are trained like SDN (Adam, summed CE, budgeted batches of cached
un-augmented activations). At inference a sample leaves at IC j only when

    IC max-softmax >= T_ic[j]  AND  E²CM max-softmax > T_cm[j]  [AND both argmaxes agree]

so an exit never happens where either party says continue. The bracketed clause is the
``"same-class"`` agreement rule; ``"confidence"`` drops it (spec §1.2 item 7 asks for
both). Requiring the same class vetoes the ~20 % of samples on which the two disagree at
every IC, which keeps the cheapest reachable cost well above SDN's; by default both rules
are rule variants and the calibration hull picks per cost. Thresholds for the pair are
calibrated jointly on the calibration split: T_cm comes from a grid of ``grid`` levels —
level 0 is −inf (E²CM never vetoes on confidence, whatever the sample), level g > 0 the
g/grid quantile of the training split's E²CM confidence at that stage — and, for each
rule and grid level, the per-exit (or shared) search sets T_ic; the harness keeps one
hull over all of them (rule variants).

Budget (how the class-mean pass and the IC training share it). The class means are taken
over exactly the samples E²CM takes them over under the same budget: the first samples of
the training split in order, at most one epoch and at most the budget's samples (under
``samples: 500`` both use the same 500; under a clock, what the budget hands out before it
is spent). They are statistics the ICs read, not IC training, so they are charged as extra
forward samples and leave the budget's training samples to the IC training, which draws
them afterwards exactly as SDN does (the whole budget; under a clock, what is left of it).
When the budget covers the whole split (``Budget.covers``) the class means, eq. 4 divisors
and the training distances are the run's shared ones (``eebench_plugins.class_means``):
E²CM computes the very same numbers, so whichever of the two runs first pays for them and
the other reads them. Otherwise this method computes them from ``Budget.statistics_batches``
and a distance pass over the whole split (every training sample the ICs may draw needs its
distances; the divisors come from the class-mean samples, as E²CM's), charged by the budget.
Spend: training samples = IC training; extra forward samples = the shared activation pass
(N) + the class-mean pass (N, or the samples the budget allowed) + the distance pass (N);
training MACs = those passes × the full backbone + 3 × Σ IC MACs per IC training sample;
``seconds`` = the fit's charged clock, with the shared passes at their recorded wall time
whoever paid for them (``statistics_seconds`` keeps the statistics passes'), so seconds do
not depend on cell order.
Exit j costs the backbone through its stage + the IC (counted on the module, as SDN's, its
Linear reading K more inputs) + the distances to the class means as E²CM prices them
(``ClassMeansExit.overhead_macs``: D·K + D + 4K from the core's cost table, + the max-pool
when the features are pooled); with ``count_softmax`` both softmaxes, the IC's and E²CM's
(3K each).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from eebench import hookimpl
from eebench.api import (
    Budget,
    Charge,
    EebenchError,
    ExitCosts,
    ExitOutputs,
    MethodContext,
    StagedBackbone,
    softmax_macs,
)
from eebench_plugins.class_means import build_exits, compute_statistics, shared_statistics
from eebench_plugins.internal_classifiers import ic_reducer
from eebench_plugins.sdn import REDUCER_KEY, SDN, SDN_FRACTIONS, ICParams

AGREEMENT_RULES = ("same-class", "confidence")


class E2CMSDNParams(ICParams):
    """SDN's IC parameters plus ``rules`` (the agreement rules, each a rule variant), ``grid`` (T_cm
    quantile levels) and E²CM's ``pool_to`` / ``auto_pool_above`` / ``count_softmax``."""

    rules: list[Literal["same-class", "confidence"]] = Field(default_factory=lambda: list(AGREEMENT_RULES),
                                                            min_length=1)
    grid: int = Field(5, ge=1, le=1000)
    pool_to: int | None = Field(None, ge=1, le=4096)
    auto_pool_above: int | None = Field(16384, ge=1, le=2**31 - 1)
    count_softmax: bool = False


def cm_threshold_grid(distances: Sequence[torch.Tensor], grid: int) -> torch.Tensor:
    """[grid, ICs] T_cm: level 0 = −inf (never vetoes, whatever the confidence), level g the
    g/grid quantile of the E²CM max-softmax confidence of the training distances at each IC
    (one ulp below it, so that under the strict ``>`` a confidence equal to it passes)."""
    confidence = [torch.softmax(-d.double(), dim=1).max(1).values for d in distances]
    levels = torch.arange(grid, dtype=torch.float64) / grid
    quantiles = torch.stack([torch.quantile(c, levels) for c in confidence], dim=1)
    thresholds = torch.nextafter(quantiles, torch.full_like(quantiles, float("-inf")))
    thresholds[0] = float("-inf")
    return thresholds


class E2CMSDN(SDN):
    """SDN ICs fed with class-mean distances, exiting only when E²CM agrees."""

    Params = E2CMSDNParams

    strict = False  # the IC part is SDN's ">= T"; E²CM's strict ">" sits inside the score
    default_calibrator = "per-exit-bisection"
    notes = (
        "E²CM+SDN: SDN ICs whose input adds the K normalised class-mean distances; exit only when the IC "
        "(≥ T_ic) and E²CM (> T_cm) agree, with and without also requiring the same class (two rule variants); "
        "T_cm from a grid (level 0 = −inf, never vetoes; then training-split confidence quantiles), T_ic searched "
        "per rule and grid level, one calibration hull over all; seconds include the two class-mean statistics "
        "passes. Calibration trace scored from the shared fp16 activations and fit's training distances; test "
        "trace from the images."
    )

    def __init__(
        self,
        backbone: StagedBackbone,
        context: MethodContext,
        fractions: Sequence[float] = SDN_FRACTIONS,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        rules: Sequence[str] = AGREEMENT_RULES,
        grid: int = 5,
        pool_to: int | None = None,
        auto_pool_above: int | None = 16384,
        count_softmax: bool = False,
    ) -> None:
        super().__init__(backbone, context, fractions, lr, weight_decay, "final", count_softmax)
        if grid < 1:
            raise ValueError("grid must be >= 1")
        unknown = sorted(set(rules) - set(AGREEMENT_RULES))
        if unknown or not rules:
            raise ValueError(f"rules must be a non-empty list of {list(AGREEMENT_RULES)}, got {list(rules)}")
        self.rules, self.grid = list(dict.fromkeys(rules)), int(grid)
        k = context.num_classes
        self.ics = self._build_ics(extra_inputs=k)
        self.pool_to, self.auto_pool_above = pool_to, auto_pool_above
        built = build_exits(self.ic_stages, context.stage_costs.stage_shapes, k, pool_to, auto_pool_above,
                            context.device)
        self.means = nn.ModuleList(built.values())
        # [grid, ICs]: E²CM's threshold at each IC for each rule variant, set by fit
        self.cm_thresholds = torch.zeros(self.grid, len(self.ic_stages), dtype=torch.float64)
        self.statistics_seconds = 0.0  # wall time of the two statistics passes (whoever paid for them)
        self._fit_distances: tuple[Dataset, list[torch.Tensor]] | None = None  # (train split, its distances)

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.ics, self.means]

    def variant_names(self) -> list[str]:
        return [f"{rule}, T_cm = q{level:.2f}" for rule in self.rules for level in self._levels().tolist()]

    def _levels(self) -> torch.Tensor:
        return torch.arange(self.grid, dtype=torch.float64) / self.grid

    def fit(self, train: Dataset, budget: Budget) -> None:
        if not self.ic_stages:
            return
        self.backbone.eval()
        distances = self._class_mean_statistics(train, budget)  # first, on E²CM's samples (module doc)
        activations = self.shared_activations(train, ic_reducer, REDUCER_KEY, budget)
        self.cm_thresholds = cm_threshold_grid(distances, self.grid)
        self._fit_distances = (train, distances)
        features = [activations.features[s] for s in self.ic_stages]
        self._train_ics(features, activations.labels, budget, extras=[d.float() for d in distances])

    def _class_mean_statistics(self, train: Dataset, budget: Budget) -> list[torch.Tensor]:
        """Class means and eq. 4 divisors on E²CM's samples under this budget (the run's shared ones
        when it covers the split, paid by the first method that asks: E²CM or this); returns every
        training sample's normalised distances at each IC."""
        ctx = self.context
        size, total = len(train), ctx.stage_costs.total
        by_stage = dict(zip(self.ic_stages, self.means, strict=True))
        if budget.covers(size):
            charge = Charge(forward_samples=2 * size, macs=2 * size * total)  # class means + divisors/distances
            statistics = shared_statistics(self, train, self.pool_to, self.auto_pool_above, budget, charge)
            statistics.load_into(by_stage)
        else:
            batches = budget.statistics_batches(train, ctx.batch_size, device=ctx.device, macs_per_sample=total,
                                                description="e2cm+sdn class means")

            def distance_pass(data: Dataset):
                return budget.forward_batches(data, ctx.batch_size, device=ctx.device, macs_per_sample=total,
                                              description="e2cm+sdn distances")

            statistics = compute_statistics(self.backbone, by_stage, batches, train, ctx.batch_size, ctx.device,
                                            second_pass=distance_pass, distances_of_all=True)
            if statistics.samples == 0:
                raise EebenchError(f"the budget ({budget.describe()}) handed out no sample for the class means; "
                                   "expected a budget that allows at least one batch")
        self.statistics_seconds = statistics.seconds
        return [statistics.normalised(s) for s in self.ic_stages]

    @torch.no_grad()
    def parts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both parties' confidence and class at every IC ([ICs, B]) plus the head's logits."""
        ic_logits, distances = self._live_inputs(x)
        return self._parts_from(ic_logits, distances, self.backbone.head(self._last))

    def _live_inputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """IC logits and eq. 4-normalised class-mean distances at every IC, from the images."""
        ic_logits, distances = [], []
        for (ic, out), means in zip(self._walk(x), self.means, strict=True):
            d = means.distances(out) / means.divisors
            ic_logits.append(ic(out, d.float()))
            distances.append(d)
        return ic_logits, distances

    @staticmethod
    def _parts_from(ic_logits: list[torch.Tensor], distances: list[torch.Tensor],
                    head: torch.Tensor) -> dict[str, torch.Tensor]:
        ic_conf, ic_pred, cm_conf, cm_pred = [], [], [], []
        for logits, d in zip(ic_logits, distances, strict=True):
            cm = torch.softmax(-d, dim=1).max(1)
            ic_best = torch.softmax(logits.double(), dim=1).max(1)
            ic_conf.append(ic_best.values)
            ic_pred.append(ic_best.indices)
            cm_conf.append(cm.values)
            cm_pred.append(cm.indices)
        return {"ic_conf": torch.stack(ic_conf), "ic_pred": torch.stack(ic_pred), "cm_conf": torch.stack(cm_conf),
                "cm_pred": torch.stack(cm_pred), "head": head}

    @torch.no_grad()
    def exit_outputs(self, x: torch.Tensor) -> ExitOutputs:
        ic_logits, distances = self._live_inputs(x)
        return self.outputs_from_logits(ic_logits, self.backbone.head(self._last), distances)

    def cached_extras(self, dataset: Dataset) -> list[torch.Tensor] | None:
        """The normalised training distances fit computed, when ``dataset`` is that training split."""
        held = self._fit_distances
        return held[1] if held is not None and held[0] is dataset else None

    def outputs_from_logits(self, ic_logits: list[torch.Tensor], head_logits: torch.Tensor,
                            extras: list[torch.Tensor] | None = None) -> ExitOutputs:
        """Both parties must agree (see the class doc); ``extras`` are the normalised distances."""
        if extras is None:
            raise ValueError("E²CM+SDN scores exits from IC logits and class-mean distances together")
        p = self._parts_from(ic_logits, extras, head_logits)
        confident = p["cm_conf"][None] > self.cm_thresholds.to(head_logits.device)[:, :, None]  # [G, ICs, B]
        same = (p["cm_pred"] == p["ic_pred"])[None]
        agree = torch.cat([confident & same if rule == "same-class" else confident for rule in self.rules])
        vetoed = torch.full_like(p["ic_conf"], float("-inf"))
        scores = torch.where(agree, p["ic_conf"][None], vetoed[None])  # [G, ICs, B]
        head = torch.softmax(p["head"].double(), dim=1).max(1)
        grid = scores.shape[0]
        final_scores = head.values[None, None].expand(grid, 1, -1)
        final_preds = head.indices[None, None].expand(grid, 1, -1)
        preds = torch.cat([p["ic_pred"][None].expand(grid, -1, -1), final_preds], 1)
        return ExitOutputs(preds, torch.cat([scores, final_scores], 1))

    def exit_costs(self) -> ExitCosts:
        costs = super().exit_costs()
        k = self.context.num_classes
        cm_softmax = softmax_macs(k) if self.count_softmax else 0.0  # the IC's is in SDN's ic_macs
        distance = torch.tensor([m.overhead_macs(k) + cm_softmax for m in self.means] + [0.0], dtype=torch.float64)
        return ExitCosts(costs.backbone_macs, costs.overhead_macs + distance, costs.reference_macs)


@hookimpl
def register_exit_strategies(register) -> None:
    register("e2cm+sdn", E2CMSDN)
