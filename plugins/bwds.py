"""BWDS: Adaptive Neural Networks for Efficient Inference (Bolukbasi, Wang, Dekel,
Saligrama, ICML 2017): layer-level early-exit decision functions on a frozen backbone,
trained backwards as weighted binary classification (WBC).

No public code exists (spec §4), so everything below is the spec's §4.1 **[proposal]**
consistent with the paper's formulation, not a reproduction of reference code.

Exits. The exit classifiers are SDN's internal classifiers at SDN's positions, held in an
``ICBank`` as SDN holds its own (``place_ics``: the exit points nearest 15..90 % of the
backbone's MACs by default, ``placement`` as SDN's; the notes say where they sit), trained IC-only on
the frozen backbone through the shared cached activations with SDN's optimiser (Adam,
``lr``, ``weight_decay``, CE). By default (``schedule: per-exit``) IC j is trained in the
phase of its own decision function (see Budget); ``schedule: ics-first`` trains all ICs
first, exactly as ``sdn`` does (``ICBank.train``: summed CE). The backbone's own head is
the final exit.

Decision functions. One policy γ_j per IC exit j: a logistic regression on the K+2 values

    [softmax of IC j sorted descending (K), entropy of that softmax / ln K, its max probability]

(the entropy is divided by ln K so every input lies in [0, 1]; the max probability repeats
the first sorted value, as the spec lists it). γ_j says "exit" when its probability is
> 0.5. Weights and biases start at zero (probability 0.5: never exits at 0.5).

Training, backwards over the IC exits j = J-1 .. 0 (spec §4.1), with the later policies
already trained and fixed:
- V_{j+1}(x): loss + λ·cost of following the downstream policies from j+1 on (the first
  of them that says exit, else the final exit, V = ℓ_final + λ·C_final);
- E_j(x) = ℓ_j(x) + λ·C_j with ℓ the 0/1 error of the exit's classifier on the sample and
  C_j the normalised cumulative cost of leaving at j with every exit enabled
  (``exit_costs().normalised()``: backbone through the stage + the ICs and policies
  evaluated so far);
- label "exit" iff E_j < V_{j+1}, weight |E_j − V_{j+1}| (``wbc_targets``; zero-weight
  samples contribute nothing), weighted binary cross-entropy, Adam (``policy_lr``);
- V_j = E_j where the trained γ_j exits, else V_{j+1} (``continue_value``).
V is computed per budgeted batch from the cached activations (the downstream ICs and
policies, already trained and fixed, re-run on the batch), so no sample outside the budget
is used.

λ sweep. ``lambdas`` (default 25 values log-spaced in [1e-4, 10], as a fraction of the full
cost) are trained TOGETHER: each exit holds a weight tensor [Λ, K+2] and a bias [Λ], and
one batch trains all Λ policies of that exit. Each λ is one rule variant: ``exit_step``
returns [Λ, B] at an IC exit with score = the policy's exit probability, and the head's max
softmax at the final exit ([B], shared by every λ; it always exits), ``strict = True``.
The calibration trace (the training split) is scored from the shared cached activations
(``split_traces``); the test trace runs the images. The default calibrator
(per-exit bisection) then shifts the per-exit decision thresholds away from 0.5 for each
variant and the harness keeps one hull over all variants on the calibration split: the
spec's "λ sweep plus decision-threshold shifts".

Budget. One budget iterator (batches of cached-sample indices, as SDN) is shared by
consecutive phases. ``schedule: per-exit`` (default): J phases, one per decision function,
backwards j = J-1 .. 0; in phase j every batch first takes one CE step on IC j (its own Adam
over that IC's parameters, ``lr``/``weight_decay``; IC j in train mode for that step only),
then the policy inputs and 0/1 losses are computed with the updated IC (eval mode) and γ_j
takes its WBC step on the same batch. The ICs and policies downstream of j were trained in
earlier phases and stay fixed, so the backward recursion is exact; the ICs ride along at no
extra sample cost (each budgeted sample is spent once). Under ``epochs: 6`` with 6 ICs that
is one epoch per decision function, the paper's 6 separate epochs (no deviation), with each
IC getting that one epoch too (SDN's ICs get six). ``schedule: ics-first``: J+1 phases, all ICs first
(``ICBank.train``), then policy J-1, ..., policy 0 with the ICs frozen (6/7 epoch each
under ``epochs: 6``). With a planned budget (``budget.planned_samples``: epochs, samples)
each phase gets an equal share of it (the first ``planned % phases`` phases one sample
more); a batch crossing a phase boundary is split, so the shares are exact. An IC's lr drops
×0.1 after 60 % of its phase's share when that share is over one epoch (SDN's rule, applied
per phase). Without a plan (a seconds budget) each phase gets one epoch of the training
split, in order, until the budget is exhausted; phases it does not reach stay untrained (a
policy left at zero never exits at 0.5; the calibrator may still turn it on or off
wholesale).

Costs (MACs at batch 1). Exit j pays the backbone through its stage + its IC
(``InternalClassifier.macs``, counted by the core on the module) + its policy, its inputs
priced by the core's cost table (``eebench.costs``) and its linear part counted as a module:

    policy MACs = K·ceil(log2 K) (sort) + 3K (softmax) + 2K (entropy) + 1 (÷ ln K)
                  + (K+2) (one λ's Linear(K+2, 1)),

cumulatively over the exits evaluated so far (the sigmoid and its threshold test are the
exit's decision, uncounted as for every method); the final exit is the plain backbone with no
overhead of its own. Spend: the shared activation pass as SDN (``extra_forward_samples``
= training size, N × backbone MACs); IC training as SDN, 3 × IC MACs per sample and IC
trained (per-exit: 3 × IC j in phase j; ics-first: 3 × Σ IC MACs in the IC phase); policy
phase j per sample: the ICs j..J-1 and their policy features, the Λ downstream policies,
and 3 × Λ × (K+2) for the trained policy (forward + a backward taken as twice it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from eebench.api import (
    BatchStream,
    Budget,
    EebenchError,
    ExitCosts,
    ExitState,
    ExitStrategy,
    ExitTrace,
    MethodContext,
    MethodReport,
    Spend,
    StagedBackbone,
    StepOutput,
    check_finite_loss,
    count_macs,
    elementwise_macs,
    entropy_macs,
    exit_costs_at,
    softmax_macs,
    sort_macs,
)
from eebench_plugins.internal_classifiers import (
    REDUCER_KEY,
    SDN_FRACTIONS,
    ICBank,
    drop_lr,
    ic_reducer,
    index_dataset,
    lr_drop_at,
)
from eebench_plugins.manifests.bwds import DEFAULT_LAMBDAS, BWDSParams

SCHEDULES = ("per-exit", "ics-first")


def policy_inputs(logits: torch.Tensor) -> torch.Tensor:
    """[B, K] exit-classifier logits -> [B, K+2] policy inputs: sorted softmax, entropy / ln K, max."""
    logits = logits.float()
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    ordered = p.sort(dim=1, descending=True).values
    entropy = -(p * log_p).sum(1, keepdim=True) / max(math.log(logits.shape[1]), 1e-12)
    return torch.cat([ordered, entropy, ordered[:, :1]], dim=1)


def policy_feature_macs(num_classes: int) -> float:
    """The K+2 policy inputs of one exit at batch 1, from the core's cost table: the softmax (3K),
    its sort (K·⌈log2 K⌉ comparisons), its entropy (2K) divided by ln K (1); the max
    probability repeats the first sorted value (free)."""
    k = int(num_classes)
    return softmax_macs(k) + sort_macs(k) + entropy_macs(k) + elementwise_macs(1)


@functools.cache
def policy_macs(num_classes: int) -> float:
    """One decision function at batch 1: its inputs (``policy_feature_macs``) + one λ variant's
    logistic regression on them, a Linear(K+2, 1) counted by the core (K+2)."""
    k = int(num_classes)
    linear = nn.utils.skip_init(nn.Linear, k + 2, 1)  # no initialisation: the global RNG stays untouched
    return policy_feature_macs(k) + count_macs(linear, torch.zeros(1, k + 2))


def exit_values(losses: torch.Tensor, costs: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """E = ℓ + λ·C: losses [M, B], normalised costs [M], lambdas [Λ] -> [Λ, M, B] (float64)."""
    return losses.double()[None] + lambdas.double()[:, None, None] * costs.double()[None, :, None]


def continue_value(values: torch.Tensor, exits: torch.Tensor) -> torch.Tensor:
    """V of reaching the first of M+1 exits and following the policies from there.

    ``values`` [Λ, M+1, B]: E at the exits j+1..final; ``exits`` [Λ, M, B]: what the (fixed)
    policies of exits j+1..J-1 decide. Returns V_{j+1} [Λ, B]: E at the first exit that says
    exit, else at the final exit.
    """
    if exits.shape[1] != values.shape[1] - 1:
        raise ValueError(f"{values.shape[1]} exit values need {values.shape[1] - 1} decisions, got {exits.shape[1]}")
    value = values[:, -1]
    for i in range(exits.shape[1] - 1, -1, -1):
        value = torch.where(exits[:, i], values[:, i], value)
    return value


def wbc_targets(exit_loss: torch.Tensor, continue_values: torch.Tensor, exit_cost: float,
                lambdas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted-binary-classification targets of one exit for every λ.

    ``exit_loss`` [B]: the exit's 0/1 error ℓ_j; ``continue_values`` [Λ, B]: V_{j+1};
    ``exit_cost``: C_j; ``lambdas`` [Λ]. With E_j = ℓ_j + λ·C_j: label 1 (exit) iff
    E_j < V_{j+1}, weight |E_j − V_{j+1}|. Returns (labels, weights), both [Λ, B] float64.
    """
    exit_now = exit_loss.double()[None] + lambdas.double()[:, None] * float(exit_cost)
    labels = (exit_now < continue_values).double()
    return labels, (exit_now - continue_values).abs()


