"""The SDN internal classifier (Kaya et al., ICML 2019, ``InternalClassifier``): a shared
building block for every built-in method that hangs ICs on a backbone (SDN, BWDS,
E²CM+SDN).

For a [C, s, s] feature map the IC pools with kernel r = floor(s/4) (so the map shrinks
to about 4x4) when s >= 4, and does not pool when s < 4. The pooled map is the mix

    α · MaxPool_r(x) + (1 − α) · AvgPool_r(x)

with ONE learnable scalar α, initialised Uniform[0, 1) like the reference ``torch.rand(1)``
and never clamped; then flatten and a single ``Linear(C·(s/r)² [+ extra_inputs], K)``. No
BatchNorm, no ReLU, no hidden layer. A flat [D] feature gets a plain ``Linear(D, K)``.

Because the max- and avg-pooled maps do not depend on α, they can be computed once by a
frozen backbone and cached (``reduce_for_ic``: both maps stacked, [B, 2, C, s/r, s/r]);
``InternalClassifier.forward_pooled`` applies the α mix to such a cached pair, so training
on cached activations is the same function as running the IC on the live stage output.

MACs per IC (``InternalClassifier.macs``): ``count_macs`` on the IC itself at batch 1, the
core's counter (``eebench.costs``), which gives
- pooling (when r is defined): each of the two pools reads every value of its windows once,
  2·C·(s/r)²·r² (= 2·C·s² when r divides s), priced by the core's cost table (fvcore
  itself skips max- and avg-pooling);
- α mixing: 0 (elementwise arithmetic between tensors, free as the backbone's residual
  adds are);
- Linear: in · K with in = C·(s/r)² + extra_inputs (bias adds free).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eebench.api import count_macs


def reduction_kernel(side: int) -> int | None:
    """The reference ``feature_reduction_formula``: floor(s/4) for s >= 4, else no pooling."""
    return side // 4 if side >= 4 else None


def _kernel_for(shape: tuple[int, ...]) -> int | None:
    """Pooling kernel for a [C, H, W] (or [B, C, H, W]) shape; non-square maps use the shorter side."""
    if len(shape) < 3:
        return None
    return reduction_kernel(min(shape[-2], shape[-1]))


def reduce_for_ic(x: torch.Tensor) -> torch.Tensor:
    """Max- and avg-pooled maps stacked as [B, 2, C, s/r, s/r]: what an IC needs, minus α.

    Without pooling (s < 4, or a flat [B, D] feature) both slots hold ``x`` itself, so the
    α mix is the identity and every cached tensor has the same layout.
    """
    kernel = _kernel_for(tuple(x.shape)) if x.ndim == 4 else None
    if kernel is None:
        return torch.stack([x, x], dim=1)
    return torch.stack([F.max_pool2d(x, kernel), F.avg_pool2d(x, kernel)], dim=1)


def ic_reducer(stage: int, out: torch.Tensor) -> torch.Tensor:
    """``reduce_for_ic`` in the ``Reducer`` signature the activation cache calls."""
    return reduce_for_ic(out)


def pooled_shape(feature_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one sample's mixed (pooled) feature: [C, s/r, s/r], or unchanged without pooling."""
    kernel = _kernel_for(feature_shape)
    if kernel is None:
        return tuple(feature_shape)
    channels, height, width = feature_shape
    return (channels, height // kernel, width // kernel)


class InternalClassifier(nn.Module):
    """SDN's IC: mixed max/avg pooling with one learnable α, then one Linear (see module doc)."""

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, extra_inputs: int = 0) -> None:
        super().__init__()
        feature_shape = tuple(int(d) for d in feature_shape)
        if len(feature_shape) not in (1, 3):
            raise ValueError(f"internal classifier: features must be [C, H, W] or [D], got {list(feature_shape)}")
        if extra_inputs < 0:
            raise ValueError(f"extra_inputs must be >= 0, got {extra_inputs}")
        self.feature_shape = feature_shape
        self.num_classes = int(num_classes)
        self.extra_inputs = int(extra_inputs)
        self.kernel = _kernel_for(feature_shape)
        # Only a pooling IC has α, as in the reference (its no-pooling IC is a bare Linear).
        self.alpha = nn.Parameter(torch.rand(1)) if self.kernel is not None else None
        self.pooled_numel = math.prod(pooled_shape(feature_shape))
        self.linear = nn.Linear(self.pooled_numel + self.extra_inputs, self.num_classes)
        example = torch.zeros(1, *self.feature_shape)
        extra = torch.zeros(1, self.extra_inputs) if self.extra_inputs else None
        self._macs = count_macs(self, (example, extra) if extra is not None else example)  # at batch 1, on CPU

    def mix(self, pair: torch.Tensor) -> torch.Tensor:
        """α · max + (1 − α) · avg on a ``reduce_for_ic`` pair [B, 2, ...] -> [B, ...]."""
        if self.alpha is None:
            return pair[:, 0]
        return self.alpha * pair[:, 0] + (1 - self.alpha) * pair[:, 1]

    def forward_pooled(self, pair: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a (possibly cached) ``reduce_for_ic`` pair, plus optional extra features."""
        features = self.mix(pair).flatten(1)
        if self.extra_inputs:
            if extra is None or extra.shape[-1] != self.extra_inputs:
                raise ValueError(f"this IC expects {self.extra_inputs} extra inputs per sample")
            features = torch.cat([features, extra.to(features.dtype)], dim=1)
        return self.linear(features)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the live stage output."""
        return self.forward_pooled(reduce_for_ic(x), extra)

    def macs(self) -> float:
        """MACs at batch 1 as the core counts them (``count_macs`` on this IC, when it was built;
        see the module doc)."""
        return self._macs
