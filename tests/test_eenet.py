"""EENet on a real (briefly trained) ResNet-20 and real Fashion-MNIST images."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from eebench.costs import StageCosts
from eebench.strategy import MethodContext
from eebench.testing import assert_executor_matches
from eebench.trace import compute_trace, compute_traces
from eebench_plugins.budgets import EpochsBudget, SamplesBudget, SecondsBudget
from eebench_plugins.eenet import DISTRIBUTIONS, EENet, ExitBlock, eenet_loss, eenet_warmup_loss

# Cost fractions (cumulative backbone MACs at each exit, plain backbone = 1) that the five
# distributions give with num_ee = 2 on resnet20 for 1×28×28 inputs (the table in eenet.py's docstring).
DOCUMENTED_FRACTIONS = {
    "fine": [0.122, 0.238],
    "pareto": [0.238, 0.446],
    "golden_ratio": [0.446, 0.678],
    "linear": [0.355, 0.678],
    "quadratic": [0.355, 0.678],
}


def make_context(model, shape=(1, 28, 28), **overrides) -> MethodContext:
    params = {"seed": 0, "batch_size": 100, "train_batch_size": 32}
    params.update(overrides)
    return MethodContext(10, shape, StageCosts.measure(model, shape), torch.device("cpu"), **params)


def test_lv2_loss_equals_a_hand_computed_two_exit_case() -> None:
    p0 = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    p1 = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    h0 = torch.tensor([0.4, 0.9])
    costs = torch.tensor([0.3, 1.0])
    y = torch.tensor([1, 2])
    # final exit: P1 = p1, C1 = 1 -> NLL = mean(-log .6, -log .6), cost 1
    # exit 0: P0 = h p0 + (1-h) p1 -> rows [.34, .44, .22] and [.47, .245, .285]; C0 = [.72, .37]
    expected = (-(math.log(0.6) + math.log(0.6)) / 2 + 0.5 * 1.0
                - (math.log(0.44) + math.log(0.285)) / 2 + 0.5 * (0.72 + 0.37) / 2)
    assert float(eenet_loss([p0, p1], [h0], costs, y, 0.5)) == pytest.approx(expected, rel=1e-6)
    # a zero probability on the target is clamped at 1e-12: finite, -log(1e-12) per term
    zero = torch.tensor([[1.0, 0.0, 0.0]])
    clamped = eenet_loss([zero, zero], [torch.tensor([0.5])], costs, torch.tensor([1]), 0.0)
    assert float(clamped) == pytest.approx(-2 * math.log(1e-12), rel=1e-6)


def test_the_warmup_loss_is_every_exits_cross_entropy() -> None:
    logits = [torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 3.0]])]
    y = torch.tensor([1, 2])
    expected = 0.0
    for z in logits:  # L_v0 = Σ_i NLL(log softmax(z_i), y), each a batch mean
        p = torch.softmax(z, 1)
        expected += -(math.log(p[0, 1]) + math.log(p[1, 2])) / 2
    assert float(eenet_warmup_loss(logits, y)) == pytest.approx(expected, rel=1e-6)


def test_poolbn_standardises_the_pooled_vector_and_takes_a_batch_of_one() -> None:
    torch.manual_seed(0)
    block = ExitBlock((16, 7, 7), 10, "poolbn").train()
    x = 5.0 + torch.randn(64, 16, 7, 7)  # pooled: mean 5, spread ~0.14 across images
    block(x)
    v = block.features(x)
    assert v.mean(0).abs().max() < 1e-3 and (v.std(0, unbiased=False) - 1).abs().max() < 1e-2
    logits, h = block(x[:1])  # a trimmed last batch of one sample: the running statistics
    assert logits.shape == (1, 10) and h.shape == (1,)


@pytest.fixture(scope="module")
def untrained(registry) -> tuple[torch.nn.Module, MethodContext]:
    """A freshly initialised resnet20 and its context (costs measured once)."""
    model = registry.get("backbones", "resnet20")(10, (1, 28, 28)).eval()
    return model, make_context(model)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_every_distribution_places_exits_at_the_documented_cost_fractions(untrained, distribution) -> None:
    model, context = untrained
    costs = context.stage_costs
    strategy = EENet(model, context, distribution=distribution)
    # independent recomputation of the formulas (spec §5.2) and the reference's placement walk
    total, n = sum(costs.stage_macs) + costs.head_macs, 2
    cumulative = [sum(costs.stage_macs[: s + 1]) for s in range(len(costs.stage_macs))]
    thresholds = {
        "pareto": [total * (1 - 0.8**1), total * (1 - 0.8**2)],
        "fine": [total * (1 - 0.95**1), total * (1 - 0.95**2)],
        "linear": [total / 3, 2 * total / 3],
        "golden_ratio": [total / 1.61803398875**2, total / 1.61803398875],
        "quadratic": [cumulative[3], cumulative[6]],  # blocks 3 and 6 of [stem, 9 blocks, head]: 11 // 3 = 3
    }[distribution]
    expected: list[int] = []
    for stage in range(1, 9):  # after a residual block, never after the stem nor the last block
        if len(expected) < n and cumulative[stage] >= thresholds[len(expected)]:
            expected.append(stage)
    assert strategy.exit_stages == expected
    fractions = [cumulative[s] / total for s in expected]
    assert fractions == pytest.approx(DOCUMENTED_FRACTIONS[distribution], abs=1e-3)
    exit_costs = strategy.exit_costs()
    assert exit_costs.backbone_macs.tolist() == [cumulative[s] for s in expected] + [total]
    assert strategy.report().exit_names == [f"ee@block{s}" for s in expected] + ["final"]
    assert strategy.exit_taps() == expected


def test_a_backbone_that_cannot_host_the_exits_raises_a_value_error(untrained) -> None:
    model, context = untrained
    with pytest.raises(ValueError, match="can host only 8 of num_ee=9"):
        EENet(model, context, num_ee=9)
    with pytest.raises(ValueError, match="distribution must be one of"):
        EENet(model, context, distribution="zipf")
    with pytest.raises(ValueError, match="exit_type"):
        EENet(model, context, exit_type="conv")


def test_native_cost_is_the_papers_accounting(untrained) -> None:
    model, context = untrained
    harness, native = EENet(model, context), EENet(model, context, native_cost=True)
    reach = [context.stage_costs.through(s) for s in harness.exit_stages]
    blocks = harness._exit_macs
    total = context.stage_costs.total
    assert harness.exit_costs().cumulative().tolist() == pytest.approx(
        [reach[0] + blocks[0], reach[1] + blocks[0] + blocks[1], total + sum(blocks)])
    assert native.exit_costs().normalised().tolist() == pytest.approx(
        [(reach[0] + blocks[0]) / total, (reach[1] + blocks[1]) / total, 1.0])
    assert "paper's accounting" in native.notes


def test_the_warmup_is_a_share_of_the_budget(untrained) -> None:
    model, context = untrained
    strategy = EENet(model, context)
    assert strategy.warmup_fraction == 0.5 and strategy.exit_type == "poolbn"
    samples = SamplesBudget(600)
    rule = strategy._in_warmup(samples, 60_000)
    assert rule(0) and rule(299) and not rule(300)
    epochs = EpochsBudget(1)
    epochs.bind(60_000)
    rule = strategy._in_warmup(epochs, 60_000)
    assert rule(29_999) and not rule(30_000)
    clock = SecondsBudget(1_000.0)  # no sample plan: the first half of the clock
    assert strategy._in_warmup(clock, 60_000)(10**9)
    reference = EENet(model, context, warmup_fraction=25 / 150)._in_warmup(samples, 60_000)
    assert reference(99) and not reference(100)
    assert not EENet(model, context, warmup_fraction=0.0)._in_warmup(samples, 60_000)(0)  # the paper's one stage
    with pytest.raises(ValueError, match="warmup_fraction"):
        EENet(model, context, warmup_fraction=1.0)


def test_after_fit_the_early_exits_are_real_classifiers(trained_resnet20, small_fmnist) -> None:
    """Issue 13: L_v2 alone from a trained backbone left every early exit at chance (one class for
    every image). With the two-stage schedule and poolbn exits, 2,560 samples (80 batches) over the
    200-image subset make both exits classify the 300 test images well above chance (10 %)."""
    bundle, train, test = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    strategy = EENet(model, make_context(model, bundle.input_shape, augment=bundle.augment))
    budget = SamplesBudget(2560)
    budget.bind(len(train))
    strategy.fit(train, budget)
    assert strategy.fit_info["warmup_samples"] == 1296  # 41 batches of 32 start before sample 1,280
    trace = compute_trace(strategy, test, batch_size=100, device="cpu")
    forced = trace.correct.double().mean(1)  # every sample forced to each exit
    assert forced[0] > 0.2 and forced[1] > 0.25, forced.tolist()  # measured 0.28, 0.39 (single stage: 0.10, 0.12)
    assert trace.preds[0].unique().numel() >= 5 and trace.preds[1].unique().numel() >= 5


@pytest.fixture(scope="module")
def fitted(trained_resnet20, small_fmnist):
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    strategy = EENet(model, make_context(model, bundle.input_shape, augment=bundle.augment), exit_type="bnpool")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exits_before = {k: v.clone() for k, v in strategy.exits.state_dict().items()}
    budget = SamplesBudget(70)  # not a multiple of the batch size (32): the last batch is cut to 6
    budget.bind(len(train))
    strategy.fit(train, budget)
    return strategy, budget, before, exits_before


def test_training_spends_exactly_the_budget_and_moves_the_backbone(fitted) -> None:
    strategy, budget, before, _ = fitted
    assert budget.spend.samples == 70 and budget.spend.batches == 3
    # two stages: batches that start before half the budget (35 samples) warm up with L_v0, the rest L_v2
    assert strategy.fit_info == {"warmup_fraction": 0.5, "warmup_samples": 64, "lv2_samples": 6}
    assert strategy.report().fit_info == strategy.fit_info
    per_sample = strategy.context.stage_costs.total + sum(strategy._exit_macs)
    assert budget.spend.training_macs == pytest.approx(70 * 3 * per_sample)
    after = strategy.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_bnpool_batchnorm_is_registered_and_trained(fitted) -> None:
    strategy, _, _, exits_before = fitted
    after = strategy.exits.state_dict()
    for i in range(strategy.num_ee):
        bn = strategy.exits[i].features[0]
        assert isinstance(bn, torch.nn.BatchNorm2d)
        assert any(p is bn.weight for p in strategy.exits.parameters())  # the optimiser sees it
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = f"{i}.features.0.{name}"
            assert key in after and not torch.equal(after[key], exits_before[key]), key


def test_exit_rule_and_the_papers_operating_point(fitted, small_fmnist) -> None:
    strategy, _, _, _ = fitted
    _, _, test = small_fmnist
    trace = compute_trace(strategy, test, batch_size=100, device="cpu")
    with torch.no_grad():
        _, confidences = strategy.outputs(test.images)
    assert torch.allclose(trace.scores[:-1], torch.stack(confidences).double())
    [point] = strategy.report().operating_points
    assert point.name == "T = 0.5" and point.thresholds.tolist() == [0.5, 0.5]
    first = trace.first_exit(point.thresholds[None])[0]
    h = trace.scores[:-1]
    fired = h > 0.5  # strict, as the paper's inference
    expected = torch.where(fired.any(0), fired.double().argmax(0), torch.full_like(first, strategy.num_ee))
    assert torch.equal(first, expected)


def test_cli_run_shows_eenet_in_the_leaderboard(tmp_path) -> None:
    from eebench.cli import main

    suite = {
        "name": "tiny-eenet",
        "datasets": [{"name": "fashion-mnist", "per_class": 10, "test_subset": 100}],
        "backbones": [{"name": "resnet20", "recipe": {"epochs": 1, "batch_size": 50}}],
        "methods": [{"name": "eenet", "label": "EENet λ=1.5", "params": {"lambda_coef": 1.5}}],
        "budgets": [{"name": "samples", "params": {"samples": 64}}],
        "targets": [0.5],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "boards")])
    assert code == 0
    [cell] = (tmp_path / "run" / "cells").glob("*.json")
    result = json.loads(cell.read_text())
    assert result["calibrator"] == "shared-threshold" and result["spend"]["samples"] == 64
    assert [p["name"] for p in result["operating_points"]] == ["T = 0.5"]
    board = (tmp_path / "boards" / "tiny-eenet.md").read_text()
    assert "| EENet λ=1.5 |" in board and "| EENet λ=1.5 | T = 0.5 |" in board


def test_the_executor_gives_the_traces_exits_and_predictions(fitted, small_fmnist) -> None:
    strategy, _, _, _ = fitted  # bnpool exit blocks: BatchNorm in eval mode, per row
    test = small_fmnist[2]
    assert_executor_matches(strategy, compute_traces(strategy, test, batch_size=100, device="cpu"), test.images)
