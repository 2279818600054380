"""The ExitStrategy contract: what an early-exit method must provide to the harness."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from eebench.activations import ActivationCache, Activations, Reducer, Shared
from eebench.budget import Budget, Charge
from eebench.costs import ExitCosts, StageCosts
from eebench.datasets import Augment
from eebench.model import StagedBackbone

if TYPE_CHECKING:
    from eebench.trace import ExitTrace


@dataclass
class ExitOutputs:
    """Per-exit predictions and confidence scores for one batch: both [E, B], or [P, E, B]
    for a method with P variants of its decision rule (``ExitStrategy.variant_names``).

    Scores are oriented so that *higher means more confident*; a method whose rule is
    "entropy < T" reports ``-entropy``. The last exit always exits.
    """

    preds: torch.Tensor
    scores: torch.Tensor


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


class ExitStrategy(ABC):
    """An early-exit method: attaches to exit points, is fitted under a budget, then
    scores every sample at every exit.

    Class attributes a method may override:
    ``strict``: exit when score > T (True) or score >= T (False).
    ``chained``: an exit's score needs every earlier exit evaluated (patience-style rules),
    so switching an early exit off does not save its overhead.
    ``default_calibrator``: the calibrator used when the suite names none.
    ``notes``: deviations from the paper, shown in the leaderboard.
    """

    strict: bool = True
    chained: bool = False
    default_calibrator: str = "per-exit-bisection"
    notes: str = ""

    def __init__(self, backbone: StagedBackbone, context: MethodContext) -> None:
        self.backbone = backbone
        self.context = context

    @abstractmethod
    def fit(self, train: Dataset, budget: Budget) -> None:
        """Train or compute whatever the exits need, using only batches from ``budget``."""

    @abstractmethod
    def exit_outputs(self, x: torch.Tensor) -> ExitOutputs:
        """Every exit's prediction and score for a batch, from one forward pass."""

    @abstractmethod
    def exit_costs(self) -> ExitCosts:
        """MACs to reach each exit and each exit's own overhead."""

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

    def cached_outputs(self, dataset: Dataset) -> Iterator[tuple[ExitOutputs, torch.Tensor]] | None:
        """``(exit_outputs, labels)`` batches for ``dataset`` without running the backbone, or None.

        A frozen-backbone method whose activations for ``dataset`` are already cached (the
        calibration split is the training split by default) scores its exits from them, so its
        calibration trace costs no second backbone pass. None: the harness runs the images.
        """
        return None

    def variant_names(self) -> list[str]:
        """Names of the decision-rule variants the outputs carry (one unnamed by default)."""
        return [""]

    def operating_points(self) -> list[OperatingPoint]:
        """Fixed threshold vectors reported besides the curve (none by default)."""
        return []

    def precomputed_trace(self, dataset: Dataset) -> ExitTrace | list[ExitTrace] | None:
        """A trace the method already holds for ``dataset`` (saves a pass), or None."""
        return None

    def calibration_view(self, trace: ExitTrace) -> ExitTrace:
        """The calibration trace thresholds are chosen on (unchanged by default).

        An unsupervised method swaps the true labels for a label-free target here (e.g.
        its final exit's own assignments), so labels never choose its thresholds.
        """
        return trace

    def extra_metrics(self, preds: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
        """Further test metrics (e.g. NMI, ARI) of each row of final predictions [V, N].

        The harness calls it for every hull point, operating point and the no-exit vector;
        values go into the result JSON and the leaderboard. None by default.
        """
        return {}

    def native_thresholds(self, thresholds: torch.Tensor) -> dict[str, Any] | None:
        """The hull's threshold vectors [P, E-1] in the method's own units, stored as
        ``curve.native_thresholds`` ({"name", "values"}); for a trace whose score is a transform
        of the paper's quantity (BranchyNet scores −entropy). None: trace units only."""
        return None

    def fit_info(self) -> dict[str, Any]:
        """What ``fit`` did (iterations, stopping reasons...), stored in the result as is."""
        return {}

    def exit_names(self) -> list[str]:
        return [f"exit{i}" for i in range(self.exit_costs().num_exits)]

    def modules(self) -> list[nn.Module]:
        """Modules the harness moves to the device and puts in eval mode for traces."""
        return [self.backbone]

    def eval(self) -> None:
        for module in self.modules():
            module.eval()
