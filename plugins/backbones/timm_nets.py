"""``timm:<name>``: any timm model of a known layout, cut generically into stages.

timm has no common "list of blocks" API, but most CNN families share one of a few
layouts. Each layout below names the modules ``forward_features`` runs, in order:
a stem, the blocks (nested ``nn.Sequential`` opened, one stage per block) and an
optional tail. The head is the model's own ``forward_head``. Because the cut relies on
layout, not on a contract, it is checked once: the staged network must reproduce the
model's output on a random input, or the factory refuses the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from eebench.api import StagedBackbone
from eebench_plugins.backbones._common import check_input_shape, check_num_classes, flatten_blocks

SUPPORTED_FAMILIES = (
    "ResNet-like (conv1/bn1/act1/maxpool + layer1..4: resnet, resnetd, seresnet, resnext), "
    "stem + stages (convnext, nfnet, byobnet, ...), stem + s1..sN (regnet), "
    "conv_stem/bn1 + blocks (efficientnet, mobilenetv3, mixnet, ...)"
)


@dataclass
class Cut:
    """What ``forward_features`` runs, in order, and the attribute names it came from."""

    stem: list[nn.Module]
    blocks: list[nn.Module]
    tail: list[nn.Module] = field(default_factory=list)
    consumed: list[str] = field(default_factory=list)


def _present(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """The names in ``names`` that ``model`` has as child modules, in the given order."""
    children = dict(model.named_children())
    return [n for n in names if n in children]


def _real(modules: list[nn.Module]) -> list[nn.Module]:
    """Drop identity placeholders so no stage is empty (costless stages skew cost curves)."""
    return [m for m in modules if not isinstance(m, nn.Identity)]


def _cut_resnet(model: nn.Module) -> Cut | None:
    stem = _present(model, ("conv1", "bn1", "act1", "maxpool"))
    layers = [n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)]
    if len(stem) < 4 or not layers:
        return None
    blocks = flatten_blocks(getattr(model, n) for n in layers)
    return Cut([getattr(model, n) for n in stem], blocks, consumed=stem + layers)


def _stage_units(stage: nn.Module) -> list[nn.Module]:
    """One unit per block; a ``downsample`` + ``blocks`` stage (ConvNeXt) folds the
    downsample into its first block."""
    downsample, blocks = getattr(stage, "downsample", None), getattr(stage, "blocks", None)
    if isinstance(downsample, nn.Module) and type(blocks) is nn.Sequential and len(blocks) > 0:
        return [nn.Sequential(downsample, blocks[0]), *blocks[1:]]
    return flatten_blocks([stage])


def _cut_stem_stages(model: nn.Module) -> Cut | None:
    if not _present(model, ("stem",)) or type(getattr(model, "stages", None)) is not nn.Sequential:
        return None
    blocks = [unit for stage in model.stages for unit in _stage_units(stage)]
    tail = _present(model, ("final_conv", "final_act", "norm_pre"))
    return Cut([model.stem], blocks, [getattr(model, n) for n in tail], ["stem", "stages", *tail])


def _cut_regnet(model: nn.Module) -> Cut | None:
    groups = [n for n, _ in model.named_children() if re.fullmatch(r"s\d+", n)]
    if not _present(model, ("stem",)) or not groups:
        return None
    # timm's RegStage runs its children in order, so each child is one block.
    blocks = [block for n in groups for block in getattr(model, n).children()]
    tail = _present(model, ("final_conv",))
    return Cut([model.stem], blocks, [getattr(model, n) for n in tail], ["stem", *groups, *tail])


def _cut_conv_stem_blocks(model: nn.Module) -> Cut | None:
    stem = _present(model, ("conv_stem", "bn1", "act1"))
    if stem[:2] != ["conv_stem", "bn1"] or type(getattr(model, "blocks", None)) is not nn.Sequential:
        return None
    blocks = flatten_blocks(model.blocks)
    # MobileNetV3 ends its blocks with a plain 1x1 ConvBnAct (torchvision's last 1x1 conv
    # stage): part of the tail, not an exit, so both libraries place the same exits.
    trailing = [blocks.pop()] if blocks and _is_plain_conv(blocks[-1]) else []
    # EfficientNet runs conv_head + bn2 in forward_features; MobileNetV3 runs conv_head in its head.
    tail = _present(model, ("conv_head", "bn2")) if _present(model, ("bn2",)) else []
    return Cut(
        [getattr(model, n) for n in stem],
        blocks,
        trailing + [getattr(model, n) for n in tail],
        [*stem, "blocks", *tail],
    )


def _is_plain_conv(block: nn.Module) -> bool:
    """timm's conv-norm-act block without a residual connection."""
    return type(block).__name__ == "ConvBnAct" and not getattr(block, "has_skip", False)


