"""SDN: Shallow-Deep Networks (Kaya, Hong, Dumitras, ICML 2019), IC-only training on a
frozen backbone.

Six internal classifiers (``eebench_plugins.internal_classifiers``, the reference
``InternalClassifier``, held in an ``ICBank``) sit at the exit points whose cumulative backbone
cost is nearest 15, 30, 45, 60, 75 and 90 % of the total (``fractions``; ``placement:
nearest``, one exit point per IC, a backbone with fewer exit points gives fewer ICs), or at
the first exit points reaching them (``placement: first-at-least``, the rule before issue 13,
which puts ResNet-20's first IC at 24 % of the MACs); the notes and ``fit_info`` say where they
really sit. The backbone's own head is the final exit. At
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
  recorded seconds whoever paid for it, so seconds do not depend on cell order). The
  calibration trace (the training split) is scored from the same cached features
  (``split_traces``); the test trace runs the images;
- fallback ``"most_confident"`` (the reference): when no IC fires, SDN returns the most
  confident output among all ICs and the final head. The trace contract makes the last
  exit always exit, so the final exit's prediction (and score) here is that of the most
  confident exit for the sample (ties: the earliest), carried from exit to exit in the
  per-sample state (``best_pred``, ``best_score``); as that needs every IC, the method is
  then ``chained`` (switching an IC off saves nothing). ``"final"``
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

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from eebench.api import (
    Budget,
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
)
from eebench_plugins.internal_classifiers import (
    REDUCER_KEY,
    SDN_FRACTIONS,
    ICBank,
    ic_reducer,
)
from eebench_plugins.manifests.sdn import SDNParams

FALLBACKS = ("final", "most_confident")


class SDN(ExitStrategy):
    """SDN internal classifiers on a frozen backbone (see the module docstring)."""

    Params = SDNParams
    frozen_products = {REDUCER_KEY: ic_reducer}  # filled by the run's first frozen pass (E²CM's, say)

    strict = False
    default_calibrator = "shared-threshold"
    notes = (
        "SDN (IC-only, frozen backbone): 6 mixed-pooling ICs at the blocks nearest 15–90 % of backbone MACs, "
        "Adam, summed CE; "
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
        placement: str = "nearest",
    ) -> None:
        super().__init__(backbone, context)
        self.bank = ICBank(backbone, context, fractions, lr, weight_decay, placement=placement,
                           count_softmax=count_softmax, owner=type(self).__name__)
        if fallback not in FALLBACKS:
            raise EebenchError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}", key="fallback")
        self.fallback = fallback
        self.chained = fallback == "most_confident"  # the final output needs every IC
        if self.chained:
            self.notes += " Fallback: most confident of all exits (SDN's rule); every IC is paid."

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.bank.ics]

    def fit(self, train: Dataset, budget: Budget) -> None:
        if not self.bank.stages:
            return  # nothing to train: the backbone's head is the only exit
        self.backbone.eval()
        activations = self.shared_activations(train, ic_reducer, REDUCER_KEY, budget)
        self.bank.train(self.bank.training_features(activations), activations.labels, budget)

    # -- the exits ------------------------------------------------------------------------

    def exit_taps(self) -> list[int]:
        return list(self.bank.stages)

    def init_state(self, x: torch.Tensor) -> ExitState:
        return self._fresh_state(int(x.shape[0]), x.device)

    def _fresh_state(self, rows: int, device: torch.device) -> ExitState:
        """The most confident output so far (most_confident fallback only): none yet."""
        if self.fallback != "most_confident":
            return {}
        return {"best_pred": torch.zeros(rows, dtype=torch.long, device=device),
                "best_score": torch.full((rows,), float("-inf"), dtype=torch.float64, device=device)}

    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        return self.step_from_logits(j, self.bank.exit_logits(j, features, self.backbone), state)

    def step_from_logits(self, j: int, logits: torch.Tensor, state: ExitState,
                         extra: torch.Tensor | None = None) -> StepOutput:
        """Exit j's argmax and max softmax from its logits: one code path for live and cached inputs.
        With the most_confident fallback the final exit returns the most confident exit's (state)."""
        scores = torch.softmax(logits.double(), dim=1).max(1).values
        preds = logits.argmax(1)
        if self.fallback == "most_confident":
            better = scores > state["best_score"]  # strict: the earliest of equally confident exits wins
            state["best_pred"] = torch.where(better, preds, state["best_pred"])
            state["best_score"] = torch.where(better, scores, state["best_score"])
            if j == len(self.bank.stages):
                return StepOutput(state["best_pred"], state["best_score"])
        return StepOutput(preds, scores)

    def split_traces(self, dataset: Dataset) -> list[ExitTrace] | None:
        """The calibration split from the shared activations the ICs trained on (``ICBank.split_traces``)."""
        return self.bank.split_traces(self, dataset, self.step_from_logits, fresh_state=self._fresh_state)

    def exit_costs(self) -> ExitCosts:
        return exit_costs_at(self.context.stage_costs, self.bank.stages, self.bank.macs())

    def report(self) -> MethodReport:
        return MethodReport(exit_names=self.bank.exit_names(), notes=f"{self.notes} {self.bank.placement_note()}",
                            fit_info=self.bank.placement_info())
