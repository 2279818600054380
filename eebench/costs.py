"""One cost counter for every method: fvcore MACs at batch 1, stage by stage.

fvcore counts one fused multiply-add as one operation, so its totals are MACs;
FLOPs = 2 * MACs where a table wants FLOPs. Module-free operations that do real work
(distances, softmax, entropy) get analytic formulas next to the method that uses them.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from eebench.model import StagedBackbone


def count_macs(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> float:
    """MACs of ``module`` on ``example`` (batch 1) as fvcore counts them."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

    inputs = example if isinstance(example, tuple) else (example,)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(module, inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return float(analysis.total())
    finally:
        module.train(was_training)


def softmax_macs(num_classes: int) -> float:
    """About 3K operations: exponentiate, sum, divide."""
    return 3.0 * num_classes


@dataclass(frozen=True)
class StageCosts:
    """Per-stage MACs of a backbone and the shape of every stage output (batch 1)."""

    stage_macs: tuple[float, ...]
    head_macs: float
    stage_shapes: tuple[tuple[int, ...], ...]

    @property
    def total(self) -> float:
        return float(sum(self.stage_macs) + self.head_macs)

    def through(self, stage_index: int) -> float:
        """MACs of running stages 0..stage_index inclusive."""
        return float(sum(self.stage_macs[: stage_index + 1]))

    def stages_at_fractions(self, candidates: list[int], fractions: list[float]) -> list[int]:
        """For each fraction, the first candidate stage whose cumulative cost reaches it.

        SDN places its six ICs this way (15, 30, ..., 90 % of the backbone); duplicates are
        kept out, so a coarse backbone may yield fewer stages than fractions.
        """
        picked: list[int] = []
        for fraction in fractions:
            stage = next((s for s in candidates if self.through(s) >= fraction * self.total), None)
            if stage is not None and stage not in picked:
                picked.append(stage)
        return picked

    @classmethod
    def measure(cls, backbone: StagedBackbone, input_shape: tuple[int, ...]) -> StageCosts:
        device = next(backbone.parameters()).device
        x = torch.zeros(1, *input_shape, device=device)
        macs, shapes = [], []
        with torch.no_grad():
            for stage in backbone.stages:
                macs.append(count_macs(stage, x))
                x = stage(x)
                shapes.append(tuple(x.shape[1:]))
            head = count_macs(backbone.head, x)
        return cls(tuple(macs), head, tuple(shapes))


@dataclass(frozen=True)
class ExitCosts:
    """What each exit of a method costs, before the exit rule decides who pays what.

    ``backbone_macs[j]``: MACs of the (possibly modified) network needed to reach exit j.
    ``overhead_macs[j]``: MACs of evaluating exit j itself (head, distances, policy).
    A sample leaving at exit j pays ``backbone_macs[j]`` plus the overhead of every
    *enabled* exit up to and including j. ``reference_macs`` is the plain backbone (= 1.0).
    """

    backbone_macs: torch.Tensor
    overhead_macs: torch.Tensor
    reference_macs: float

    def __post_init__(self) -> None:
        if self.backbone_macs.shape != self.overhead_macs.shape or self.backbone_macs.ndim != 1:
            raise ValueError("backbone_macs and overhead_macs must be 1-D and the same length")
        if bool((self.backbone_macs.diff() < 0).any()):
            raise ValueError("backbone_macs must not decrease along exits")

    @property
    def num_exits(self) -> int:
        return int(self.backbone_macs.numel())

    def cumulative(self, enabled: torch.Tensor | None = None) -> torch.Tensor:
        """MACs of leaving at each exit; ``enabled`` is a bool mask [..., E] (all by default)."""
        overhead = self.overhead_macs.double()
        if enabled is not None:
            overhead = overhead * enabled.double()
        return self.backbone_macs.double() + overhead.cumsum(-1)

    def normalised(self, enabled: torch.Tensor | None = None) -> torch.Tensor:
        return self.cumulative(enabled) / self.reference_macs

    def to_dict(self) -> dict[str, list[float] | float]:
        return {
            "backbone_macs": self.backbone_macs.tolist(),
            "overhead_macs": self.overhead_macs.tolist(),
            "cumulative_macs": self.cumulative().tolist(),
            "cumulative_normalised": self.normalised().tolist(),
            "reference_macs": self.reference_macs,
        }
