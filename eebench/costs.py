"""One cost counter for every method: fvcore MACs at batch 1, stage by stage, plus ONE table
of MAC-equivalents for the work fvcore does not count.

Costs are MACs; FLOPs ≈ 2 × MACs.

The convention, which every built-in method's exit overheads follow:

* Work done by a module (a backbone stage, an exit head, a branch) is counted by
  :func:`count_macs` on that module at batch 1: fvcore's count (one multiply-add = 1 for
  conv / linear / matmul; eval-mode BatchNorm 2 per value, 1 without affine; adaptive
  average pooling 1 per input value), plus the pooling ops fvcore skips (max pooling,
  average pooling with a kernel, ``mean``) priced from the table below. fvcore's own
  choices stand inside modules, for the backbone and the exits alike: activations (ReLU,
  sigmoid), bias adds, residual adds and other elementwise arithmetic between tensors
  (SDN's α mix of its two pooled maps), reshapes and concatenations cost 0.
* Work no module does (distances to class means, a softmax, an entropy, a sort,
  comparisons) is priced from :data:`MAC_EQUIVALENTS`: every multiply-add, every
  elementwise op on one value (add, multiply, divide, exp, log, sqrt), every value entering
  a reduction (sum, max, argmax, one pooling window) and every comparison = 1
  MAC-equivalent. The derived entries, used by every method:

  =========================================  =====================================
  squared Euclidean distance to K means, D   D·K + K (x·μ_k via the expansion
  dims (``squared_distance_macs``)           ‖x‖² − 2x·μ_k + ‖μ_k‖², −2μ_k and ‖μ_k‖²
                                             stored; ‖x‖² is common to all means)
  softmax over K (``softmax_macs``)          3K (exp, sum, divide)
  entropy of K probabilities                 2K (log, multiply-add of p·log p)
  (``entropy_macs``)
  sort of n values (``sort_macs``)           n·⌈log2 n⌉ comparisons
  max / avg pooling with a kernel            one per value each window reads:
  (``pool_macs``)                            output values × window area
  adaptive max / avg pooling                 one per input value (fvcore's count
  (``adaptive_pool_macs``)                   of adaptive average pooling)
  =========================================  =====================================

* An exit's decision: the threshold test and the argmax giving its prediction are not
  counted for any method (nor is the backbone head's argmax); the score transform
  (softmax, entropy) is counted only where a method's ``count_softmax`` is set (the papers
  leave it out). Work the score *needs* beyond that is always counted (E²CM's distances,
  BWDS's policy inputs).

What fvcore counts, checked in ``tests/test_costs_convention.py``: ``adaptive_avg_pool2d``
one per input value (= every value each window reads whenever the windows tile the input,
as a global pool's always do), which the table adopts for every adaptive pool and which is
not added again; ``max_pool2d``, ``avg_pool2d``, ``adaptive_max_pool2d`` and ``mean``
nothing, so :func:`count_macs` prices them from the table; ``flatten``,
``relu``, ``sigmoid``, ``softmax``, ``sqrt``, ``sort`` and elementwise add / multiply
nothing; ``batch_norm`` (eval) two per value; ``linear`` in·out (bias free).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eebench.model import StagedBackbone

#: The one table: MAC-equivalents of each elementary op (see the module docstring).
MAC_EQUIVALENTS: dict[str, float] = {
    "multiply-add": 1.0,  # what fvcore counts: one fused multiply-add
    "elementwise": 1.0,  # one add, multiply, divide, exp, log or sqrt on one value
    "reduction": 1.0,  # one value entering a sum, max, argmax or pooling window
    "comparison": 1.0,  # one comparison (sorting, thresholds)
}


def multiply_add_macs(count: float) -> float:
    """``count`` multiply-adds (a dot product of length n is n)."""
    return MAC_EQUIVALENTS["multiply-add"] * float(count)


def elementwise_macs(count: float) -> float:
    """``count`` elementwise ops, each on one value (add, multiply, divide, exp, log, sqrt)."""
    return MAC_EQUIVALENTS["elementwise"] * float(count)


def reduction_macs(count: float) -> float:
    """A sum / max / argmax over ``count`` values (or pooling windows reading that many)."""
    return MAC_EQUIVALENTS["reduction"] * float(count)


def comparison_macs(count: float) -> float:
    """``count`` comparisons."""
    return MAC_EQUIVALENTS["comparison"] * float(count)


def squared_distance_macs(dim: int, num_means: int) -> float:
    """Squared Euclidean distances of one D-dim vector to K means via the expansion: D·K + K.

    ‖x‖² − 2x·μ_k + ‖μ_k‖² with −2μ_k and ‖μ_k‖² stored: K dot products (D·K multiply-adds)
    and one add of ‖μ_k‖² per mean (K). ‖x‖², common to every mean (it does not change their
    order), is not included: a method that needs the true distance adds it (D multiply-adds
    plus K adds; see ``eebench_plugins.class_means``).
    """
    return multiply_add_macs(int(dim) * int(num_means)) + elementwise_macs(int(num_means))


def softmax_macs(num_classes: int) -> float:
    """Softmax over K values: K exps, a sum of K, K divides = 3K."""
    k = int(num_classes)
    return elementwise_macs(k) + reduction_macs(k) + elementwise_macs(k)


def entropy_macs(num_classes: int) -> float:
    """Entropy −Σ p·log p of K probabilities (a softmax's, priced apart): K logs + K multiply-adds = 2K."""
    k = int(num_classes)
    return elementwise_macs(k) + multiply_add_macs(k)


def sort_macs(count: int) -> float:
    """A comparison sort of n values: n·⌈log2 n⌉ comparisons (0 for n ≤ 1)."""
    n = int(count)
    return comparison_macs(n * math.ceil(math.log2(n))) if n > 1 else 0.0


def pool_macs(output_numel: int, window: int) -> float:
    """Max or average pooling with a fixed kernel: every value each window reads, once."""
    return reduction_macs(int(output_numel) * int(window))


def adaptive_pool_macs(input_shape: tuple[int, ...]) -> float:
    """Adaptive max or average pooling: one per input value, whatever the output size.

    This is fvcore's own count of ``adaptive_avg_pool2d``, adopted for every adaptive pool
    (it is every value each window reads whenever the windows tile the input; overlapping
    adaptive windows read a few values twice, which fvcore, and so the table, leave out).
    """
    return reduction_macs(math.prod(int(d) for d in input_shape))


def _shape(value: Any) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    return [int(d) for d in get_shape(value)]


def _int_list(value: Any) -> list[int]:
    """A traced int-list argument (a constant, or a ListConstruct of constants)."""
    constant = value.toIValue()
    if constant is None and value.node().kind() == "prim::ListConstruct":
        constant = [v.toIValue() for v in value.node().inputs()]
    if constant is None or any(v is None for v in ([constant] if isinstance(constant, int) else constant)):
        raise ValueError(f"cannot read a pooling kernel from the trace: {value}")
    return [int(constant)] if isinstance(constant, int) else [int(v) for v in constant]


def _pool_handle(spatial: int):
    def handle(inputs: list[Any], outputs: list[Any]) -> float:
        out = _shape(outputs[0])
        kernel = _int_list(inputs[1])
        if len(kernel) == 1:
            kernel = kernel * spatial
        return pool_macs(math.prod(out), math.prod(kernel))
    return handle


def _input_values_handle(inputs: list[Any], outputs: list[Any]) -> float:
    """Adaptive pooling, and aten::mean (global average pooling by another name): one per input value."""
    return adaptive_pool_macs(tuple(_shape(inputs[0])))


def _pooling_handles() -> dict[str, Any]:
    """Handles for the pooling ops fvcore skips; its own ``adaptive_avg_pool2d`` handle stays."""
    handles: dict[str, Any] = {"aten::mean": _input_values_handle}
    for spatial in (1, 2, 3):
        handles[f"aten::max_pool{spatial}d"] = _pool_handle(spatial)
        handles[f"aten::max_pool{spatial}d_with_indices"] = _pool_handle(spatial)
        handles[f"aten::avg_pool{spatial}d"] = _pool_handle(spatial)
        handles[f"aten::adaptive_max_pool{spatial}d"] = _input_values_handle
        if spatial != 2:
            handles[f"aten::adaptive_avg_pool{spatial}d"] = _input_values_handle
    return handles


def count_macs(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> float:
    """MACs of ``module`` on ``example`` (batch 1): fvcore's count, every pooling op priced
    from the table (see the module docstring)."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

    inputs = example if isinstance(example, tuple) else (example,)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(module, inputs).set_op_handle(**_pooling_handles())
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return float(analysis.total())
    finally:
        module.train(was_training)


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
