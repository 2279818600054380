"""The DEC encoder d–500–500–2000–10 as a StagedBackbone, one stage per dense layer.

Stages are the encoder layers (the input is flattened first), so stage boundaries are the
exit points of the multi-exit DEC: after layer 1 (DEC_small's trunk), after layer 2
(DEC_middle's) and after the 10-unit embedding (DEC_large). The head is DEC_large's
clustering layer: its forward gives the Student-t soft assignments, not class logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from eebench.api import StagedBackbone, params_model
from eebench_plugins.dec.clustering import ClusteringLayer
from eebench_plugins.manifests.dec import PAPER_DIMS, DECBackboneParams


class DenseStage(nn.Module):
    """One encoder layer: (flatten) → linear → (ReLU); the embedding layer stays linear."""

    def __init__(self, in_features: int, out_features: int, *, relu: bool, flatten: bool = False) -> None:
        super().__init__()
        self.flatten = flatten
        self.relu = relu
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = x.flatten(1)
        x = self.linear(x)
        return torch.relu(x) if self.relu else x


def xavier_relu_(linear: nn.Linear) -> nn.Linear:
    """pt-sdae's init: Xavier-uniform with the ReLU gain, zero bias."""
    nn.init.xavier_uniform_(linear.weight, gain=nn.init.calculate_gain("relu"))
    nn.init.zeros_(linear.bias)
    return linear


class DECEncoder(StagedBackbone):
    """The stacked encoder plus DEC_large's clustering layer as the head."""

    stages: nn.ModuleList
    head: ClusteringLayer

    @property
    def linears(self) -> list[nn.Linear]:
        return [stage.linear for stage in self.stages]

    @property
    def widths(self) -> list[int]:
        return [linear.out_features for linear in self.linears]


@params_model(DECBackboneParams)
def dec_backbone(num_classes: int, input_shape: Sequence[int], *, dims: Sequence[int] = PAPER_DIMS,
                 num_clusters: int | None = None, alpha: float = 1.0) -> DECEncoder:
    """``dims``: widths of the encoder layers, the last one the embedding (paper: 500-500-2000-10).

    ``num_clusters`` defaults to the dataset's number of classes, as in the DEC paper.
    """
    dims = [int(d) for d in dims]
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"dims must list at least two positive widths, got {dims}")
    previous = math.prod(int(s) for s in input_shape)
    stages = []
    for index, width in enumerate(dims):
        last = index == len(dims) - 1
        stage = DenseStage(previous, width, relu=not last, flatten=index == 0)
        xavier_relu_(stage.linear)
        stages.append(stage)
        previous = width
    head = ClusteringLayer(int(num_clusters or num_classes), dims[-1], alpha)
    return DECEncoder(stages, head, name="dec")
