"""The backbone contract: an ordered list of stages plus a head.

Stage boundaries are the candidate exit points. Keeping the network as plain stages lets
every method run the backbone stage by stage, attach whatever it needs at a boundary, and
lets the cost model count each stage on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn


class StagedBackbone(nn.Module):
    """A classifier written as ``head(stage_n(...stage_1(x)))``.

    ``exit_points`` lists the stage indices whose outputs may carry an early exit (for
    residual networks: after every residual block). The head is the backbone's own
    classifier, the final exit of every method.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        head: nn.Module,
        exit_points: Sequence[int] | None = None,
        name: str = "backbone",
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head
        points = list(range(len(self.stages))) if exit_points is None else list(exit_points)
        if any(p < 0 or p >= len(self.stages) for p in points) or points != sorted(set(points)):
            raise ValueError(f"exit_points must be increasing stage indices, got {points}")
        self.exit_points = points
        self.backbone_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def iter_stages(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(stage_index, output)`` for every stage, in order."""
        for index, stage in enumerate(self.stages):
            x = stage(x)
            yield index, x

    def stage_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every stage output and the head's logits, from one forward pass."""
        outputs = [out for _, out in self.iter_stages(x)]
        return outputs, self.head(outputs[-1])


def stage_taps(backbone: StagedBackbone, x: torch.Tensor, taps: Sequence[int],
               through: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The outputs of stages ``taps`` and of the last stage run, from one pass of ``backbone``
    (stopping after stage ``through`` when given): what a method's training loop reads."""
    wanted, outputs, out = set(taps), [], x
    last = len(backbone.stages) - 1 if through is None else through
    for index, stage in enumerate(backbone.stages):
        out = stage(out)
        if index in wanted:
            outputs.append(out)
        if index >= last:
            break
    return outputs, out
