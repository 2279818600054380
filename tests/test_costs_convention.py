"""One cost unit (issue 12): every exit overhead = fvcore's count of the exit's modules + the
core's table of MAC-equivalents, cross-checked here against an independent computation.

The independent side never calls the code under test for the number it checks: exit modules
are counted with a bare fvcore ``FlopCountAnalysis`` (no eebench handles) and the work fvcore
does not see is added from the table's functions, with pooling windows counted from the
shapes (``F.unfold``), so a hand formula in a plugin can no longer drift from the counter.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eebench.api import (
    MAC_EQUIVALENTS,
    adaptive_pool_macs,
    count_macs,
    elementwise_macs,
    entropy_macs,
    multiply_add_macs,
    pool_macs,
    softmax_macs,
    sort_macs,
    squared_distance_macs,
)
from eebench.costs import StageCosts
from eebench.strategy import MethodContext

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 28, 28)  # Fashion-MNIST
K = 10


def fvcore_macs(module: nn.Module, *inputs: torch.Tensor) -> float:
    """fvcore's own count, without eebench's pooling handles: the independent counter."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

    module.eval()
    with torch.no_grad():
        analysis = FlopCountAnalysis(module, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return float(analysis.total())


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def window_reads(shape: tuple[int, ...], kernel: int, stride: int | None = None, padding: int = 0) -> int:
    """Values read by every window of a kernel pool over a [C, H, W] map, from torch's own unfold."""
    patches = F.unfold(torch.zeros(1, *shape), kernel, padding=padding, stride=stride or kernel)
    return patches.numel()


# ------------------------------------------------------------------ what fvcore counts


X = torch.zeros(1, 16, 28, 28)


@pytest.mark.parametrize(("name", "module", "expected"), [
    ("adaptive_avg_pool2d(1)", nn.AdaptiveAvgPool2d(1), X.numel()),
    ("adaptive_avg_pool2d(4)", nn.AdaptiveAvgPool2d(4), X.numel()),
    ("adaptive_max_pool2d(4)", nn.AdaptiveMaxPool2d(4), 0),
    ("max_pool2d", nn.MaxPool2d(2), 0),
    ("F.max_pool2d", Fn(lambda x: F.max_pool2d(x, 7)), 0),
    ("avg_pool2d", nn.AvgPool2d(2), 0),
    ("F.avg_pool2d", Fn(lambda x: F.avg_pool2d(x, 7)), 0),
    ("mean", Fn(lambda x: x.mean((2, 3))), 0),
    ("flatten", nn.Flatten(1), 0),
    ("relu", nn.ReLU(), 0),
    ("sigmoid", nn.Sigmoid(), 0),
    ("softmax", Fn(lambda x: torch.softmax(x, 1)), 0),
    ("batch_norm (eval)", nn.BatchNorm2d(16), 2 * X.numel()),
    ("batch_norm, no affine", nn.BatchNorm2d(16, affine=False), X.numel()),
])
def test_what_fvcore_counts(name: str, module: nn.Module, expected: int) -> None:
    """The facts the convention rests on (eebench/costs.py's docstring states them)."""
    assert fvcore_macs(module, X) == expected, name


def test_linear_is_in_times_out_and_its_bias_is_free() -> None:
    assert fvcore_macs(nn.Linear(64, 10), torch.zeros(1, 64)) == 640
    assert fvcore_macs(nn.Linear(64, 10, bias=False), torch.zeros(1, 64)) == 640


# ------------------------------------------------------------------ pooling: one price, never twice


@pytest.mark.parametrize(("shape", "side"), [((16, 28, 28), 1), ((16, 28, 28), 4), ((64, 8, 8), 2), ((32, 14, 14), 7)])
def test_fvcore_adaptive_avg_pool_and_the_table_agree(shape: tuple[int, ...], side: int) -> None:
    """fvcore prices adaptive average pooling at one per input value, which is the table's price
    for every adaptive pool and, when the windows tile the map, every value each window reads
    (the price of a kernel pool)."""
    x = torch.zeros(1, *shape)
    fvcore = fvcore_macs(nn.AdaptiveAvgPool2d(side), x)
    assert fvcore == adaptive_pool_macs(shape) == math.prod(shape)
    window = shape[1] // side
    assert fvcore == pool_macs(shape[0] * side * side, window * window) == window_reads(shape, window)
    # count_macs keeps fvcore's number (nothing added twice) and prices adaptive max pooling the same
    assert count_macs(nn.AdaptiveAvgPool2d(side), x) == fvcore
    assert count_macs(nn.AdaptiveMaxPool2d(side), x) == fvcore


@pytest.mark.parametrize(("shape", "kernel", "stride", "padding"), [
    ((16, 28, 28), 2, None, 0), ((32, 14, 14), 3, None, 0), ((64, 7, 7), 1, None, 0), ((16, 28, 28), 3, 2, 1),
])
def test_count_macs_prices_the_pools_fvcore_skips_from_the_table(shape, kernel, stride, padding) -> None:
    x = torch.zeros(1, *shape)
    reads = window_reads(shape, kernel, stride, padding)
    out = F.max_pool2d(x, kernel, stride, padding)
    assert pool_macs(out.numel(), kernel * kernel) == reads
    for module in (nn.MaxPool2d(kernel, stride, padding), nn.AvgPool2d(kernel, stride, padding),
                   Fn(lambda t: F.max_pool2d(t, kernel, stride, padding))):
        assert fvcore_macs(module, x) == 0
        assert count_macs(module, x) == reads


def test_count_macs_adds_only_pooling_to_fvcore() -> None:
    """A module mixing counted and skipped ops: count_macs = fvcore + the table's max-pool."""
    net = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(32, K))
    x = torch.zeros(1, 16, 28, 28)
    assert count_macs(net, x) == fvcore_macs(net, x) + window_reads((8, 28, 28), 2)
    global_mean = Fn(lambda t: t.mean((2, 3)))  # global average pooling by another name
    assert count_macs(global_mean, x) == count_macs(nn.AdaptiveAvgPool2d(1), x) == x.numel()


