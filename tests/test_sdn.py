"""SDN (IC-only, frozen backbone) on a real, briefly trained ResNet-20 and real Fashion-MNIST."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from eebench.costs import StageCosts
from eebench.strategy import MethodContext
from eebench.testing import assert_executor_matches, assert_state_reloads
from eebench.trace import compute_trace, compute_traces
from eebench_plugins.budgets import EpochsBudget, SamplesBudget
from eebench_plugins.internal_classifiers import InternalClassifier, lr_drop_at, place_ics, reduce_for_ic
from eebench_plugins.sdn import SDN

FRACTIONS = [0.15, 0.30, 0.45, 0.60, 0.75, 0.90]


def make_context(model, bundle, **overrides) -> MethodContext:
    costs = StageCosts.measure(model, bundle.input_shape)
    params = {"seed": 0, "batch_size": 100, "train_batch_size": 32, "backbone_key": "test-resnet20"}
    params.update(overrides)
    return MethodContext(bundle.num_classes, bundle.input_shape, costs, torch.device("cpu"), **params)


def ic_accuracies(strategy: SDN, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    out = strategy.exit_outputs(images)
    return (out.preds == labels[None]).double().mean(1).tolist()


@pytest.fixture(scope="module")
def fitted(trained_resnet20, small_fmnist):
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = SDN(model, make_context(model, bundle))
    untrained = copy.deepcopy(strategy.bank.ics)
    budget = EpochsBudget(5)
    budget.bind(len(train))
    strategy.fit(train, budget)
    strategy.eval()
    return strategy, budget, before, untrained


@pytest.mark.parametrize(("name", "shape"), [("resnet20", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_ics_sit_at_the_first_exit_point_reaching_each_fraction(registry, name, shape) -> None:
    """``placement: first-at-least``, the rule before issue 13."""
    model = registry.get("backbones", name)(10, shape).eval()
    costs = StageCosts.measure(model, shape)
    context = MethodContext(10, shape, costs, torch.device("cpu"), seed=0)
    strategy = SDN(model, context, placement="first-at-least")
    candidates = [s for s in model.exit_points if s != len(model.stages) - 1]  # never the final stage
    expected = []
    for fraction in FRACTIONS:
        reaching = [s for s in candidates if sum(costs.stage_macs[: s + 1]) >= fraction * costs.total]
        stage = min(reaching) if reaching else candidates[-1]
        if stage not in expected:
            expected.append(stage)
    assert strategy.bank.stages == expected and len(expected) == 6
    assert strategy.bank.stages[-1] < len(model.stages) - 1
    for stage, fraction in zip(strategy.bank.stages, FRACTIONS, strict=True):
        earlier = [s for s in candidates if s < stage]
        if costs.through(stage) >= fraction * costs.total:  # first point reaching it ...
            assert not earlier or costs.through(earlier[-1]) < fraction * costs.total
        else:  # ... or, when none before the final stage does, the last one before it
            assert stage == candidates[-1]
    assert strategy.report().exit_names == [f"ic@block{s}" for s in expected] + ["final"]
    assert strategy.exit_taps() == expected and strategy.bank.stages is strategy.bank.stages
    exit_costs = strategy.exit_costs()
    assert exit_costs.backbone_macs.tolist() == [costs.through(s) for s in expected] + [costs.total]
    assert exit_costs.overhead_macs[-1].item() == 0.0 and exit_costs.reference_macs == costs.total


@pytest.mark.parametrize(("name", "shape"), [("resnet20", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_ics_sit_at_the_exit_point_nearest_each_fraction(registry, name, shape) -> None:
    """The default ``placement: nearest``: each IC at the exit point (before the last stage) whose
    cumulative share of the MACs is nearest its fraction; on these backbones no two fractions share
    one, so that is each fraction's unconstrained nearest point."""
    model = registry.get("backbones", name)(10, shape).eval()
    costs = StageCosts.measure(model, shape)
    strategy = SDN(model, MethodContext(10, shape, costs, torch.device("cpu"), seed=0))
    candidates = [s for s in model.exit_points if s != len(model.stages) - 1]
    share = {s: sum(costs.stage_macs[: s + 1]) / costs.total for s in candidates}
    expected = [min(candidates, key=lambda s: (abs(share[s] - f), share[s])) for f in FRACTIONS]
    assert len(set(expected)) == 6 and expected == sorted(expected)
    assert strategy.bank.stages == expected and strategy.bank.placement == "nearest"
    for stage, fraction in zip(expected, FRACTIONS, strict=True):
        assert all(abs(share[stage] - fraction) <= abs(share[s] - fraction) for s in candidates)
    exit_costs = strategy.exit_costs()
    assert exit_costs.backbone_macs.tolist() == [costs.through(s) for s in expected] + [costs.total]