CUTTERS: tuple[Callable[[nn.Module], Cut | None], ...] = (
    _cut_resnet,
    _cut_stem_stages,
    _cut_regnet,
    _cut_conv_stem_blocks,
)


class ForwardHead(nn.Module):
    """The timm model's own ``forward_head`` (pooling, optional pre-logits, classifier).

    The feature modules have been swapped for ``nn.Identity`` in the wrapped model, so
    the head owns only head parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x)


def cut_timm(model: nn.Module, name: str) -> Cut:
    """The first layout that fits ``model``, or a ValueError naming the supported ones."""
    if callable(getattr(model, "forward_head", None)):
        for cutter in CUTTERS:
            cut = cutter(model)
            if cut is not None and cut.blocks:
                return cut
    raise ValueError(f"timm model {name}: cannot cut into stages; supported families: {SUPPORTED_FAMILIES}")


def stage_timm(model: nn.Module, name: str, input_shape: tuple[int, int, int], verify: bool = True) -> StagedBackbone:
    """Cut ``model`` into ``[stem, block_1, ..., block_k, (tail)]`` + ``forward_head``.

    The stages share modules with ``model``, whose feature attributes become identities.
    With ``verify`` the staged network must reproduce the model's output (eval mode,
    one random input of ``input_shape``), else a ValueError.
    """
    cut = cut_timm(model, name)
    probe = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    reference = _reference_output(model, probe, name) if verify else None
    for attribute in cut.consumed:
        setattr(model, attribute, nn.Identity())
    stem = cut.stem[0] if len(cut.stem) == 1 else nn.Sequential(*cut.stem)
    tail = _real(cut.tail)
    stages = [stem, *cut.blocks] + ([tail[0] if len(tail) == 1 else nn.Sequential(*tail)] if tail else [])
    staged = StagedBackbone(stages, ForwardHead(model), exit_points=range(1, len(cut.blocks) + 1), name=f"timm:{name}")
    if reference is not None and not torch.allclose(_eval_forward(staged, probe), reference, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"timm model {name}: cannot cut into stages (the staged network does not reproduce "
            f"its output); supported families: {SUPPORTED_FAMILIES}"
        )
    staged.train(was_training)
    return staged


def _reference_output(model: nn.Module, probe: torch.Tensor, name: str) -> torch.Tensor:
    """The unmodified model's output; a model that cannot take this input size says so."""
    try:
        return _eval_forward(model, probe)
    except RuntimeError as exc:
        raise ValueError(f"timm model {name} does not run on input shape {tuple(probe.shape[1:])}: {exc}") from exc


def _eval_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(x)


def timm_backbone(name: str, num_classes: int, input_shape: tuple[int, int, int], **params: object) -> StagedBackbone:
    """Prefix factory for ``timm:<name>``.

    ``pretrained`` (default False) and any other params go to ``timm.create_model``;
    ``verify`` (default True) checks the cut as described in :func:`stage_timm`.
    """
    import timm  # imported here: timm is slow to import and only this factory needs it

    channels, _, _ = check_input_shape(input_shape)
    verify = bool(params.pop("verify", True))
    pretrained = bool(params.pop("pretrained", False))
    model = timm.create_model(
        name, pretrained=pretrained, num_classes=check_num_classes(num_classes), in_chans=channels, **params
    )
    return stage_timm(model, name, (channels, input_shape[1], input_shape[2]), verify=verify)
