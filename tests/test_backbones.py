"""Built-in backbones: staged == unstaged, exit points, parameter and MAC counts, tiny inputs."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import timm
import torch
from torch import nn
from torchvision import models

import eebench_plugins.manifests.backbones as backbones
from eebench.api import StageCosts, StagedBackbone
from eebench_plugins.backbones.cifar_resnet import CifarResNet
from eebench_plugins.backbones.timm_nets import stage_timm
from eebench_plugins.backbones.torchvision_nets import build_torchvision

SHAPES = [(1, 28, 28), (3, 32, 32)]
NUM_CLASSES = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convs gain nothing from threads, and on a busy 2-core box OpenMP's barriers
    make them ~100x slower; restore the setting for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def factories() -> dict[str, Callable]:
    table: dict[str, Callable] = {}
    backbones.register_backbones(register=table.__setitem__)
    return table


def batch(shape: tuple[int, int, int], size: int = 2) -> torch.Tensor:
    return torch.randn(size, *shape, generator=torch.Generator().manual_seed(1))


def run_by_hand(backbone: StagedBackbone, x: torch.Tensor) -> torch.Tensor:
    for stage in backbone.stages:
        x = stage(x)
    return backbone.head(x)


def assert_staged_matches(backbone: StagedBackbone, reference: nn.Module, shape: tuple[int, int, int]) -> None:
    """Forward == stages then head == the unstaged network, bit for bit (eval mode)."""
    backbone.eval()
    reference.eval()
    x = batch(shape)
    with torch.no_grad():
        out = backbone(x)
        assert out.shape == (2, NUM_CLASSES)
        assert torch.isfinite(out).all()
        assert not torch.equal(out[0], out[1])  # a degenerate (constant) network would pass the rest
        assert torch.equal(out, run_by_hand(backbone, x))
        assert torch.equal(out, reference(x))


def assert_costs_positive(backbone: StagedBackbone, shape: tuple[int, int, int]) -> StageCosts:
    costs = StageCosts.measure(backbone, shape)
    assert len(costs.stage_macs) == len(backbone.stages)
    assert all(macs > 0 for macs in costs.stage_macs), costs.stage_macs
    assert costs.head_macs > 0
    return costs


def test_hook_registers_every_backbone(factories: dict[str, Callable]) -> None:
    assert set(factories) == {
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet18",
        "resnet152",
        "wide_resnet101_2",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "timm:",
    }


def test_registry_resolves_names_through_the_entry_point() -> None:
    from eebench.plugins import load_registry

    registry = load_registry()
    assert registry.owners["backbones"]["resnet20"] == "eebench"
    backbone = registry.get("backbones", "timm:test_resnet")(NUM_CLASSES, (1, 28, 28))
    assert isinstance(backbone, StagedBackbone)
    assert backbone.backbone_name == "timm:test_resnet"


# --- CIFAR ResNet 6n+2 -------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_resnet20_staged_equals_plain_network(factories: dict[str, Callable], shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    backbone = factories["resnet20"](NUM_CLASSES, shape)
    torch.manual_seed(0)
    plain = CifarResNet(20, NUM_CLASSES, in_channels=shape[0])
    assert_staged_matches(backbone, plain, shape)
    assert backbone.stages[0][0].in_channels == shape[0]
    assert backbone.exit_points == list(range(1, 10))


@pytest.mark.parametrize(("depth", "exits"), [(20, 9), (32, 15), (44, 21), (56, 27), (110, 54)])
def test_cifar_resnet_exit_points(factories: dict[str, Callable], depth: int, exits: int) -> None:
    backbone = factories[f"resnet{depth}"](NUM_CLASSES, (1, 28, 28))
    assert backbone.exit_points == list(range(1, exits + 1))
    assert len(backbone.stages) == exits + 1
    with torch.no_grad():
        assert backbone.eval()(batch((1, 28, 28), 1)).shape == (1, NUM_CLASSES)


def test_resnet20_parameter_count(factories: dict[str, Callable]) -> None:
    # Option A (zero-padded identity) has 269,722; the two 1x1 conv + BN projections of
    # option B add 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
    backbone = factories["resnet20"](NUM_CLASSES, (3, 32, 32))
    assert sum(p.numel() for p in backbone.parameters()) == 269_722 + 2_752


def conv_linear_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every conv and linear layer, counted by hand, not by fvcore."""
    total = 0

    def count(layer: nn.Module, _: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            total += out[0].numel() * per_output
        else:
            total += out[0].numel() * layer.in_features

    handles = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module.eval()(x)
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize(
    ("shape", "conv_macs", "low", "high"),
    [
        # 40.55M conv+linear MACs for option A, plus 0.26M for the two projections. fvcore
        # adds 2 per BN element (0.40M) and the pooling (4k): 41.22M in all.
        ((3, 32, 32), 40_813_184, 41.15e6, 41.30e6),
        ((1, 28, 28), 31_021_952, 31.25e6, 31.40e6),
    ],
    ids=["3x32x32", "1x28x28"],
)
def test_resnet20_macs(
    factories: dict[str, Callable], shape: tuple[int, int, int], conv_macs: int, low: float, high: float
) -> None:
    backbone = factories["resnet20"](NUM_CLASSES, shape)
    assert conv_linear_macs(backbone, batch(shape, 1)) == conv_macs
    costs = assert_costs_positive(backbone, shape)
    assert low <= costs.total <= high
    side = {32: 8, 28: 7}[shape[1]]  # two stride-2 groups
    assert costs.stage_shapes[-1] == (64, side, side)


def test_cifar_resnet_options_and_errors(factories: dict[str, Callable]) -> None:
    wide = factories["resnet20"](NUM_CLASSES, (3, 32, 32), width=2)
    assert wide.stages[0][0].out_channels == 32 and wide.head[-1].in_features == 128
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21, NUM_CLASSES)
    with pytest.raises(ValueError, match="input_shape"):
        factories["resnet20"](NUM_CLASSES, (32, 32))