def test_resnet20_placement_old_and_new(registry) -> None:
    """Issue 13: on ResNet-20 the first-at-least rule puts the ICs at blocks 2, 3, 5, 6, 7, 8 (24 to 88 %
    of the MACs), so nothing IC-based exits below 0.24; the nearest rule starts at block 1, below 0.20."""
    model = registry.get("backbones", "resnet20")(10, (1, 28, 28)).eval()
    costs = StageCosts.measure(model, (1, 28, 28))
    context = MethodContext(10, (1, 28, 28), costs, torch.device("cpu"), seed=0)
    old = SDN(model, context, placement="first-at-least")
    new = SDN(model, context)
    assert old.bank.stages == [2, 3, 5, 6, 7, 8]
    assert old.bank.cost_shares()[0] > 0.23
    assert new.bank.stages[0] == 1 and new.bank.cost_shares()[0] < 0.20
    assert new.bank.stages[-1] == 8 and len(new.bank.stages) == 6
    # the cheapest exit of each: the first IC's cumulative cost (backbone + IC), normalised
    assert new.exit_costs().normalised()[0].item() < 0.20 < old.exit_costs().normalised()[0].item()
    # the notes (shown in leaderboards) and fit_info say where the ICs really sit
    shares = "/".join(f"{100 * costs.through(s) / costs.total:.1f}" for s in new.bank.stages)
    report = new.report()
    assert f"ICs at {shares} % of backbone MACs (nearest placement for 15/30/45/60/75/90 %)." in report.notes
    assert report.fit_info == {"placement": "nearest", "fractions": FRACTIONS, "ic_stages": new.bank.stages,
                               "ic_cost_shares": pytest.approx([costs.through(s) / costs.total
                                                                for s in new.bank.stages])}
    assert "first-at-least placement" in old.report().notes


def test_placement_is_validated(registry) -> None:
    from eebench.api import EebenchError
    from eebench_plugins.manifests.sdn import SDNParams

    model = registry.get("backbones", "resnet20")(10, (1, 28, 28)).eval()
    context = MethodContext(10, (1, 28, 28), StageCosts.measure(model, (1, 28, 28)), torch.device("cpu"), seed=0)
    with pytest.raises(EebenchError) as error:
        SDN(model, context, placement="closest")
    assert error.value.key == "placement"
    assert SDNParams().placement == "nearest" and SDNParams(placement="first-at-least").placement == "first-at-least"
    with pytest.raises(ValueError, match="placement"):
        SDNParams(placement="closest")


