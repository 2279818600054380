"""Small helpers shared by the backbone builders: input checks and first-conv surgery."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

# Inputs up to this side get the CIFAR treatment (no early downsampling), as SDN / E2CM do.
SMALL_INPUT_MAX_SIDE = 64


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(channels, height, width)`` as ints; a clear error beats a shape mismatch deep inside."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def check_num_classes(num_classes: int) -> int:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def is_small_input(input_shape: Sequence[int], small_input: bool | None) -> bool:
    """The caller's choice, or automatic: small when the shorter side is at most 64 pixels."""
    if small_input is not None:
        return bool(small_input)
    return min(input_shape[1], input_shape[2]) <= SMALL_INPUT_MAX_SIDE


def flatten_blocks(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """One entry per block: plain ``nn.Sequential`` containers are opened, anything else kept.

    Only exact ``nn.Sequential`` is opened, never a subclass such as torchvision's
    ``Conv2dNormActivation``, which is one layer, not a list of blocks.
    """
    blocks: list[nn.Module] = []
    for module in modules:
        if type(module) is nn.Sequential:
            blocks.extend(module)
        else:
            blocks.append(module)
    return blocks


def kaiming_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """He init (fan_out, ReLU), as torchvision and the CIFAR ResNet papers use for convs."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def adapt_in_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Pretrained first-conv weights for another channel count (timm's rule).

    One channel sums the RGB filters (a grey image is R = G = B); more channels repeat
    the filters and rescale so the response keeps its magnitude.
    """
    current = weight.shape[1]
    if in_channels == current:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // current)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (current / in_channels)


def replace_first_conv(
    old: nn.Conv2d,
    in_channels: int,
    *,
    kernel_size: int,
    stride: int,
    keep_weights: bool,
) -> nn.Conv2d:
    """A new first conv with the given input channels, kernel and stride ("same" padding).

    ``keep_weights`` carries the old (pretrained) filters over when the kernel is unchanged;
    otherwise the conv is freshly He-initialised.
    """
    conv = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=old.bias is not None,
    )
    if keep_weights and tuple(old.kernel_size) == (kernel_size, kernel_size):
        with torch.no_grad():
            conv.weight.copy_(adapt_in_channels(old.weight, in_channels))
            if old.bias is not None:
                conv.bias.copy_(old.bias)
        return conv
    return kaiming_conv(conv)