# --- torchvision ---------------------------------------------------------------------------

LIGHT_TORCHVISION = {"resnet18": 8, "mobilenet_v3_large": 15, "efficientnet_b0": 16}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("arch", sorted(LIGHT_TORCHVISION))
def test_torchvision_staged_equals_adapted_torchvision(
    factories: dict[str, Callable], arch: str, shape: tuple[int, int, int]
) -> None:
    torch.manual_seed(0)
    backbone = factories[arch](NUM_CLASSES, shape)
    torch.manual_seed(0)
    adapted = build_torchvision(arch, NUM_CLASSES, shape)  # the torchvision module itself
    assert_staged_matches(backbone, adapted, shape)
    exits = LIGHT_TORCHVISION[arch]
    assert backbone.exit_points == list(range(1, exits + 1))
    assert len(backbone.stages) == exits + (1 if arch.startswith("resnet") else 2)  # + stem (+ 1x1 conv)
    if shape[0] == 1:
        assert_costs_positive(backbone, shape)


@pytest.mark.parametrize(("arch", "exits"), [("resnet152", 50), ("wide_resnet101_2", 33)])
def test_heavy_torchvision_builds_and_runs(factories: dict[str, Callable], arch: str, exits: int) -> None:
    backbone = factories[arch](NUM_CLASSES, (1, 28, 28))
    assert backbone.exit_points == list(range(1, exits + 1))
    with torch.inference_mode():
        out = backbone.eval()(batch((1, 28, 28), 1))
    assert out.shape == (1, NUM_CLASSES) and torch.isfinite(out).all()