def test_frozen_backbone_is_bit_identical_after_fit(fitted) -> None:
    strategy, _, before, _ = fitted
    after = strategy.backbone.state_dict()
    assert any(k.endswith("running_mean") for k in after) and any(k.endswith("num_batches_tracked") for k in after)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_mixing_is_alpha_max_plus_one_minus_alpha_avg() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 16, 28, 28)
    ic = InternalClassifier((16, 28, 28), 10)
    with torch.no_grad():
        ic.alpha.fill_(0.3)
        by_hand = 0.3 * torch.nn.functional.max_pool2d(x, 7) + 0.7 * torch.nn.functional.avg_pool2d(x, 7)
        expected = ic.linear(by_hand.flatten(1))
        assert torch.allclose(ic(x), expected, atol=1e-6)
        pair = reduce_for_ic(x)
        assert pair.shape == (5, 2, 16, 4, 4)
        assert torch.allclose(ic.forward_pooled(pair), expected, atol=1e-6)
    # Issue 12 (one cost unit): the core counts the IC module; its two pools read every value of
    # their windows (2·C·s² when r divides s, the cost table), the α mix is elementwise arithmetic
    # between tensors, free as in the backbone (the old hand formula added C·(s/r)²), + Linear in·K
    assert ic.macs() == 2 * 16 * 28 * 28 + 16 * 4 * 4 * 10
    # r = 3 does not divide s = 14: the windows read 12×12 of the 14×14 map
    assert InternalClassifier((32, 14, 14), 10).macs() == 2 * 32 * 12 * 12 + 32 * 4 * 4 * 10
    small = InternalClassifier((64, 3, 3), 10)  # s < 4: no pooling, no α, a bare Linear
    assert small.alpha is None and small.macs() == 64 * 9 * 10
    assert 0.0 <= InternalClassifier((16, 14, 14), 10).alpha.item() < 1.0


def test_cached_pooled_activations_give_the_live_ic_output(fitted, small_fmnist) -> None:
    strategy, *_ = fitted
    _, train, _ = small_fmnist
    cached = strategy.cached_activations(train, "sdn-pool")  # the fit's pass, from the cache
    assert cached.features[strategy.bank.stages[0]].dtype == torch.float16
    with torch.no_grad():
        outputs, _ = strategy.backbone.stage_outputs(train.images[:64])
        for stage, ic in zip(strategy.bank.stages, strategy.bank.ics, strict=True):
            live = ic(outputs[stage])
            from_cache = ic.forward_pooled(cached.features[stage][:64].float())
            assert torch.allclose(from_cache, live, rtol=1e-2, atol=1e-2 * live.abs().max().item())
            assert int((from_cache.argmax(1) != live.argmax(1)).sum()) <= 1  # float16 may flip a near-tie


def test_a_sample_budget_is_what_the_ics_see(trained_resnet20, small_fmnist, monkeypatch) -> None:
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    strategy = SDN(model, make_context(model, bundle))
    seen: list[int] = []
    first = strategy.bank.ics[0]
    original = first.forward_pooled
    monkeypatch.setattr(first, "forward_pooled", lambda pair, extra=None: seen.append(len(pair)) or original(pair))
    budget = SamplesBudget(90)
    budget.bind(len(train))
    strategy.fit(train, budget)
    assert sum(seen) == 90 and budget.spend.samples == 90
    assert budget.spend.extra_forward_samples == len(train)
    ic_macs = math.fsum(ic.macs() for ic in strategy.bank.ics)
    expected = 90 * 3 * ic_macs + len(train) * strategy.context.stage_costs.total
    assert budget.spend.training_macs == pytest.approx(expected, rel=1e-12)


def test_lr_drops_after_60_percent_of_a_multi_epoch_plan() -> None:
    five = EpochsBudget(5)
    five.bind(200)
    one = EpochsBudget(1)
    one.bind(200)
    assert lr_drop_at(five.planned_samples, 200) == pytest.approx(600) and lr_drop_at(one.planned_samples, 200) is None
    assert lr_drop_at(SamplesBudget(90).planned_samples, 200) is None
    assert lr_drop_at(SamplesBudget(1000).planned_samples, 200) == 600


def test_trained_ics_beat_chance_and_their_untrained_selves(fitted, small_fmnist) -> None:
    strategy, budget, _, untrained = fitted
    _, train, _ = small_fmnist
    assert budget.spend.samples == 5 * len(train)
    trained_acc = ic_accuracies(strategy, train.images, train.labels)[:-1]
    fresh = copy.copy(strategy)
    fresh.bank = copy.copy(strategy.bank)
    fresh.bank.ics = untrained.eval()
    untrained_acc = ic_accuracies(fresh, train.images, train.labels)[:-1]
    assert trained_acc[-1] > 0.3 and trained_acc[-2] > 0.3
    assert max(untrained_acc) < 0.3
    assert sum(trained_acc) / len(trained_acc) > sum(untrained_acc) / len(untrained_acc) + 0.15