def test_resnet20_backbone_count_is_fvcores(registry) -> None:
    """ResNet-20 pools only adaptively (its head): the backbone's count does not move."""
    model = registry.get("backbones", "resnet20")(K, SHAPE).eval()
    costs = StageCosts.measure(model, SHAPE)
    x = torch.zeros(1, *SHAPE)
    raw = []
    for stage in model.stages:
        raw.append(fvcore_macs(stage, x))
        x = stage(x)
    assert list(costs.stage_macs) == raw
    assert costs.head_macs == fvcore_macs(model.head, x)


# ------------------------------------------------------------------ the table


def test_the_table_prices_every_elementary_op_at_one() -> None:
    assert MAC_EQUIVALENTS == {"multiply-add": 1.0, "elementwise": 1.0, "reduction": 1.0, "comparison": 1.0}


@pytest.mark.parametrize(("dim", "means"), [(1, 1), (10, 10), (256, 10), (12544, 100)])
def test_squared_distance_is_dk_plus_k(dim: int, means: int) -> None:
    assert squared_distance_macs(dim, means) == dim * means + means
    # the expansion's dot products are a Linear(D, K) with −2μ as weights (fvcore: D·K) whose bias,
    # the stored ‖μ‖², is one add per mean: the table's D·K + K
    linear = nn.Linear(dim, means)
    assert fvcore_macs(linear, torch.zeros(1, dim)) + elementwise_macs(means) == squared_distance_macs(dim, means)
    # ... and it is the squared distance, up to ‖x‖² (common to every mean)
    x, mu = torch.randn(1, dim, dtype=torch.float64), torch.randn(means, dim, dtype=torch.float64)
    expanded = x @ (-2 * mu).T + (mu * mu).sum(1)
    assert torch.allclose(expanded + (x * x).sum(), torch.cdist(x, mu) ** 2)


@pytest.mark.parametrize("k", [2, 10, 100])
def test_softmax_entropy_and_sort(k: int) -> None:
    assert softmax_macs(k) == 3 * k  # exp, sum, divide
    assert entropy_macs(k) == 2 * k  # log, multiply-add
    assert sort_macs(k) == k * math.ceil(math.log2(k))
    assert multiply_add_macs(k) == elementwise_macs(k) == k


