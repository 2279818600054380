"""The cost model: fvcore MACs cross-checked against torch's own FLOP counter."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from eebench.costs import StageCosts, count_macs


def torch_flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def test_conv_and_linear_macs_are_half_of_torch_flops() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                        nn.Flatten(), nn.Linear(16 * 15 * 15, 10)).eval()
    x = torch.randn(1, 3, 32, 32)
    assert 2 * count_macs(net, x) == torch_flops(net, x)


def test_resnet20_conv_and_linear_counts_match_torch(registry) -> None:
    from fvcore.nn import FlopCountAnalysis

    model = registry.get("backbones", "resnet20")(10, (1, 28, 28)).eval()
    x = torch.zeros(1, 1, 28, 28)
    by_op = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).by_operator()
    conv_linear_macs = by_op["conv"] + by_op["linear"]
    assert 2 * conv_linear_macs == torch_flops(model, x)
    costs = StageCosts.measure(model, (1, 28, 28))
    assert abs(costs.total - FlopCountAnalysis(model, x).total()) <= 1e-6 * costs.total
    assert all(m > 0 for m in costs.stage_macs)
    assert [costs.through(i) for i in range(len(costs.stage_macs))] == sorted(
        costs.through(i) for i in range(len(costs.stage_macs)))