def with_most_confident_fallback(strategy: SDN) -> SDN:
    """The same fitted ICs under SDN's most-confident fallback."""
    other = SDN(strategy.backbone, strategy.context, fallback="most_confident")
    other.bank.ics.load_state_dict(strategy.bank.ics.state_dict())
    other.eval()
    return other


def test_most_confident_fallback_returns_the_most_confident_exit(fitted, small_fmnist) -> None:
    strategy, *_ = fitted
    _, _, test = small_fmnist
    other = with_most_confident_fallback(strategy)
    plain = strategy.exit_outputs(test.images)
    fallback = other.exit_outputs(test.images)
    best = plain.scores.argmax(0)
    assert torch.equal(fallback.preds[:-1], plain.preds[:-1]) and torch.equal(fallback.scores[:-1], plain.scores[:-1])
    assert torch.equal(fallback.preds[-1], plain.preds[best, torch.arange(best.numel())])
    assert torch.equal(fallback.scores[-1], plain.scores.max(0).values)
    assert bool((best < plain.preds.shape[0] - 1).any())  # some IC is more confident than the head
    # the final output needs every IC: their overhead is always paid
    assert other.chained and not strategy.chained
    trace = compute_trace(other, test, batch_size=100, device="cpu")
    never = torch.full((1, trace.num_exits - 1), math.inf)
    cost = trace.evaluate(never, other.exit_costs()).cost.item()
    assert cost == pytest.approx(other.exit_costs().normalised()[-1].item()) and cost > 1.0


def test_cli_runs_e2cm_and_sdn_and_records_the_shared_pass(tmp_path) -> None:
    from eebench.cli import main

    suite = {
        "name": "tiny-sdn",
        "datasets": [{"name": "fashion-mnist", "per_class": 30, "test_subset": 300}],
        "backbones": [{"name": "resnet20", "recipe": {"epochs": 1, "batch_size": 64}}],
        "methods": [{"name": "e2cm"}, {"name": "sdn"},
                    {"name": "sdn", "label": "sdn-per-exit", "calibrator": {"name": "per-exit-bisection"}}],
        "budgets": [{"name": "epochs", "params": {"epochs": 1}}],
        "targets": [0.5],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "boards")])
    assert code == 0
    cells = sorted((tmp_path / "run" / "cells").glob("*.json"))
    results = {r["method"]: r for r in (json.loads(p.read_text()) for p in cells)}
    assert set(results) == {"e2cm", "sdn", "sdn-per-exit"}
    for result in results.values():
        assert result["curve"] and result["accuracy_at"]["0.5"] is not None
    sdn = results["sdn"]
    assert sdn["sizes"]["train"] == 300 and sdn["spend"]["extra_forward_samples"] == 300
    assert sdn["spend"]["samples"] == 300 and sdn["calibrator"] == "shared-threshold"
    assert sdn["exits"]["names"][-1] == "final" and len(sdn["exits"]["names"]) == 7
    per_exit = results["sdn-per-exit"]  # served from the shared cache, still charged as if alone
    assert per_exit["calibrator"] == "per-exit-bisection" and per_exit["spend"]["extra_forward_samples"] == 300


