"""CIFAR-style ResNet 6n+2 (He et al., CVPR 2016, section 4.2): resnet20 ... resnet110.

Three groups of n BasicBlocks at widths 16/32/64 on a 3x3 stem. Where a block halves the
resolution and doubles the width, the shortcut is **option B**: a 1x1 stride-2 conv + BN
projection (the paper's CIFAR runs used option A, zero-padded identity; B is the common
reimplementation and adds 2,752 parameters and 0.26M MACs to resnet20). Every residual
block is a stage and an exit point, as the SDN / E2CM CIFAR ResNets place their exits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eebench.api import StagedBackbone, params_model
from eebench_plugins.backbones._common import check_input_shape, check_num_classes, kaiming_conv
from eebench_plugins.manifests.backbones import CifarResNetParams

BASE_WIDTHS = (16, 32, 64)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers plus a shortcut; projection (option B) when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The plain network: ``head(blocks(stem(x)))``; :meth:`staged` cuts it at every block."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.depth = depth
        n = (depth - 2) // 6
        widths = [max(1, int(round(w * width))) for w in BASE_WIDTHS]
        self.stem = nn.Sequential(conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for group, planes in enumerate(widths):
            for index in range(n):
                stride = 2 if group > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_planes, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        """He init for convs (the paper's choice); BN starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                kaiming_conv(module)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def staged(self, name: str | None = None) -> StagedBackbone:
        """The same modules as stages ``[stem, block_1, ..., block_3n]``; exits after every block."""
        stages = [self.stem, *self.blocks]
        return StagedBackbone(stages, self.head, exit_points=range(1, len(stages)), name=name or f"resnet{self.depth}")


@params_model(CifarResNetParams)
def cifar_resnet(
    depth: int, num_classes: int, input_shape: tuple[int, int, int], *, width: float = 1.0
) -> StagedBackbone:
    """Factory body shared by resnet20 ... resnet110; ``width`` scales 16/32/64."""
    channels, _, _ = check_input_shape(input_shape)
    network = CifarResNet(depth, check_num_classes(num_classes), in_channels=channels, width=width)
    return network.staged(f"resnet{depth}")
