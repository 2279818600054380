"""E²CM+SDN consulting (Görmez et al., IJCNN 2022, Sec. III-B and IV-A): SDN internal
classifiers that also read the distances to the class means, and consult E²CM on exiting.

At each SDN IC stage the IC's input is its mixed-pooled features concatenated with the
K eq.-4-normalised distances of that stage's features to the class means (computed on
the fly from the live features, never from a stale augmented pass: spec §1.2 item 7's
pitfall). The ICs are trained like SDN (Adam, summed CE, budgeted batches of cached
un-augmented activations) and placed like SDN's (``placement``, ``fractions``; the notes
say where they sit). The paper describes two ways of consulting E²CM at IC j; ``rules``
picks any of four (default: the first three):

- the veto of Sec. IV-A, "exit only when the IC and E²CM agree": a sample leaves when

      IC max-softmax >= T_ic[j]  AND  E²CM max-softmax > T_cm[j]  [AND both argmaxes agree]

  with the IC's class. The bracketed clause is the ``"same-class"`` rule; ``"confidence"``
  drops it (spec §1.2 item 7 asks for both). Requiring the same class vetoes the ~20 % of
  samples on which the two disagree at every IC, which keeps the cheapest reachable cost
  well above SDN's. A veto never exits earlier than the IC alone;
- the OR of Sec. III-B, "if the IC decides to move on, E²CM is consulted; if E²CM suggests
  exiting, the input exits": a sample leaves when

      IC max-softmax >= T_ic[j]  OR  E²CM max-softmax > T_cm[j]

  so it exits at least as early as under the IC alone for the same T_ic, and can exit
  earlier than SDN. ``"or"`` answers with the IC's class, as the paper says ("the
  prediction of the j-th internal classifier is returned"); ``"or-e2cm-class"`` answers
  with E²CM's class when E²CM alone sends the sample out (IC max-softmax < T_ic[j]), the
  IC's otherwise. Its class depends on T_ic, so that rule has its own decision (``decide``)
  and trace (``ConsultingTrace``, built by ``build_traces`` from the IC's confidence and
  class that ``exit_step`` hands over as ``detail``), one rule shared by the executor and the
  trace: a strategy with that rule becomes an ``E2CMSDNWithE2CMClass``; without it the
  executor keeps the plain threshold rule (and its batch-1 fast path).

The score of an OR exit is the IC's max-softmax, or ``E2CM_EXIT_SCORE`` (2, above every
max-softmax) where E²CM says exit: any T_ic <= 1 then lets it through, T_ic in (1, 2]
leaves E²CM alone to decide at that exit, and +inf still switches the exit off. A vetoed
row of a veto rule scores −inf. Thresholds for the pair are calibrated jointly on the
calibration split: T_cm comes from a grid of ``grid`` levels — for the veto rules level 0
is −inf (E²CM never vetoes on confidence), for the OR rules +inf (E²CM never says exit:
the IC alone), and level g > 0 is the g/grid quantile of the training split's E²CM
confidence at that stage for every rule — and, for each rule and grid level, the per-exit
(or shared) search sets T_ic; the harness keeps one hull over all of them (rule
variants, named "<rule>, T_cm = q<level>" or "<rule>, T_cm = +inf"; the result's curve
records each point's variant). ``exit_step`` returns [R·G, B] at an IC exit (rule × grid
level) and the head's [B] at the final exit. The ICs are an ``ICBank``
(``eebench_plugins.internal_classifiers``), as SDN's and BWDS's; the calibration trace (the
training split) is scored from the shared cached activations and the training distances
fit computed (``split_traces``), the test trace from the images.

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
(3K each). Every rule pays the same: the IC reads the distances, so both parties run at
every exit evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from eebench.api import (
    Budget,
    Charge,
    EebenchError,
    ExitCosts,
    ExitState,
    ExitStrategy,
    ExitTrace,
    MethodContext,
    MethodReport,
    StagedBackbone,
    StepOutput,
    exit_costs_at,
    exit_fires,
    softmax_macs,
    stage_taps,
)
from eebench_plugins.class_means import build_exits, compute_statistics, shared_statistics
from eebench_plugins.internal_classifiers import REDUCER_KEY, SDN_FRACTIONS, ICBank, ic_reducer
from eebench_plugins.manifests.e2cm_sdn import DEFAULT_RULES, OR_RULES, RULES, E2CMSDNParams

#: an OR exit's score where E²CM says exit: above every max-softmax (so any T_ic <= 1 lets the sample
#: out) yet finite (so T_ic = +inf, the exit switched off, still stops it)
E2CM_EXIT_SCORE = 2.0
#: the OR rule that answers with E²CM's class when E²CM alone sends a sample out
E2CM_CLASS_RULE = "or-e2cm-class"


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


class ConsultingTrace(ExitTrace):
    """E²CM+SDN's trace for a rule whose answer depends on T_ic (``or-e2cm-class``): a sample leaves at
    the first exit whose score passes T_ic (the plain rule, ``first_exit``), with the IC's class where
    the IC's own max-softmax passes T_ic there and the exit's ``preds`` (E²CM's class where E²CM said
    exit) otherwise. ``ic_conf`` / ``ic_pred``: [E-1, N] the IC's max-softmax and class at each IC."""

    def __init__(self, preds: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, ic_conf: torch.Tensor,
                 ic_pred: torch.Tensor) -> None:
        super().__init__(preds=preds, scores=scores, labels=labels, strict=False)
        self.ic_conf = ic_conf.double()
        self.ic_pred = ic_pred.long()

    def outcome(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        limits = self._limits(thresholds)
        first = self.first_exit(limits)
        return first, self._answers(limits, first) == self.labels[None]

    def predictions(self, thresholds: torch.Tensor) -> torch.Tensor:
        limits = self._limits(thresholds)
        return self._answers(limits, self.first_exit(limits))

    def _limits(self, thresholds: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1, self.num_exits - 1)

    def _answers(self, limits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """[V, N] the class each sample leaves with (``E2CMSDNWithE2CMClass.decide``'s rule)."""
        answers = self.preds.gather(0, first)
        if self.num_exits == 1:
            return answers
        at = first.clamp(max=self.num_exits - 2)  # the final exit's rows are masked out below
        ic_passes = self.ic_conf.gather(0, at) >= limits.gather(1, at)
        return torch.where((first < self.num_exits - 1) & ic_passes, self.ic_pred.gather(0, at), answers)


class E2CMSDN(ExitStrategy):
    """SDN ICs (an ``ICBank``) fed with class-mean distances, consulting E²CM on exiting (module doc)."""

    Params = E2CMSDNParams
    frozen_products = {REDUCER_KEY: ic_reducer}  # filled by the run's first frozen pass (E²CM's, say)

    strict = False  # the IC part is SDN's ">= T"; E²CM's strict ">" sits inside the score
    default_calibrator = "per-exit-bisection"
    notes = (
        "E²CM+SDN: SDN ICs whose input adds the K normalised class-mean distances; consulting rules as rule "
        "variants: same-class / confidence = exit only when the IC (≥ T_ic) and E²CM (> T_cm) agree, with and "
        "without also requiring the same class (Sec. IV-A); or = exit when the IC or, where it says continue, "
        "E²CM says exit, with the IC's class (Sec. III-B), which can exit earlier than SDN "
        "(or-e2cm-class, opt-in: E²CM's class when E²CM alone sends the sample out); "
        "T_cm from a grid (level 0 = E²CM silent: −inf for a veto, +inf for or; then training-split confidence "
        "quantiles), T_ic searched per rule and grid level (the calibrator's cost targets shared among the "
        "variants), one calibration hull over all; seconds include the two class-mean statistics "
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
        rules: Sequence[str] = DEFAULT_RULES,
        grid: int = 5,
        pool_to: int | None = None,
        auto_pool_above: int | None = 16384,
        count_softmax: bool = False,
        placement: str = "nearest",
    ) -> None:
        super().__init__(backbone, context)
        k = context.num_classes
        self.bank = ICBank(backbone, context, fractions, lr, weight_decay, placement=placement, extra_inputs=k,
                           count_softmax=count_softmax, owner=type(self).__name__)
        if grid < 1:
            raise ValueError("grid must be >= 1")
        unknown = sorted(set(rules) - set(RULES))
        if unknown or not rules:
            raise ValueError(f"rules must be a non-empty list of {list(RULES)}, got {list(rules)}")
        self.rules, self.grid = list(dict.fromkeys(rules)), int(grid)
        self.hands_over_ic = E2CM_CLASS_RULE in self.rules  # exit_step's detail: the IC's confidence and class
        if self.hands_over_ic and not isinstance(self, E2CMSDNWithE2CMClass):
            if type(self) is not E2CMSDN:
                raise TypeError(f"rule {E2CM_CLASS_RULE!r} needs E2CMSDNWithE2CMClass's decide and build_traces; "
                                f"expected {type(self).__name__} to subclass it")
            self.__class__ = E2CMSDNWithE2CMClass  # its own decision and trace (module doc)
        self.pool_to, self.auto_pool_above = pool_to, auto_pool_above
        built = build_exits(self.bank.stages, context.stage_costs.stage_shapes, k, pool_to, auto_pool_above,
                            context.device)
        self.means = nn.ModuleList(built.values())
        # [grid, ICs]: E²CM's threshold at each IC for each grid level, set by fit (saved by state_dict);
        # on the device, so that exit_step copies nothing from the host
        self.cm_thresholds = torch.zeros(self.grid, len(self.bank.stages), dtype=torch.float64, device=context.device)
        self.statistics_seconds = 0.0  # wall time of the two statistics passes (whoever paid for them)
        self._fit_distances: tuple[Dataset, list[torch.Tensor]] | None = None  # (train split, its distances)

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.bank.ics, self.means]

    def state_dict(self) -> dict[str, Any]:
        """The modules' state plus the T_cm grid, which inference reads and no module holds."""
        return {**super().state_dict(), "cm_thresholds": self.cm_thresholds.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cm_thresholds = state["cm_thresholds"].detach().to(self.context.device, torch.float64).clone()

    def report(self) -> MethodReport:
        variants = [f"{rule}, T_cm = +inf" if rule in OR_RULES and g == 0 else f"{rule}, T_cm = q{level:.2f}"
                    for rule in self.rules for g, level in enumerate(self._levels().tolist())]
        return MethodReport(exit_names=self.bank.exit_names(), variants=variants,
                            notes=f"{self.notes} {self.bank.placement_note()}", fit_info=self.bank.placement_info())

    def _levels(self) -> torch.Tensor:
        return torch.arange(self.grid, dtype=torch.float64) / self.grid

    def fit(self, train: Dataset, budget: Budget) -> None:
        if not self.bank.stages:
            return
        self.backbone.eval()
        distances = self._class_mean_statistics(train, budget)  # first, on E²CM's samples (module doc)
        activations = self.shared_activations(train, ic_reducer, REDUCER_KEY, budget)
        self.cm_thresholds = cm_threshold_grid(distances, self.grid).to(self.context.device)
        self._fit_distances = (train, distances)
        self.bank.train(self.bank.training_features(activations), activations.labels, budget,
                        extras=[d.float() for d in distances])

    def _class_mean_statistics(self, train: Dataset, budget: Budget) -> list[torch.Tensor]:
        """Class means and eq. 4 divisors on E²CM's samples under this budget (the run's shared ones
        when it covers the split, paid by the first method that asks: E²CM or this); returns every
        training sample's normalised distances at each IC."""
        ctx = self.context
        size, total = len(train), ctx.stage_costs.total
        by_stage = dict(zip(self.bank.stages, self.means, strict=True))
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
        return [statistics.normalised(s) for s in self.bank.stages]

    # -- the exits ------------------------------------------------------------------------

    def exit_taps(self) -> list[int]:
        return list(self.bank.stages)

    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        if j == len(self.bank.stages):
            return self.step_from_logits(j, self.backbone.head(features), state)
        distances = self._distances(j, features)
        return self.step_from_logits(j, self.bank.ics[j](features, distances.float()), state, distances)

    def _distances(self, j: int, features: torch.Tensor) -> torch.Tensor:
        """Eq. 4-normalised distances [B, K] (float64) of IC j's live features to the class means."""
        means = self.means[j]
        return means.distances(features) / means.divisors

    def step_from_logits(self, j: int, logits: torch.Tensor, state: ExitState,
                         extra: torch.Tensor | None = None) -> StepOutput:
        """Every rule at every T_cm level (module doc): [R·G, B] at IC j from its logits and ``extra``, the
        normalised distances (a veto rule's vetoed rows score −inf, an OR rule's rows where E²CM says exit
        ``E2CM_EXIT_SCORE``; with ``or-e2cm-class`` the IC's confidence and class as ``detail`` [B, 2]);
        the head's class and max softmax [B] at the final exit."""
        if j == len(self.bank.stages):
            head = torch.softmax(logits.double(), dim=1).max(1)
            return StepOutput(head.indices, head.values)
        if extra is None:
            raise ValueError("E²CM+SDN scores exits from IC logits and class-mean distances together")
        p = self._parts(logits, extra)
        limits = self.cm_thresholds[:, j].to(logits.device)
        confident = p["cm_conf"][None] > limits[:, None]  # [G, B]: E²CM says exit (vetoes: agrees)
        ic_conf, ic_pred = p["ic_conf"][None], p["ic_pred"][None]
        preds, scores = [], []
        for rule in self.rules:
            if rule in OR_RULES:
                says_exit = confident.clone()
                says_exit[0] = False  # level 0: T_cm = +inf, E²CM never says exit
                scores.append(torch.where(says_exit, E2CM_EXIT_SCORE, ic_conf))
                preds.append(torch.where(says_exit, p["cm_pred"][None], ic_pred) if rule == E2CM_CLASS_RULE
                             else ic_pred.expand_as(says_exit))
            else:
                agree = confident & (p["cm_pred"] == p["ic_pred"])[None] if rule == "same-class" else confident
                scores.append(torch.where(agree, ic_conf, float("-inf")))
                preds.append(ic_pred.expand_as(agree))
        detail = torch.stack([p["ic_conf"], p["ic_pred"].double()], 1) if self.hands_over_ic else None
        return StepOutput(torch.cat(preds), torch.cat(scores), detail)

    @staticmethod
    def _parts(logits: torch.Tensor, distances: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both parties' confidence and class at one IC ([B] each)."""
        cm = torch.softmax(-distances, dim=1).max(1)
        ic = torch.softmax(logits.double(), dim=1).max(1)
        return {"ic_conf": ic.values, "ic_pred": ic.indices, "cm_conf": cm.values, "cm_pred": cm.indices}

    @torch.no_grad()
    def parts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both parties' confidence and class at every IC ([ICs, B]) for images ``x`` (a diagnostic)."""
        if not self.bank.stages:
            return {}
        taps, _ = stage_taps(self.backbone, x, self.bank.stages, through=self.bank.stages[-1])
        per_ic = []
        for j, features in enumerate(taps):
            distances = self._distances(j, features)
            per_ic.append(self._parts(self.bank.ics[j](features, distances.float()), distances))
        return {key: torch.stack([p[key] for p in per_ic]) for key in per_ic[0]}

    def split_traces(self, dataset: Dataset) -> list[ExitTrace] | None:
        """The training split from the shared activations and the normalised distances fit computed for it
        (``ICBank.split_traces``); None for any other split."""
        held = self._fit_distances
        if held is None or held[0] is not dataset:
            return None
        return self.bank.split_traces(self, dataset, self.step_from_logits, extras=held[1])

    def exit_costs(self) -> ExitCosts:
        k = self.context.num_classes
        cm_softmax = softmax_macs(k) if self.bank.count_softmax else 0.0  # the IC's is in the bank's macs
        overheads = [ic + (m.overhead_macs(k) + cm_softmax) for ic, m in zip(self.bank.macs(), self.means,
                                                                               strict=True)]
        return exit_costs_at(self.context.stage_costs, self.bank.stages, overheads)


class E2CMSDNWithE2CMClass(E2CMSDN):
    """E²CM+SDN with the ``or-e2cm-class`` rule among its rules (an ``E2CMSDN`` built with it becomes one):
    the class a sample leaves with depends on T_ic, so ``decide`` and the trace (``ConsultingTrace``) apply
    the same rule (module doc). Every other rule answers with its exit's class here too."""

    def decide(self, j: int, out: StepOutput, thresholds: torch.Tensor, state: ExitState) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
        """The threshold rule on the score; the IC's class where its own max-softmax passes T_ic, else the exit's
        (E²CM's class where E²CM alone sent the row out, under ``or-e2cm-class``)."""
        if j == len(self.bank.stages):
            return torch.ones_like(out.preds, dtype=torch.bool), out.preds
        if out.detail is None:
            raise ValueError("E²CM+SDN's or-e2cm-class rule decides from exit_step's detail; got none")
        scores = out.scores.double()
        limits = thresholds.to(scores.device, torch.float64)
        ic_passes = out.detail[:, 0] >= limits
        return exit_fires(scores, limits, self.strict), torch.where(ic_passes, out.detail[:, 1].long(), out.preds)

    def build_traces(self, preds: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                     details: list[torch.Tensor | None]) -> list[ExitTrace]:
        """One ``ConsultingTrace`` per variant, sharing the IC's confidence and class from ``detail``."""
        if not self.bank.stages:
            return super().build_traces(preds, scores, labels, details)
        if len(details) != len(self.bank.stages) + 1 or any(d is None for d in details[:-1]):
            raise ValueError("E²CM+SDN's or-e2cm-class trace needs every IC's detail (exit_step's)")
        ic = torch.stack([d for d in details[:-1] if d is not None])  # [E-1, N, 2]
        return [ConsultingTrace(p, s, labels, ic[..., 0], ic[..., 1].long()) for p, s in zip(preds, scores,
                                                                                              strict=True)]