def test_sort_of_one_value_is_free() -> None:
    assert sort_macs(1) == 0 and sort_macs(0) == 0


# ------------------------------------------------------------------ every built-in method


def distances(shape: tuple[int, ...], k: int, pool_side: int | None) -> float:
    """E²CM's exit work, from the table: the max-pool, the squared distances, ‖x‖², sqrt and eq. 4's ÷."""
    pooled = (shape[0], pool_side, pool_side) if pool_side else shape
    dim = math.prod(pooled)
    pooling = 0.0
    if pool_side:
        pooling = adaptive_pool_macs(shape)
        assert fvcore_macs(nn.AdaptiveMaxPool2d(pool_side), torch.zeros(1, *shape)) == 0  # never counted twice
    return (pooling + squared_distance_macs(dim, k) + multiply_add_macs(dim) + elementwise_macs(k)
            + elementwise_macs(2 * k))


def internal_classifier(ic: nn.Module, shape: tuple[int, ...], k: int, extra: int = 0) -> float:
    """SDN's IC: fvcore on the module (it sees the Linear only) + its max- and avg-pool windows."""
    x = torch.zeros(1, *shape)
    counted = fvcore_macs(ic, x, torch.zeros(1, extra)) if extra else fvcore_macs(ic, x)
    side = min(shape[1:])
    r = side // 4 if side >= 4 else None
    assert counted == ((shape[0] * (side // r) ** 2 if r else math.prod(shape)) + extra) * k  # the Linear only
    return counted + (2 * window_reads(shape, r) if r else 0.0)


def policy(k: int) -> float:
    """BWDS's decision function: sorted softmax, entropy / ln K, then one λ's Linear(K+2, 1)."""
    linear = fvcore_macs(nn.Linear(k + 2, 1), torch.zeros(1, k + 2))
    return sort_macs(k) + softmax_macs(k) + entropy_macs(k) + elementwise_macs(1) + linear


def branch(module: nn.Module, shape: tuple[int, ...], k: int, count_softmax: bool) -> float:
    halve = min(shape[1:]) >= 8
    pool = window_reads(shape, 2) if halve else 0.0
    extra = softmax_macs(k) + entropy_macs(k) if count_softmax else 0.0
    return fvcore_macs(module, torch.zeros(1, *shape)) + pool + extra


def expected_e2cm(strategy, shapes, params):
    pool_to = params.get("pool_to")
    extra = softmax_macs(K) if params.get("count_softmax") else 0.0
    out = []
    for s in strategy.exit_stages:
        side = pool_to if pool_to is not None and shapes[s][1] > pool_to else None
        out.append(distances(shapes[s], K, side) + extra)
    return [*out, 0.0]


def expected_sdn(strategy, shapes, params):
    extra = softmax_macs(K) if params.get("count_softmax") else 0.0
    return [internal_classifier(ic, shapes[s], K) + extra for s, ic in zip(strategy.bank.stages, strategy.bank.ics,
                                                                          strict=True)] + [0.0]


def expected_e2cm_sdn(strategy, shapes, params):
    extra = 2 * softmax_macs(K) if params.get("count_softmax") else 0.0  # the IC's and E²CM's
    return [internal_classifier(ic, shapes[s], K, extra=K) + distances(shapes[s], K, None) + extra
            for s, ic in zip(strategy.bank.stages, strategy.bank.ics, strict=True)] + [0.0]


def expected_bwds(strategy, shapes, params):
    return [internal_classifier(ic, shapes[s], K) + policy(K)
            for s, ic in zip(strategy.bank.stages, strategy.bank.ics, strict=True)] + [0.0]


def expected_branchynet(strategy, shapes, params):
    return [branch(b, shapes[s], K, bool(params.get("count_softmax")))
            for s, b in zip(strategy.branch_stages, strategy.branches, strict=True)] + [0.0]


def expected_modules(attribute: str, stages: str):
    """Exits that are modules only (their decision, a sigmoid or a counter, is uncounted)."""
    def expected(strategy, shapes, params):
        modules, at = getattr(strategy, attribute), getattr(strategy, stages)
        return [fvcore_macs(m, torch.zeros(1, *shapes[s])) for s, m in zip(at, modules, strict=True)] + [0.0]
    return expected


def patience_factory():
    path = ROOT / "examples" / "eebench-patience" / "eebench_patience" / "strategy.py"
    spec = importlib.util.spec_from_file_location("eebench_patience_costs_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PatienceExit


METHODS = [
    ("e2cm", {}, expected_e2cm),
    ("e2cm", {"pool_to": 4, "count_softmax": True}, expected_e2cm),
    ("sdn", {}, expected_sdn),
    ("sdn", {"count_softmax": True}, expected_sdn),
    ("e2cm+sdn", {}, expected_e2cm_sdn),
    ("e2cm+sdn", {"pool_to": 4, "count_softmax": True}, None),  # pooled E²CM side: checked below
    ("bwds", {}, expected_bwds),
    ("branchynet", {}, expected_branchynet),
    ("branchynet", {"count_softmax": True}, expected_branchynet),
    ("eenet", {}, expected_modules("exits", "exit_stages")),
    ("eenet", {"exit_type": "bnpool", "num_ee": 3}, expected_modules("exits", "exit_stages")),
    ("class-exclusion", {}, expected_modules("heads", "exit_stages")),
    ("patience", {}, expected_modules("classifiers", "exit_stages")),
]


@pytest.fixture(scope="module")
def resnet_costs(registry) -> StageCosts:
    return StageCosts.measure(registry.get("backbones", "resnet20")(K, SHAPE).eval(), SHAPE)


@pytest.mark.parametrize(("name", "params", "expected"), METHODS,
                         ids=[f"{n}{'-' + '-'.join(map(str, p.values())) if p else ''}" for n, p, _ in METHODS])
def test_exit_overheads_are_module_counts_plus_table_terms(registry, resnet_costs, name, params, expected) -> None:
    torch.manual_seed(0)
    model = registry.get("backbones", "resnet20")(K, SHAPE).eval()
    context = MethodContext(K, SHAPE, resnet_costs, torch.device("cpu"), seed=0)
    factory = patience_factory() if name == "patience" else registry.get("exit_strategies", name)
    strategy = factory(model, context, **params)
    shapes = resnet_costs.stage_shapes
    overhead = strategy.exit_costs().overhead_macs.tolist()
    if expected is None:  # E²CM+SDN with pooled class means
        ic = [internal_classifier(ic, shapes[s], K, extra=K) for s, ic in zip(strategy.bank.stages, strategy.bank.ics,
                                                                             strict=True)]
        want = [c + distances(shapes[s], K, 4 if shapes[s][1] > 4 else None) + 2 * softmax_macs(K)
                for c, s in zip(ic, strategy.bank.stages, strict=True)] + [0.0]
    else:
        want = expected(strategy, shapes, params)
    assert overhead == pytest.approx(want, rel=0, abs=1e-6)
    assert all(o > 0 for o in overhead[:-1])


@pytest.mark.parametrize("count_softmax", [False, True])
def test_dec_e2cm_overheads_are_module_counts_plus_table_terms(registry, count_softmax: bool) -> None:
    model = registry.get("backbones", "dec")(K, SHAPE)
    costs = StageCosts.measure(model, SHAPE)
    strategy = registry.get("exit_strategies", "dec-e2cm")(model, MethodContext(K, SHAPE, costs, torch.device("cpu"),
                                                                              seed=0), count_softmax=count_softmax)
    k, dim = strategy.num_clusters, strategy.dim
    extra = softmax_macs(k) if count_softmax else 0.0
    heads = [fvcore_macs(h, torch.zeros(1, h.in_features)) for h in strategy.heads]
    want = [h + distances((dim,), k, None) + extra for h in heads] + [distances((dim,), k, None) + extra]
    got = strategy.exit_costs()
    assert got.overhead_macs.tolist() == pytest.approx(want, rel=0, abs=1e-6)
    assert got.reference_macs == pytest.approx(costs.through(len(model.stages) - 1) + want[-1])
