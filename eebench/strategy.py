"""The ExitStrategy contract: what an early-exit method must provide to the harness.

A method is a set of exits on a staged backbone. The core drives the backbone stage by
stage; at each exit it asks the method for that exit's prediction and score on the rows
still in the batch (``exit_step``), and for its decision under a threshold (``decide``).
The calibration/test traces and the real early-exit executor (``eebench.inference``) make
the same per-exit calls, so the numbers a leaderboard reports and the network a user runs
cannot disagree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from eebench.activations import ActivationCache, Activations, FrozenBatch, Reducer, Shared
from eebench.budget import Budget, Charge
from eebench.costs import ExitCosts, StageCosts
from eebench.datasets import Augment
from eebench.model import StagedBackbone

if TYPE_CHECKING:
    from eebench.trace import ExitTrace

#: per-sample state a decision rule carries from exit to exit (patience counters, alive-class sets,
#: the most confident output so far): tensors whose first dimension is the batch's rows. The core
#: keeps only the surviving rows when samples leave, so every value must be indexable by rows.
ExitState = dict[str, torch.Tensor]


@dataclass
class ExitOutputs:
    """Per-exit predictions and confidence scores for one batch: both [E, B], or [P, E, B]
    for a method with P variants of its decision rule (``MethodReport.variants``).

    Scores are oriented so that *higher means more confident*; a method whose rule is
    "entropy < T" reports ``-entropy``. The last exit always exits.
    """

    preds: torch.Tensor
    scores: torch.Tensor


@dataclass
class StepOutput:
    """One exit's outputs for the rows still running: ``preds`` and ``scores`` [B] (or [P, B]
    for P rule variants), and optionally ``detail`` [B, ...], what a decision rule that is not
    "score passes a threshold" reads (class exclusion's per-class sigmoids; the final logits
    its last exit masks). Outputs must not depend on thresholds: a trace is taken once and
    evaluated under every threshold vector."""

    preds: torch.Tensor
    scores: torch.Tensor
    detail: torch.Tensor | None = None


@dataclass
class OperatingPoint:
    """A named threshold vector the method's paper reports on its own (e.g. EENet's
    confidence > 0.5), shown in the leaderboard next to the calibrated curve.

    ``thresholds`` are in score space, one per exit but the last ([E-1], +inf = exit off);
    ``variant`` picks the rule variant they apply to.
    """

    name: str
    thresholds: torch.Tensor
    variant: int = 0


@dataclass
class MethodReport:
    """Everything a method tells the leaderboard besides its exits' outputs, in one object.

    ``variants``: names of the decision-rule variants the outputs carry (one unnamed by default);
    ``operating_points``: fixed threshold vectors reported besides the curve;
    ``native_thresholds``: maps the hull's threshold vectors [P, E-1] to the method's own units
    ({"name", "values"}), for a score that transforms the paper's quantity (BranchyNet's −entropy);
    ``extra_metrics``: further test metrics (NMI, ARI...) of each row of final predictions [V, N];
    ``fit_info``: what ``fit`` did, stored in the result as is; ``exit_names``: one per exit.
    """

    exit_names: list[str]
    variants: list[str] = field(default_factory=lambda: [""])
    notes: str = ""
    operating_points: list[OperatingPoint] = field(default_factory=list)
    fit_info: dict[str, Any] = field(default_factory=dict)
    native_thresholds: Callable[[torch.Tensor], dict[str, Any] | None] | None = None
    extra_metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, list[float]]] | None = None


@dataclass
class MethodContext:
    """What the harness tells a method about the cell it runs in."""

    num_classes: int
    input_shape: tuple[int, int, int]
    stage_costs: StageCosts
    device: torch.device
    seed: int
    batch_size: int = 256
    train_batch_size: int = 128
    augment: Augment | None = None
    backbone_key: str = ""
    activations: ActivationCache = field(default_factory=ActivationCache)
    extra: dict[str, Any] = field(default_factory=dict)
    # a freshly initialised copy of the backbone (its plugin's own init), for methods
    # that train from scratch instead of from the cached base network; None outside a run
    fresh_backbone: Callable[[], StagedBackbone] | None = None


def exit_fires(scores: torch.Tensor, limits: torch.Tensor, strict: bool) -> torch.Tensor:
    """The exit rule: score > T (strict) or score >= T; a score of -inf vetoes the exit."""
    passed = scores > limits if strict else scores >= limits
    return passed & (scores != float("-inf"))


class ExitStrategy(ABC):
    """An early-exit method: exits on a staged backbone, fitted under a budget, then run
    exit by exit by the core (see the module docstring).

    A method implements ``fit``, ``exit_taps``, ``exit_step`` and ``exit_costs``; it may
    override ``init_state`` and ``decide`` (a rule that carries per-sample state or is not
    "score passes threshold"), ``build_traces`` (a trace type for such a rule),
    ``split_traces`` (a calibration trace it can build without running the images) and
    ``report``. Class attributes:
    ``strict``: exit when score > T (True) or score >= T (False).
    ``chained``: an exit's score needs every earlier exit evaluated (patience-style rules),
    so switching an early exit off does not save its overhead.
    ``default_calibrator``: the calibrator used when the suite names none.
    ``notes``: deviations from the paper, shown in the leaderboard.
    ``frozen_products``: the activations (reducer key -> reducer) the method reads with
    ``shared_activations`` on its training split; the core has the run's first frozen pass over
    that split (``frozen_pass``, e.g. E²CM's class-mean statistics) fill them on its way.
    """

    strict: bool = True
    chained: bool = False
    default_calibrator: str = "per-exit-bisection"
    notes: str = ""
    frozen_products: ClassVar[Mapping[str, Reducer]] = {}

    def __init__(self, backbone: StagedBackbone, context: MethodContext) -> None:
        self.backbone = backbone
        self.context = context

    # -- what every method provides ------------------------------------------------------

    @abstractmethod
    def fit(self, train: Dataset, budget: Budget) -> None:
        """Train or compute whatever the exits need, using only batches from ``budget``."""

    @abstractmethod
    def exit_taps(self) -> list[int]:
        """The backbone stage whose output each *early* exit reads (increasing stage indices).
        The final exit reads the last stage's output, so a method has ``len(exit_taps()) + 1`` exits."""

    @abstractmethod
    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        """Exit ``j``'s prediction and score for the rows of ``features`` (the output of stage
        ``exit_taps()[j]``, or of the last stage for the final exit), which are the rows still
        running. A chained rule reads and updates ``state`` (same rows); the core calls the exits
        in order, and skips an early exit whose threshold is +inf unless the method is ``chained``."""

    @abstractmethod
    def exit_costs(self) -> ExitCosts:
        """MACs to reach each exit and each exit's own overhead."""

    # -- optional hooks --------------------------------------------------------------------

    def init_state(self, x: torch.Tensor) -> ExitState:
        """The per-sample state for a batch of images ``x`` before its first exit (none by default)."""
        return {}

    def decide(self, j: int, out: StepOutput, thresholds: torch.Tensor, state: ExitState) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
        """Which rows leave at exit ``j`` ([B] bool) and the prediction each leaves with ([B]).

        ``out`` holds one variant's outputs per row ([B]), ``thresholds`` [B] float64 the row's
        threshold at this exit. A row with +inf has the exit off (it is asked only when the method is
        ``chained`` or the batch runs masked): it must not leave, nor change threshold-dependent state.
        The default is the threshold rule ``exit_fires``;
        the final exit lets every row leave. A rule with its own semantics (class exclusion) overrides
        this, keeps any threshold-dependent state in ``state``, and mirrors it in ``build_traces``."""
        if j == self.num_exits() - 1:
            return torch.ones_like(out.preds, dtype=torch.bool), out.preds
        scores = out.scores.double()  # compare in float64, as the trace does
        return exit_fires(scores, thresholds.to(scores.device, torch.float64), self.strict), out.preds

    def build_traces(self, preds: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                     details: list[torch.Tensor | None]) -> list[ExitTrace]:
        """Traces of one split from every exit's outputs: ``preds``/``scores`` [P, E, N], ``labels`` [N],
        ``details`` one [N, ...] tensor (or None) per exit. One plain ``ExitTrace`` per variant by default;
        a method whose ``decide`` is not the threshold rule returns its own ExitTrace subclass here."""
        from eebench.trace import ExitTrace

        return [ExitTrace(preds=p, scores=s, labels=labels, strict=self.strict, chained=self.chained)
                for p, s in zip(preds, scores, strict=True)]

    def split_traces(self, dataset: Dataset) -> list[ExitTrace] | None:
        """The calibration split's traces, one per variant, built without running the images (from
        activations the method already holds), or None: the core runs the exits on the images.

        Asked for the calibration split only: the test trace always comes from ``exit_step`` on the
        images, the same calls the executor makes."""
        return None

    def calibration_view(self, trace: ExitTrace) -> ExitTrace:
        """The calibration trace thresholds are chosen on (unchanged by default).

        An unsupervised method swaps the true labels for a label-free target here (e.g.
        its final exit's own assignments), so labels never choose its thresholds.
        """
        return trace

    def report(self) -> MethodReport:
        """Names, rule variants, operating points, notes and fit details for the result (see
        ``MethodReport``); called after ``fit``."""
        return MethodReport(exit_names=[f"exit{i}" for i in range(self.num_exits())], notes=self.notes)

    def modules(self) -> list[nn.Module]:
        """Modules the harness moves to the device, puts in eval mode and saves with the cell."""
        return [self.backbone]

    # -- provided by the core ----------------------------------------------------------------

    def num_exits(self) -> int:
        return len(self.exit_taps()) + 1

    @torch.no_grad()
    def exit_outputs(self, x: torch.Tensor) -> ExitOutputs:
        """Every exit's prediction and score for a batch ([E, B] or [P, E, B]), from the per-exit calls."""
        from eebench.stepping import run_all_exits

        outputs, _ = run_all_exits(self, x)
        return outputs

    def eval(self) -> None:
        for module in self.modules():
            module.eval()

    def state_dict(self) -> dict[str, Any]:
        """Everything the fitted exits need at inference: each module's state (plus whatever a method
        adds by overriding this and ``load_state_dict``), saved with the cell for ``eebench bench``."""
        return {f"module{i}": module.state_dict() for i, module in enumerate(self.modules())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, module in enumerate(self.modules()):
            module.load_state_dict(state[f"module{i}"])

    def _cache_key(self) -> str:
        """The run-wide cache's name for this method's frozen base backbone."""
        return self.context.backbone_key or f"untracked-{id(self.backbone)}"

    def shared_activations(self, dataset: Dataset, reducer: Reducer, reducer_key: str, budget: Budget) -> Activations:
        """Reduced outputs of every exit point of the *frozen* backbone, shared across methods.

        Only for methods that leave the backbone untouched: the cache is keyed by the base
        backbone, so a method that trains the backbone must run it itself. The core charges
        ``budget`` the pass as if the method ran it alone, whoever paid for it: ``len(dataset)``
        extra forward samples, that many full-backbone forward MACs, and the pass's seconds.
        """
        key = self._cache_key()
        size = len(dataset)
        charge = Charge(forward_samples=size, macs=size * self.context.stage_costs.total)
        return budget.read_shared(lambda: self.context.activations.read_activations(
            self.backbone, dataset, reducer, backbone_key=key, reducer_key=reducer_key,
            batch_size=self.context.batch_size, device=self.context.device,
        ), charge)

    def frozen_pass(self, dataset: Dataset, description: str = "frozen pass") -> Iterator[FrozenBatch]:
        """One pass of the *frozen* backbone over ``dataset``, batch by batch, with every exit point's output:
        for statistics a method derives itself (inside ``shared_result``'s compute). The run's cache fills
        every declared ``frozen_products`` from the same pass, so no method pays a pass for those."""
        ctx = self.context
        return ctx.activations.frozen_pass(self.backbone, dataset, backbone_key=self._cache_key(),
                                           batch_size=ctx.batch_size, device=ctx.device, description=description)

    def shared_result(self, dataset: Dataset, name: str, compute: Callable[[], Shared], budget: Budget,
                      charge: Charge) -> Shared:
        """``compute()``'s value for ``dataset``, computed once per run and shared by every method
        (any cell) that asks for ``name`` on the same *frozen* base backbone.

        For statistics a frozen-backbone method derives from the backbone on a split (E²CM's
        class means, say): ``name`` must say everything the value depends on besides the
        backbone and the split, and ``compute`` must not use the method's own trained state.
        The core charges ``budget`` what ``charge`` says the passes cost the method (training
        samples count against a samples budget, so take a whole-split result only when
        ``budget.covers(len(dataset))``), plus the passes' recorded seconds, whoever paid them.
        """
        key = self._cache_key()
        return budget.read_shared(lambda: self.context.activations.read(key, dataset, name, compute), charge)

    def cached_activations(self, dataset: Dataset, reducer_key: str) -> Activations | None:
        """What ``shared_activations`` already holds for ``dataset``, without computing anything."""
        key = self._cache_key()
        return self.context.activations.peek(key, dataset, reducer_key)


# -- helpers the built-in plugins share (public through eebench.api) ------------------------------

def exit_costs_at(stage_costs: StageCosts, taps: Sequence[int], overheads: Sequence[float]) -> ExitCosts:
    """``ExitCosts`` of early exits at stages ``taps`` (plus the final exit, which costs the whole
    backbone and no overhead of its own), each early exit paying ``overheads[j]`` on top."""
    if len(overheads) != len(taps):
        raise ValueError(f"{len(taps)} exit taps but {len(overheads)} overheads")
    backbone = [stage_costs.through(s) for s in taps] + [stage_costs.total]
    return ExitCosts(torch.tensor(backbone, dtype=torch.float64),
                     torch.tensor([*overheads, 0.0], dtype=torch.float64), stage_costs.total)


def seeded_modules(seed: int, device: torch.device | str, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` without touching the global RNG, moved to ``device``:
    a method's exit heads initialised the same way whatever ran before them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module.to(device)
