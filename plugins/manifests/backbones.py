"""The built-in backbones' manifest: CIFAR ResNets, small-input torchvision networks and ``timm:<name>``
(implementation: ``eebench_plugins.backbones``).

Every factory is ``factory(num_classes, input_shape, **params) -> StagedBackbone``;
``timm:`` is a prefix factory called as ``factory(suffix, num_classes, input_shape, **params)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from eebench import hookimpl
from eebench.lazy import lazy
from eebench.params import Params

DEPTHS = (20, 32, 44, 56, 110)
ARCHITECTURES = ("resnet18", "resnet152", "wide_resnet101_2", "mobilenet_v3_large", "efficientnet_b0")


class CifarResNetParams(Params):
    """``width`` scales the group widths 16/32/64 (each at least 1 channel)."""

    width: float = Field(1.0, gt=0, le=64)


class TorchvisionParams(Params):
    """Passed through as given: ``weights`` (torchvision's name, e.g. ``IMAGENET1K_V1``), ``small_input``
    and the torchvision builder's own keywords (``dropout`` ...)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _not_the_harness_arguments(cls, data: Any) -> Any:
        taken = sorted({"num_classes", "input_shape"} & set(data)) if isinstance(data, Mapping) else []
        if taken:
            raise ValueError(f"{taken[0]} is given by the harness (from the dataset); expected torchvision builder "
                             "arguments such as weights, small_input or dropout")
        return data


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    """CIFAR ResNets by depth, torchvision networks by their torchvision name, ``timm:`` prefix."""
    cifar_resnet = lazy("eebench_plugins.backbones.cifar_resnet:cifar_resnet", params=CifarResNetParams)
    for depth in DEPTHS:
        register(f"resnet{depth}", partial(cifar_resnet, depth))
    torchvision_backbone = lazy("eebench_plugins.backbones.torchvision_nets:torchvision_backbone",
                                params=TorchvisionParams)
    for arch in ARCHITECTURES:
        register(arch, partial(torchvision_backbone, arch))
    register("timm:", lazy("eebench_plugins.backbones.timm_nets:timm_backbone"))