def test_fractions_sharing_an_exit_point_get_one_ic_and_no_extra(registry) -> None:
    """first-at-least: two fractions reached at the same block give that one IC; only an unreached
    fraction adds the last exit point before the final stage."""
    model = registry.get("backbones", "resnet20")(10, (1, 28, 28)).eval()
    costs = StageCosts.measure(model, (1, 28, 28))
    context = MethodContext(10, (1, 28, 28), costs, torch.device("cpu"), seed=0)
    candidates = [s for s in model.exit_points if s != len(model.stages) - 1]
    first = min(s for s in candidates if costs.through(s) >= 0.5 * costs.total)
    assert place_ics(model, context, [0.5, 0.5001], "first-at-least") == [first]
    assert place_ics(model, context, [0.5, 0.9999], "first-at-least") == [first, candidates[-1]]


def test_nearest_placement_keeps_the_ics_on_distinct_blocks(registry) -> None:
    """nearest: a fraction whose nearest block is taken gets the nearest free one (ties to the cheaper);
    with more fractions than exit points every exit point gets one IC and the rest are dropped."""
    model = registry.get("backbones", "resnet20")(10, (1, 28, 28)).eval()
    costs = StageCosts.measure(model, (1, 28, 28))
    context = MethodContext(10, (1, 28, 28), costs, torch.device("cpu"), seed=0)
    candidates = [s for s in model.exit_points if s != len(model.stages) - 1]
    share = {s: costs.through(s) / costs.total for s in candidates}
    nearest = min(candidates, key=lambda s: abs(share[s] - 0.5))
    runner_up = min((s for s in candidates if s != nearest), key=lambda s: (abs(share[s] - 0.5), share[s]))
    assert place_ics(model, context, [0.5, 0.5001]) == sorted([nearest, runner_up])
    assert place_ics(model, context, [0.5001, 0.5]) == sorted([nearest, runner_up])  # served in ascending order
    assert place_ics(model, context, [0.01] * 20) == candidates  # every exit point, the extra fractions dropped
    assert place_ics(model, context, [1.0]) == [candidates[-1]]  # never the last stage, the head's


def test_executor_matches_the_trace(fitted, small_fmnist) -> None:
    strategy, *_ = fitted
    _, _, test = small_fmnist
    assert_executor_matches(strategy, compute_traces(strategy, test, batch_size=100, device="cpu"), test.images)


def test_executor_matches_the_trace_with_the_most_confident_fallback(fitted, small_fmnist) -> None:
    """The running most confident output lives in the per-sample state, so the executor's final exit
    (which every IC feeds, even one switched off) returns what the trace's does."""
    strategy, *_ = fitted
    _, _, test = small_fmnist
    other = with_most_confident_fallback(strategy)
    traces = compute_traces(other, test, batch_size=100, device="cpu")
    assert_executor_matches(other, traces, test.images)


@pytest.mark.parametrize("fallback", ["final", "most_confident"])
def test_a_fresh_sdn_loading_the_state_gives_the_same_traces(fitted, small_fmnist, fallback) -> None:
    strategy, *_ = fitted
    _, _, test = small_fmnist
    fitted_one = SDN(strategy.backbone, strategy.context, fallback=fallback)
    fitted_one.bank.ics.load_state_dict(strategy.bank.ics.state_dict())
    fresh = SDN(copy.deepcopy(strategy.backbone), strategy.context, fallback=fallback)
    pairs = zip(fresh.bank.ics.parameters(), strategy.bank.ics.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)  # fresh ICs: the state must bring the trained ones
    assert_state_reloads(fitted_one, fresh, test)


def test_calibration_trace_with_the_fallback_comes_from_the_cache(fitted, small_fmnist) -> None:
    """The cached calibration trace runs the same most-confident rule, through the state, as exit_step."""
    strategy, *_ = fitted
    _, train, _ = small_fmnist
    other = with_most_confident_fallback(strategy)
    plain = strategy.split_traces(train)[0]
    cached = other.split_traces(train)[0]
    best = plain.scores.argmax(0)
    assert torch.equal(cached.preds[:-1], plain.preds[:-1]) and torch.equal(cached.scores[:-1], plain.scores[:-1])
    assert torch.equal(cached.preds[-1], plain.preds[best, torch.arange(best.numel())])
    assert torch.equal(cached.scores[-1], plain.scores.max(0).values)