def test_small_input_adaptation() -> None:
    small = build_torchvision("resnet18", NUM_CLASSES, (1, 28, 28))
    assert (small.conv1.in_channels, small.conv1.kernel_size, small.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(small.maxpool, nn.Identity)
    large = build_torchvision("resnet18", NUM_CLASSES, (1, 96, 96))
    assert (large.conv1.in_channels, large.conv1.kernel_size, large.conv1.stride) == (1, (7, 7), (2, 2))
    assert isinstance(large.maxpool, nn.MaxPool2d)
    forced = build_torchvision("resnet18", NUM_CLASSES, (3, 96, 96), small_input=True)
    assert forced.conv1.stride == (1, 1)
    for arch in ("mobilenet_v3_large", "efficientnet_b0"):
        assert build_torchvision(arch, NUM_CLASSES, (1, 32, 32)).features[0][0].stride == (1, 1)
        assert build_torchvision(arch, NUM_CLASSES, (1, 96, 96)).features[0][0].stride == (2, 2)


def test_weights_go_through_torchvision_loader(factories: dict[str, Callable], monkeypatch: pytest.MonkeyPatch) -> None:
    """``weights`` uses torchvision's real loading code; only the download is faked."""
    torch.manual_seed(0)
    imagenet = models.resnet18().state_dict()
    urls: list[str] = []

    def fake_download(url: str, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        urls.append(url)
        return imagenet

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", fake_download)
    backbone = factories["resnet18"](NUM_CLASSES, (1, 96, 96), weights="IMAGENET1K_V1")
    assert urls == [models.ResNet18_Weights.IMAGENET1K_V1.url]
    stem_conv, first_block = backbone.stages[0][0], backbone.stages[1]
    assert torch.equal(stem_conv.weight, imagenet["conv1.weight"].sum(1, keepdim=True))  # grey = R + G + B
    assert torch.equal(first_block.conv1.weight, imagenet["layer1.0.conv1.weight"])
    assert backbone.head[-1].out_features == NUM_CLASSES


# --- timm ----------------------------------------------------------------------------------

# Blocks per timm config; MobileNetV3's closing 1x1 ConvBnAct is the tail, not an exit.
TIMM_CASES = [
    ("test_resnet", (1, 28, 28), 4),
    ("test_resnet", (3, 32, 32), 4),
    ("mobilenetv3_small_050", (1, 28, 28), 11),
    ("mobilenetv3_small_050", (3, 32, 32), 11),
    ("test_efficientnet", (1, 28, 28), 5),
    ("test_convnext", (3, 32, 32), 9),
    ("test_nfnet", (1, 28, 28), 4),
]


@pytest.mark.parametrize(("name", "shape", "exits"), TIMM_CASES)
def test_timm_staged_equals_timm_model(name: str, shape: tuple[int, int, int], exits: int) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, in_chans=shape[0])
    reference = copy.deepcopy(model)
    backbone = stage_timm(model, name, shape)
    assert_staged_matches(backbone, reference, shape)
    assert backbone.exit_points == list(range(1, exits + 1))
    # every parameter lands in exactly one place, and the head owns only the head
    assert sum(p.numel() for p in backbone.parameters()) == sum(p.numel() for p in reference.parameters())
    if name == "test_resnet":
        assert sum(p.numel() for p in backbone.head.parameters()) == sum(p.numel() for p in reference.fc.parameters())
        assert_costs_positive(backbone, shape)


def test_timm_factory_passes_options(factories: dict[str, Callable]) -> None:
    backbone = factories["timm:"]("test_efficientnet", NUM_CLASSES, (1, 28, 28), drop_rate=0.5)
    assert backbone.backbone_name == "timm:test_efficientnet"
    assert backbone.head.model.drop_rate == 0.5
    assert backbone.stages[0][0].in_channels == 1


def test_timm_refuses_what_it_cannot_cut(factories: dict[str, Callable]) -> None:
    with pytest.raises(ValueError, match="timm model test_vit: cannot cut into stages; supported families"):
        factories["timm:"]("test_vit", NUM_CLASSES, (3, 32, 32))
    with pytest.raises(ValueError, match="does not run on input shape"):
        factories["timm:"]("test_convnext", NUM_CLASSES, (1, 28, 28))  # 28 is not a multiple of 32