class DecisionFunctions(nn.Module):
    """Logistic-regression policies: for each IC exit a weight [Λ, K+2] and a bias [Λ]."""

    def __init__(self, exits: int, variants: int, num_classes: int) -> None:
        super().__init__()
        inputs = num_classes + 2
        self.weight = nn.ParameterList(nn.Parameter(torch.zeros(variants, inputs)) for _ in range(exits))
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(variants)) for _ in range(exits))

    def logits(self, exit_index: int, inputs: torch.Tensor) -> torch.Tensor:
        """[B, K+2] policy inputs -> [Λ, B] exit logits."""
        return self.weight[exit_index] @ inputs.T + self.bias[exit_index][:, None]

    def probability(self, exit_index: int, inputs: torch.Tensor) -> torch.Tensor:
        """[Λ, B] exit probability (float64, so near-certain decisions stay ordered)."""
        return torch.sigmoid(self.logits(exit_index, inputs).double())

    def exits(self, exit_index: int, inputs: torch.Tensor) -> torch.Tensor:
        """[Λ, B] the policy's decision at the default threshold: probability > 0.5."""
        return self.probability(exit_index, inputs) > 0.5


class PhasedBatches:
    """One budget stream (``BatchStream``) shared by consecutive training phases, with a log.

    ``take(share, phase, macs_per_sample)`` yields batches until ``share`` samples have gone to
    the phase (the core splits a batch crossing the boundary; the rest opens the next phase),
    or the budget ends; the core charges the phase's training MACs per sample.
    """

    def __init__(self, stream: BatchStream) -> None:
        self._stream = stream
        self.log: list[tuple[str, int]] = []  # (phase, samples it received), in order

    def take(self, share: int, phase: str,
             macs_per_sample: float = 0.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.log.append((phase, 0))
        for x, y in self._stream.take(share, macs_per_sample=macs_per_sample):
            self.log[-1] = (phase, self.log[-1][1] + int(y.shape[0]))
            yield x, y

    def close(self) -> None:
        self._stream.close()


class _PhaseBudget:
    """The budget as ``ICBank.train`` sees it during the ics-first IC phase: that phase's batches
    (charged at the rate ``ICBank.train`` asks for), its share as the plan (for the lr drop), the
    real budget's spend and clock."""

    def __init__(self, budget: Budget, phases: PhasedBatches, share: int, planned: int | None) -> None:
        self._budget, self._phases, self._share = budget, phases, share
        self.planned_samples = planned

    @property
    def spend(self) -> Spend:
        return self._budget.spend

    def elapsed(self) -> float:
        return self._budget.elapsed()

    def batches(self, *args: object, macs_per_sample: float = 0.0,
                **kwargs: object) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._phases.take(self._share, "ics", macs_per_sample)


class BWDS(ExitStrategy):
    """SDN ICs (an ``ICBank``) + backward-trained WBC decision functions, one rule variant per λ
    (module doc)."""

    Params = BWDSParams
    frozen_products = {REDUCER_KEY: ic_reducer}  # filled by the run's first frozen pass (E²CM's, say)

    strict = True
    chained = False
    default_calibrator = "per-exit-bisection"
    notes = (
        "BWDS [spec §4.1 proposal, no public code]: SDN ICs (IC-only, cached un-augmented activations) + one "
        "logistic-regression policy per IC on sorted softmax/entropy/max-prob, trained backwards (last IC first) "
        "as weighted binary classification; 25 λ in [1e-4, 10] as rule variants, per-exit threshold shifts, "
        "one calibration hull (the calibrator's cost targets shared among the λ variants). "
        "Budget split equally over the J decision functions, trained backwards, IC j "
        "trained together with its policy on the same batches (schedule: per-exit): epochs: 6 with 6 ICs = "
        "one epoch per decision function, a deviation-free match of the paper's 6 epochs for the decision "
        "functions, with one epoch per IC (SDN's ICs get six); seconds budgets: one epoch per phase until "
        "spent. schedule: ics-first = ICs first, then the policies (J+1 equal phases). Calibration trace scored "
        "from the shared fp16 activations; test trace from the images."
    )

    def __init__(
        self,
        backbone: StagedBackbone,
        context: MethodContext,
        fractions: Sequence[float] = SDN_FRACTIONS,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        policy_lr: float = 1e-2,
        schedule: str = "per-exit",
        placement: str = "nearest",
    ) -> None:
        super().__init__(backbone, context)
        self.bank = ICBank(backbone, context, fractions, lr, weight_decay, placement=placement,
                           owner=type(self).__name__)
        values = [float(v) for v in lambdas]
        if not values or any(not (math.isfinite(v) and v > 0) for v in values):
            raise EebenchError(f"lambdas must be a non-empty list of positive numbers, got {list(lambdas)}",
                               key="lambdas")
        if not policy_lr > 0:
            raise EebenchError(f"policy_lr must be > 0, got {policy_lr}", key="policy_lr")
        if schedule not in SCHEDULES:
            raise EebenchError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}",
                               key="schedule")
        self.schedule = schedule
        self.lambdas = torch.tensor(values, dtype=torch.float64)
        self.policy_lr = float(policy_lr)
        self.policies = DecisionFunctions(len(self.bank.stages), len(values), context.num_classes).to(context.device)
        self.phase_log: list[tuple[str, int]] = []  # (phase name, samples it received), in order

    # -- the contract -------------------------------------------------------------------

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.bank.ics, self.policies]

    def report(self) -> MethodReport:
        return MethodReport(exit_names=self.bank.exit_names(), variants=[f"λ={v:.3g}" for v in self.lambdas.tolist()],
                            notes=f"{self.notes} {self.bank.placement_note()}", fit_info=self.bank.placement_info())

    def exit_costs(self) -> ExitCosts:
        policy = policy_macs(self.context.num_classes)
        return exit_costs_at(self.context.stage_costs, self.bank.stages, [ic + policy for ic in self.bank.macs()])

    def exit_taps(self) -> list[int]:
        return list(self.bank.stages)

    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        return self.step_from_logits(j, self.bank.exit_logits(j, features, self.backbone), state)

    def step_from_logits(self, j: int, logits: torch.Tensor, state: ExitState,
                         extra: torch.Tensor | None = None) -> StepOutput:
        """[Λ, B] at an IC exit: the IC's class and each λ's policy probability; [B] at the final
        exit: the head's class and max softmax (shared by every λ). Live and cached inputs alike."""
        if j == len(self.bank.stages):
            head = torch.softmax(logits.double(), dim=1).max(1)
            return StepOutput(head.indices, head.values)
        preds = logits.argmax(1)[None].expand(len(self.lambdas), -1)
        return StepOutput(preds, self.policies.probability(j, policy_inputs(logits)))

    def split_traces(self, dataset: Dataset) -> list[ExitTrace] | None:
        """The calibration split from the shared activations the ICs trained on (``ICBank.split_traces``)."""
        return self.bank.split_traces(self, dataset, self.step_from_logits)

    # -- training -----------------------------------------------------------------------

    def fit(self, train: Dataset, budget: Budget) -> None:
        if not self.bank.stages:
            return  # the backbone's head is the only exit: nothing to decide
        ctx = self.context
        self.backbone.eval()
        activations = self.shared_activations(train, ic_reducer, REDUCER_KEY, budget)
        features = self.bank.training_features(activations)
        labels, head_logits = activations.labels, activations.logits
        exits = len(self.bank.stages)
        per_exit = self.schedule == "per-exit"
        planned = budget.planned_samples is not None
        shares = phase_shares(budget.planned_samples, len(labels), exits if per_exit else exits + 1)
        stream = PhasedBatches(budget.batches(index_dataset(labels), ctx.train_batch_size, device="cpu",
                                              seed=ctx.seed, description="bwds"))
        self.phase_log = stream.log
        try:
            if not per_exit:  # ics-first: every IC first, as SDN, then the policies with the ICs frozen
                ic_share, shares = shares[0], shares[1:]
                self.bank.train(features, labels,
                                _PhaseBudget(budget, stream, ic_share, ic_share if planned else None))
            for j in range(exits - 1, -1, -1):  # backwards: the last IC's policy first
                share = shares[exits - 1 - j]
                name = f"ic{j}+policy{j}" if per_exit else f"policy{j}"
                batches = stream.take(share, name, self._policy_phase_rate(j, train_ic=per_exit))
                self._train_policy(j, batches, features, head_logits, labels, budget,
                                   train_ic=per_exit, ic_share=share if planned else None)
        finally:
            stream.close()
        self.bank.ics.eval()

    def _policy_phase_rate(self, j: int, train_ic: bool) -> float:
        """Training MACs per sample of policy phase j, the IC's 3 × MACs too when it rides along."""
        return self._policy_phase_macs(j) + (3.0 * self.bank.macs()[j] if train_ic else 0.0)

    def _train_policy(self, j: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                      features: list[torch.Tensor], head_logits: torch.Tensor, labels: torch.Tensor,
                      budget: Budget, train_ic: bool = False, ic_share: int | None = None) -> None:
        """Weighted BCE for every λ's γ_j at once, the downstream ICs and policies fixed.

        With ``train_ic`` (schedule per-exit) each batch first takes one CE step on IC j, and
        γ_j's inputs and targets come from the updated IC. ``ic_share``: the phase's planned
        samples (None without a plan), for the IC's lr drop. ``batches`` come from the cell's
        ``budget``, which charges the phase's training MACs as it hands them out.
        """
        ctx = self.context
        self.bank.ics.eval()
        policy = self.policies
        optimizer = torch.optim.Adam([policy.weight[j], policy.bias[j]], lr=self.policy_lr)
        costs = self.exit_costs().normalised()
        lambdas = self.lambdas.to(ctx.device)
        ic = self.bank.ics[j]
        ic_optimizer, drop_at, seen, policy_seen = None, lr_drop_at(ic_share, len(labels)), 0, 0
        if train_ic:  # the IC rides along: one CE step per batch, 3 × its MACs per sample (as SDN)
            ic_optimizer = torch.optim.Adam(ic.parameters(), lr=self.bank.lr, weight_decay=self.bank.weight_decay)
        for x, y in batches:
            rows = x.view(-1).long()
            if ic_optimizer is not None:
                ic.train()
                ic_loss = F.cross_entropy(ic.forward_pooled(features[j][rows].to(ctx.device).float()),
                                          y.to(ctx.device))
                check_finite_loss(ic_loss, f"BWDS IC {j} loss after {seen} samples")
                ic_optimizer.zero_grad(set_to_none=True)
                ic_loss.backward()
                ic_optimizer.step()
                ic.eval()
                seen += int(rows.numel())
                if drop_at is not None and seen >= drop_at:
                    drop_lr(ic_optimizer, self.bank.lr)
                    drop_at = None
            inputs, losses = self.decision_inputs(rows, features, head_logits, labels, start=j)
            with torch.no_grad():
                later = self.downstream_exits(inputs[1:], start=j + 1)
                values = exit_values(losses[1:], costs[j + 1:].to(ctx.device), lambdas)
                targets, weights = wbc_targets(losses[0], continue_value(values, later), float(costs[j]), lambdas)
            logits = policy.logits(j, inputs[0])
            loss = F.binary_cross_entropy_with_logits(logits, targets.float(), weight=weights.float(),
                                                      reduction="sum") / max(1, int(rows.numel()))
            where = f"BWDS decision function {j} loss after {policy_seen} samples"
            try:
                check_finite_loss(loss, where, key="policy_lr", hint="try a lower policy_lr")
            except EebenchError:
                if not bool(torch.isfinite(inputs[0]).all()):  # its inputs blew up: IC j's lr, not policy_lr
                    check_finite_loss(loss, f"{where} (IC {j} outputs are not finite)")
                raise
            policy_seen += int(rows.numel())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def decision_inputs(self, rows: torch.Tensor, features: list[torch.Tensor], head_logits: torch.Tensor,
                        labels: torch.Tensor, start: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """For cached samples ``rows``: the policy inputs at IC exits start..J-1 ([B, K+2] each)
        and the 0/1 errors ℓ at exits start..final ([J-start+1, B])."""
        device = self.context.device
        target = labels[rows].to(device)
        inputs, losses = [], []
        for j in range(start, len(self.bank.stages)):
            logits = self.bank.ics[j].forward_pooled(features[j][rows].to(device).float())
            inputs.append(policy_inputs(logits))
            losses.append(logits.argmax(1) != target)
        losses.append(head_logits[rows].to(device).argmax(1) != target)
        return inputs, torch.stack(losses).double()

    @torch.no_grad()
    def downstream_exits(self, inputs: list[torch.Tensor], start: int) -> torch.Tensor:
        """[Λ, len(inputs), B] the current policies' decisions at exits start, start+1, ..."""
        if not inputs:
            return torch.zeros(len(self.lambdas), 0, 0, dtype=torch.bool, device=self.context.device)
        return torch.stack([self.policies.exits(start + i, z) for i, z in enumerate(inputs)], dim=1)

    def _policy_phase_macs(self, j: int) -> float:
        """Training MACs per sample of policy phase j (see the module docstring)."""
        k, variants, exits = self.context.num_classes, len(self.lambdas), len(self.bank.stages)
        features = policy_macs(k) - (k + 2)
        ics = math.fsum(ic.macs() + features for ic in list(self.bank.ics)[j:])
        return ics + variants * (k + 2) * (exits - 1 - j) + 3.0 * variants * (k + 2)


def phase_shares(planned: int | None, train_size: int, phases: int) -> list[int]:
    """Samples per phase: an equal split of a planned budget, else one epoch each."""
    if planned is None:
        return [int(train_size)] * phases
    base, extra = divmod(int(planned), phases)
    return [base + (1 if k < extra else 0) for k in range(phases)]
