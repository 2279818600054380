"""Built-in backbones: CIFAR ResNets, small-input torchvision networks and ``timm:<name>``.

Every factory is ``factory(num_classes, input_shape, **params) -> StagedBackbone``;
``timm:`` is a prefix factory called as ``factory(suffix, num_classes, input_shape, **params)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from eebench import hookimpl
from eebench_plugins.backbones.cifar_resnet import DEPTHS, cifar_resnet
from eebench_plugins.backbones.timm_nets import timm_backbone
from eebench_plugins.backbones.torchvision_nets import ARCHITECTURES, torchvision_backbone


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    """CIFAR ResNets by depth, torchvision networks by their torchvision name, ``timm:`` prefix."""
    for depth in DEPTHS:
        register(f"resnet{depth}", partial(cifar_resnet, depth))
    for arch in ARCHITECTURES:
        register(arch, partial(torchvision_backbone, arch))
    register("timm:", timm_backbone)
