"""torchvision ImageNet architectures adapted to small inputs, cut at every residual block.

The adaptation follows the SDN / E2CM CIFAR practice: on inputs of side <= 64 the ResNet
7x7 stride-2 stem conv becomes 3x3 stride 1 and the max-pool goes, and the MobileNetV3 /
EfficientNet stem conv gets stride 1; otherwise ImageNet features would be 1x1 after a
few blocks. The first conv takes ``input_shape[0]`` channels and the classifier has
``num_classes`` outputs. :func:`build_torchvision` returns the adapted torchvision module
itself, and :func:`stage_torchvision` reuses its modules, so both compute the same thing.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models import EfficientNet, MobileNetV3, ResNet

from eebench.api import EebenchError, StagedBackbone
from eebench_plugins.backbones._common import (
    check_input_shape,
    check_num_classes,
    flatten_blocks,
    is_small_input,
    replace_first_conv,
)
from eebench_plugins.manifests.backbones import ARCHITECTURES


def build_torchvision(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    weights: str | None = None,
    small_input: bool | None = None,
    **builder_kwargs: object,
) -> nn.Module:
    """torchvision's ``arch`` (``weights=None`` unless named), adapted to the input and classes.

    ``weights`` goes to torchvision's own loader (e.g. ``"IMAGENET1K_V1"``); the 1000-way
    classifier is then replaced, and a kept first conv gets its filters adapted to the
    channel count. ``builder_kwargs`` (e.g. ``dropout``) go to the torchvision builder.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown torchvision backbone '{arch}'; expected one of: {', '.join(ARCHITECTURES)}")
    channels, _, _ = check_input_shape(input_shape)
    num_classes = check_num_classes(num_classes)
    if weights is None:
        model = models.get_model(arch, weights=None, num_classes=num_classes, **builder_kwargs)
    else:
        model = _pretrained(arch, weights, builder_kwargs)
        _replace_classifier(model, num_classes)
    small = is_small_input(input_shape, small_input)
    if isinstance(model, ResNet):
        _adapt_resnet_stem(model, channels, small, pretrained=weights is not None)
    else:
        _adapt_features_stem(model, channels, small, pretrained=weights is not None)
    return model


def _pretrained(arch: str, weights: str, builder_kwargs: dict) -> nn.Module:
    """torchvision's ``arch`` with its ``weights``, the file read weights-only.

    torchvision's builders read their (hash-checked on download, never again) file from the
    torch hub cache with ``weights_only=False``, so a file planted there would run code;
    this builds the same network (the weights' class count) and loads the state dict with
    ``weights_only=True``. A refused or damaged file is one line naming it.
    """
    enum = models.get_model_weights(arch).verify(weights)
    model = models.get_model(arch, weights=None, num_classes=len(enum.meta["categories"]), **builder_kwargs)
    try:
        state = enum.get_state_dict(progress=True, check_hash=True, weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # an unpickling refusal, a truncated file, mismatched keys
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its weights-only refusal
        reason = (text.splitlines() or [type(exc).__name__])[0][:200].strip()
        cached = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[-1]
        raise EebenchError(f"cannot load torchvision weights {enum} from {cached}: {type(exc).__name__}: {reason}; "
                           f"expected the state dict of {enum.url} (delete the file to download it again)",
                           key="weights") from exc
    return model


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """A fresh last linear layer with ``num_classes`` outputs (pretrained ones have 1000)."""
    if isinstance(model, ResNet):
        if model.fc.out_features != num_classes:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        return
    last = model.classifier[-1]
    if last.out_features != num_classes:
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)


def _adapt_resnet_stem(model: ResNet, channels: int, small: bool, *, pretrained: bool) -> None:
    """3x3 stride-1 stem without max-pool for small inputs; else keep 7x7/2 with new channels."""
    kernel, stride = (3, 1) if small else (7, 2)
    if small:
        model.maxpool = nn.Identity()
    elif channels == model.conv1.in_channels:
        return
    model.conv1 = replace_first_conv(model.conv1, channels, kernel_size=kernel, stride=stride, keep_weights=pretrained)


def _adapt_features_stem(model: nn.Module, channels: int, small: bool, *, pretrained: bool) -> None:
    """MobileNetV3 / EfficientNet: the stem conv ``features[0][0]`` gets stride 1 when small."""
    old = model.features[0][0]
    stride = 1 if small else old.stride[0]
    if stride == old.stride[0] and channels == old.in_channels:
        return
    model.features[0][0] = replace_first_conv(
        old, channels, kernel_size=old.kernel_size[0], stride=stride, keep_weights=pretrained
    )


def stage_torchvision(model: nn.Module, name: str = "backbone") -> StagedBackbone:
    """Cut a (possibly adapted) torchvision model into stem, one stage per block, [tail], head.

    The modules are shared with ``model``, not copied; the head replays torchvision's own
    ``avgpool -> flatten -> classifier``.
    """
    if isinstance(model, ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = flatten_blocks([model.layer1, model.layer2, model.layer3, model.layer4])
        tail: list[nn.Module] = []
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    elif isinstance(model, (MobileNetV3, EfficientNet)):
        features = list(model.features)
        stem, tail = features[0], [features[-1]]
        blocks = flatten_blocks(features[1:-1])
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
    else:
        raise ValueError(
            f"cannot stage {type(model).__name__}; expected a torchvision ResNet, MobileNetV3 or EfficientNet"
        )
    stages = [stem, *blocks, *tail]
    return StagedBackbone(stages, head, exit_points=range(1, len(blocks) + 1), name=name)


def torchvision_backbone(
    arch: str, num_classes: int, input_shape: tuple[int, int, int], **params: object
) -> StagedBackbone:
    """Factory body behind every torchvision name (bound to ``arch`` with functools.partial)."""
    model = build_torchvision(arch, num_classes, input_shape, **params)  # type: ignore[arg-type]
    return stage_torchvision(model, name=arch)
