"""BranchyNet on a real (briefly trained) ResNet-20 and real Fashion-MNIST images."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from eebench.costs import StageCosts
from eebench.strategy import MethodContext
from eebench.testing import assert_executor_matches
from eebench.trace import compute_trace, compute_traces, exit_fires
from eebench_plugins.branchynet import BranchyNet, entropy, entropy_thresholds, resolve_weights
from eebench_plugins.budgets import SamplesBudget
from eebench_plugins.calibrators import PerExitBisection


def make_context(model, shape=(1, 28, 28), **overrides) -> MethodContext:
    params = {"seed": 0, "batch_size": 100, "train_batch_size": 32}
    params.update(overrides)
    return MethodContext(10, shape, StageCosts.measure(model, shape), torch.device("cpu"), **params)


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])
def test_branches_sit_after_the_stem_and_nearest_a_third_of_the_cost(registry, name) -> None:
    model = registry.get("backbones", name)(10, (1, 28, 28)).eval()
    context = make_context(model)
    costs = context.stage_costs
    strategy = BranchyNet(model, context)
    total = sum(costs.stage_macs) + costs.head_macs
    fraction = {s: sum(costs.stage_macs[: s + 1]) / total for s in range(1, len(model.stages) - 1)}
    nearest = min(fraction, key=lambda s: abs(fraction[s] - 1 / 3))
    assert strategy.branch_stages == [0, nearest]
    assert all(abs(fraction[nearest] - 1 / 3) <= abs(f - 1 / 3) for f in fraction.values())
    exit_costs = strategy.exit_costs()
    assert exit_costs.backbone_macs.tolist() == [costs.stage_macs[0], total * fraction[nearest], total]
    assert exit_costs.overhead_macs[-1] == 0 and bool((exit_costs.overhead_macs[:2] > 0).all())
    assert strategy.report().exit_names == ["branch@stem", f"branch@block{nearest}", "final"]
    assert strategy.exit_taps() == [0, nearest] and strategy.num_exits() == 3


def test_weight_presets_and_bad_weights() -> None:
    assert resolve_weights("e2cm") == (1 / 6, 1 / 4, 1.0)
    assert resolve_weights("equal") == (1.0, 1.0, 1.0)
    assert resolve_weights("paper") == (1.0, 1.0, 0.3)
    assert resolve_weights([0.5, 0.2, 1]) == (0.5, 0.2, 1.0)
    for bad in ("heavy", [1, 1], [1, -1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="weights"):
            resolve_weights(bad)


def test_entropy_is_natural_log_and_within_zero_and_log_k() -> None:
    logits = torch.tensor([[0.0] * 10, [100.0] + [0.0] * 9, [2.0, 1.0] + [0.0] * 8])
    h = entropy(logits)
    assert float(h[0]) == pytest.approx(math.log(10))
    assert 0 <= float(h[1]) < 1e-30
    p = torch.softmax(logits[2].double(), 0)
    assert float(h[2]) == pytest.approx(float(-(p * p.log()).sum()))


@pytest.fixture(scope="module")
def fitted(trained_resnet20, small_fmnist):
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    strategy = BranchyNet(model, make_context(model, bundle.input_shape, augment=bundle.augment))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = SamplesBudget(70)  # not a multiple of the batch size (32): the last batch is cut to 6
    budget.bind(len(train))
    strategy.fit(train, budget)
    return strategy, budget, before


def test_training_spends_exactly_the_budget_and_moves_the_backbone(fitted) -> None:
    strategy, budget, before = fitted
    assert budget.spend.samples == 70 and budget.spend.batches == 3
    per_sample = strategy.context.stage_costs.total + sum(strategy.branch_macs())
    assert budget.spend.training_macs == pytest.approx(70 * 3 * per_sample)
    after = strategy.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_loss_is_the_weighted_sum_of_exit_cross_entropies(fitted, small_fmnist) -> None:
    strategy, _, _ = fitted
    _, train, _ = small_fmnist
    x, y = train.images[:16], train.labels[:16]
    with torch.no_grad():
        logits = strategy.logits(x)
        expected = F.cross_entropy(logits[0], y) / 6 + F.cross_entropy(logits[1], y) / 4 + F.cross_entropy(logits[2], y)
        assert float(strategy.loss(logits, y)) == pytest.approx(float(expected), rel=1e-6)


def test_entropy_thresholds_stay_in_range_and_give_the_same_exits(fitted, small_fmnist) -> None:
    strategy, _, _ = fitted
    _, train, test = small_fmnist
    calibration = compute_trace(strategy, train, batch_size=100, device="cpu")
    on_test = compute_trace(strategy, test, batch_size=100, device="cpu")
    log_k = math.log(10)
    assert bool((-calibration.scores >= 0).all()) and bool((-calibration.scores <= log_k + 1e-12).all())
    scores = PerExitBisection(targets=50).thresholds(calibration, strategy.exit_costs(), torch.Generator())
    assert torch.isinf(scores).any() and torch.isfinite(scores).any()  # both switched-off and live exits
    limits = entropy_thresholds(scores, 10)
    assert bool((limits >= 0).all()) and bool((limits <= log_k).all())
    entropies = -on_test.scores[:-1]  # [2, N]
    for score_row, entropy_row in zip(scores, limits, strict=True):
        by_entropy = entropies < entropy_row[:, None]  # BranchyNet's rule: H < T (strict)
        by_score = exit_fires(on_test.scores[:-1], score_row[:, None], strict=True)
        assert torch.equal(by_entropy, by_score)
    assert entropy_thresholds(torch.tensor([float("inf"), -5.0]), 10).tolist() == [0.0, log_k]


def test_from_scratch_starts_from_the_backbone_plugins_initialisation(registry, trained_resnet20, small_fmnist) -> None:
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    torch.manual_seed(123)
    fresh = registry.get("backbones", "resnet20")(10, bundle.input_shape)
    context = make_context(model, bundle.input_shape, fresh_backbone=lambda: copy.deepcopy(fresh))
    strategy = BranchyNet(model, context, from_scratch=True, lr=1e-9)
    budget = SamplesBudget(8)
    budget.bind(len(train))
    strategy.fit(train, budget)
    conv = "stages.1.conv1.weight"
    assert torch.allclose(model.state_dict()[conv], fresh.state_dict()[conv], atol=1e-6)
    assert not torch.allclose(model.state_dict()[conv], trained_resnet20.state_dict()[conv], atol=1e-3)
    with pytest.raises(ValueError, match="fresh backbone"):
        BranchyNet(model, make_context(model, bundle.input_shape), from_scratch=True).fit(train, SamplesBudget(8))


@pytest.mark.parametrize(("schedule", "expected"), [("cosine", [1.0, 0.5]), ("constant", [1.0, 1.0])])
def test_lr_schedule_over_the_planned_samples(trained_resnet20, small_fmnist, monkeypatch, schedule, expected) -> None:
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    seen: list[float] = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    strategy = BranchyNet(model, make_context(model, bundle.input_shape), lr=0.01, schedule=schedule)
    strategy.fit(train, SamplesBudget(64))  # two batches of 32: the second starts half-way through the plan
    assert seen == pytest.approx([0.01 * e for e in expected])
    with pytest.raises(ValueError, match="schedule"):
        BranchyNet(model, make_context(model, bundle.input_shape), schedule="step")


def test_cli_run_shows_branchynet_in_the_leaderboard(tmp_path) -> None:
    from eebench.cli import main

    suite = {
        "name": "tiny-branchynet",
        "datasets": [{"name": "fashion-mnist", "per_class": 10, "test_subset": 100}],
        "backbones": [{"name": "resnet20", "recipe": {"epochs": 1, "batch_size": 50}}],
        "methods": [{"name": "branchynet", "label": "BranchyNet", "params": {"weights": "paper"}}],
        "budgets": [{"name": "samples", "params": {"samples": 64}}],
        "targets": [0.5],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "boards")])
    assert code == 0
    [cell] = (tmp_path / "run" / "cells").glob("*.json")
    result = json.loads(cell.read_text())
    assert result["calibrator"] == "per-exit-bisection" and result["spend"]["samples"] == 64
    assert result["exits"]["names"] == ["branch@stem", "branch@block3", "final"]
    assert "[1, 1, 0.3] (paper)" in result["notes"]
    native = result["curve"]["native_thresholds"]  # the hull in the paper's units: entropy T ∈ [0, ln K]
    assert len(native["values"]) == len(result["curve"]["thresholds"])
    for scores, entropies in zip(result["curve"]["thresholds"], native["values"], strict=True):
        for score, limit in zip(scores, entropies, strict=True):
            assert 0.0 <= limit <= math.log(10) + 1e-12
            if score is not None and score != "-inf" and -math.log(10) <= score <= 0:
                assert limit == pytest.approx(-score)  # H < T ⇔ −H > −T
            if score is None:  # switched off: T = 0, since no entropy is below 0
                assert limit == 0.0
    board = (tmp_path / "boards" / "tiny-branchynet.md").read_text()
    assert "| BranchyNet |" in board and "- BranchyNet:" in board


def test_the_executor_gives_the_traces_exits_and_predictions(fitted, small_fmnist) -> None:
    strategy, _, _ = fitted
    test = small_fmnist[2]
    assert_executor_matches(strategy, compute_traces(strategy, test, batch_size=100, device="cpu"), test.images)
