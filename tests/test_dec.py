"""DEC with E²CM exits on real (small) Fashion-MNIST: maths, training rules, multi-exit wiring."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml

from eebench.calibration import build_curve
from eebench.costs import StageCosts
from eebench.strategy import MethodContext
from eebench.testing import assert_executor_matches, assert_same_traces, threshold_vectors
from eebench.trace import compute_trace
from eebench_plugins.budgets import SamplesBudget
from eebench_plugins.calibrators import PerExitBisection
from eebench_plugins.dec.backbone import dec_backbone
from eebench_plugins.dec.clustering import ClusteringLayer, kl_divergence, kmeans, soft_assignment, target_distribution
from eebench_plugins.dec.loop import Meter
from eebench_plugins.dec.metrics import ari, cluster_accuracy, hungarian_mapping, nmi
from eebench_plugins.dec.pretrain import pretrain
from eebench_plugins.dec.recipes import PRESETS, resolve
from eebench_plugins.dec.strategy import DECE2CM
from eebench_plugins.dec.train import train_dec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine OpenMP's spinning threads make these
    small dense steps up to 30x slower than a single thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(recipe=dict(preset="quick", pretrain_iterations=10, finetune_iterations=40, batch_size=50,
                        update_interval=20, dec_max_iterations=40, kmeans_n_init=3, head_pretrain_iterations=20,
                        head_finetune_iterations=40))


# ---------------------------------------------------------------- clustering maths


def test_soft_assignment_and_target_distribution_match_hand_computed_values() -> None:
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    mu = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    # squared distances [[0, 4], [1, 1]]; kernel (1 + d²)^-1 = [[1, 1/5], [1/2, 1/2]]
    q = soft_assignment(z, mu, alpha=1.0)
    assert torch.allclose(q, torch.tensor([[5 / 6, 1 / 6], [1 / 2, 1 / 2]], dtype=torch.float64))
    # f = [4/3, 2/3]; q²/f = [[25/48, 1/24], [3/16, 3/8]] -> rows normalised
    p = target_distribution(q)
    assert torch.allclose(p, torch.tensor([[25 / 27, 2 / 27], [1 / 3, 2 / 3]], dtype=torch.float64))
    expected_kl = ((25 / 27) * math.log((25 / 27) / (5 / 6)) + (2 / 27) * math.log((2 / 27) / (1 / 6))
                   + (1 / 3) * math.log((1 / 3) / (1 / 2)) + (2 / 3) * math.log((2 / 3) / (1 / 2))) / 2
    assert kl_divergence(p, q).item() == pytest.approx(expected_kl, rel=1e-12)
    # alpha = 2: (1 + d²/2)^(-3/2); first row [1, 3^-1.5]
    q2 = soft_assignment(z[:1], mu, alpha=2.0)
    assert q2[0, 1].item() == pytest.approx(3 ** -1.5 / (1 + 3 ** -1.5), rel=1e-12)
    assert torch.allclose(ClusteringLayer(2, 2).requires_grad_(False).eval()(z.float()).sum(1), torch.ones(2))


def test_kmeans_recovers_separated_blobs() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(50)
    x = centres[truth] + 0.5 * torch.randn(150, 2, generator=generator)
    found, labels, inertia = kmeans(x, 3, n_init=5, generator=generator)
    assert cluster_accuracy(labels, truth) == 1.0
    assert torch.allclose(found.sort(0).values, centres.sort(0).values, atol=0.3)
    assert inertia == pytest.approx(float(((x - found[labels]) ** 2).sum()), rel=1e-5)


def test_cluster_accuracy_of_a_permuted_labelling_is_one_and_metrics_match_known_values() -> None:
    truth = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    permuted = torch.tensor([3, 1, 0, 2])[truth]
    assert cluster_accuracy(permuted, truth) == 1.0
    assert nmi(permuted, truth) == pytest.approx(1.0) and ari(permuted, truth) == pytest.approx(1.0)
    assert torch.equal(hungarian_mapping(permuted, truth)[permuted], truth)
    # scikit-learn's documented examples: ARI([0,0,1,1], [0,0,1,2]) = 4/7, NMI (arithmetic) = 0.8
    a, b = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 2])
    assert ari(a, b) == pytest.approx(4 / 7) and nmi(a, b) == pytest.approx(0.8)
    assert cluster_accuracy(torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 0, 0])) == 0.75


def test_recipe_presets_and_overrides() -> None:
    quick = resolve("quick", {"tol": 0.01, "lr": None})
    assert quick.tol == 0.01 and quick.lr == PRESETS["quick"].lr
    assert PRESETS["paper"].pretrain_iterations == 50_000 and PRESETS["paper"].update_interval == 140
    assert PRESETS["paper"].tol == 0.001 and PRESETS["paper"].kmeans_n_init == 20
    with pytest.raises(ValueError, match="unknown DEC recipe"):
        resolve("fast", {})


def test_quick_recipe_trains_the_smaller_decs_as_long_as_dec_large() -> None:
    """The paper trains DEC_middle / DEC_small 'following the same procedure as DEC_large'."""
    quick = PRESETS["quick"]
    assert quick.head_pretrain == quick.pretrain_iterations and quick.head_finetune == quick.finetune_iterations
    paper = PRESETS["paper"]  # the KL stage keeps the paper's rules; only its cap is the preset's
    assert (quick.dec_lr, quick.update_interval, quick.tol) == (paper.dec_lr, paper.update_interval, paper.tol)


def test_pretraining_without_fine_tuning_stops_after_the_layerwise_phases() -> None:
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(64, 8, generator=generator)
    encoders = [torch.nn.Linear(8, 6), torch.nn.Linear(6, 3)]
    budget = SamplesBudget(10**9)
    logs = pretrain(encoders, data, layerwise_iterations=5, finetune_iterations=0,
                    recipe=resolve("quick", {"batch_size": 16}), generator=generator, meter=Meter(budget))
    assert [(log.name, log.iterations) for log in logs] == [("sae layer 1", 5), ("sae layer 2", 5),
                                                            ("sae fine-tuning", 0)]
    assert budget.spend.samples == 2 * 5 * 16  # fine-tuning drew (and charged) no batch


def test_the_shipped_suite_picks_its_training_images_without_labels() -> None:
    from pathlib import Path

    from eebench.datasets import seeded_subset_indices
    from eebench.suite import load_suite

    suite = load_suite(Path(__file__).parents[1] / "suites" / "unsupervised_dec.yaml")
    assert all(d.per_class is None for d in suite.datasets)
    # train_subset (the label-free way to shrink it) depends on the number of labels only, not their values
    labels = torch.arange(100) % 10
    assert torch.equal(seeded_subset_indices(labels, seed=3, total=30),
                       seeded_subset_indices(torch.zeros(100, dtype=torch.long), seed=3, total=30))


# ---------------------------------------------------------------- KL training rules


def _embedding_problem():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=generator) + torch.arange(3).repeat_interleave(100)[:, None] * 2.0
    encoder = torch.nn.Linear(8, 4)
    layer = ClusteringLayer(3, 4)
    with torch.no_grad():
        layer.centres.copy_(kmeans(encoder(x), 3, n_init=2, generator=generator)[0])
    return x, encoder, layer


def test_kl_training_reduces_the_loss_against_a_fixed_target() -> None:
    x, encoder, layer = _embedding_problem()
    with torch.no_grad():
        target = target_distribution(layer(encoder(x)))
        before = kl_divergence(target, layer(encoder(x))).item()
    recipe = resolve("quick", {"update_interval": 10_000, "dec_max_iterations": 100, "batch_size": 64})
    train_dec(encoder, layer, x, recipe, torch.Generator().manual_seed(0), Meter(SamplesBudget(10**9)), 1.0)
    with torch.no_grad():
        after = kl_divergence(target, layer(encoder(x))).item()
    assert after < 0.7 * before


def test_stopping_rule_triggers_on_tol_and_otherwise_runs_to_the_cap() -> None:
    x, encoder, layer = _embedding_problem()
    budget = SamplesBudget(10**9)
    stop = train_dec(copy.deepcopy(encoder), copy.deepcopy(layer), x,
                     resolve("quick", {"update_interval": 7, "tol": 1.0, "dec_max_iterations": 100, "batch_size": 100}),
                     torch.Generator().manual_seed(0), Meter(budget), 1.0)
    assert stop.stopped == "tol" and stop.iterations == 7 and len(stop.extra["changed"]) == 1
    capped = resolve("quick", {"update_interval": 7, "tol": 0.0, "dec_max_iterations": 30, "batch_size": 100})
    full = train_dec(encoder, layer, x, capped, torch.Generator().manual_seed(0), Meter(budget), 1.0)
    assert full.stopped == "max_iterations" and full.iterations == 30
    assert budget.spend.samples == 37 * 100 and budget.spend.batches == 37


# ---------------------------------------------------------------- the multi-exit DEC


@pytest.fixture(scope="module")
def fitted(small_fmnist):
    bundle, train, test = small_fmnist
    torch.manual_seed(0)
    model = dec_backbone(bundle.num_classes, bundle.input_shape)
    context = MethodContext(10, bundle.input_shape, StageCosts.measure(model, bundle.input_shape),
                            torch.device("cpu"), seed=0, batch_size=100)
    strategy = DECE2CM(model, context, **TINY)
    budget = SamplesBudget(10**9)
    budget.bind(len(train))
    strategy.fit(train, budget)
    return strategy, budget, train, test


def _clusters(strategy: DECE2CM, images: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's hard cluster, recomputed independently of exit_outputs."""
    with torch.no_grad():
        h, outs = images, []
        for stage in strategy.backbone.stages:
            h = stage(h)
            outs.append(h)
        embeddings = [strategy.heads[0](outs[0]), strategy.heads[1](outs[1]), outs[-1]]
        centres = [strategy.layers[0].centres, strategy.layers[1].centres, strategy.backbone.head.centres]
        return [torch.cdist(z, mu).argmin(1) for z, mu in zip(embeddings, centres, strict=True)]


def test_frozen_layers_of_the_smaller_decs_stay_bit_identical(fitted) -> None:
    strategy, *_ = fitted
    small, middle = strategy.trunks
    assert len(small) == 1 and len(middle) == 2
    for trunk in (small, middle):
        assert not any(p.requires_grad for p in trunk.parameters())
        for (name, ours), theirs in zip(trunk.named_parameters(), strategy.backbone.stages.parameters(), strict=False):
            assert torch.equal(ours, theirs), name
            assert ours.data_ptr() != theirs.data_ptr()  # a real copy, not the same storage
    # the new 10-unit layers were trained (not left at their init) and have their own centres
    assert strategy.fit_log["phases"][-1]["name"] == "DEC_middle KL"
    assert not torch.equal(strategy.layers[0].centres, strategy.layers[1].centres)


def test_exits_cluster_with_their_own_centres_and_train_divisors(fitted) -> None:
    strategy, _, train, test = fitted
    train_clusters = _clusters(strategy, train.images)
    test_clusters = _clusters(strategy, test.images)
    with torch.no_grad():
        out = strategy.exit_outputs(test.images)
    for j in range(3):
        mapping = hungarian_mapping(train_clusters[j], train.labels, 10)
        assert torch.equal(out.preds[j], mapping[test_clusters[j]])
    with torch.no_grad():
        z = strategy.heads[1](strategy.backbone.stages[1](strategy.backbone.stages[0](train.images)))
    direct = torch.cdist(z.double(), strategy.layers[1].centres.double()).mean(0)
    assert torch.allclose(strategy.exits[1].divisors, direct, rtol=1e-6)
    assert bool((out.scores > 0.1).all()) and bool((out.scores <= 1).all())


def test_full_cost_end_equals_dec_large_accuracy(fitted) -> None:
    strategy, _, train, test = fitted
    calibration = strategy.calibration_view(compute_trace(strategy, train, batch_size=100, device="cpu"))
    test_trace = compute_trace(strategy, test, batch_size=100, device="cpu")
    costs = strategy.exit_costs()
    large_train, large_test = _clusters(strategy, train.images)[-1], _clusters(strategy, test.images)[-1]
    large_acc = (hungarian_mapping(large_train, train.labels, 10)[large_test] == test.labels).double().mean().item()
    never = test_trace.evaluate(torch.full((1, 2), math.inf), costs)
    assert never.accuracy.item() == large_acc and never.cost.item() == pytest.approx(1.0)
    curve = build_curve(calibration, test_trace, costs,
                        PerExitBisection(targets=200).thresholds(calibration, costs, torch.Generator().manual_seed(0)))
    # the hull ends where the calibration agreement with DEC_large is perfect; on test it can
    # differ from DEC_large only through the samples that still leave early there
    assert curve.calibration_accuracy[-1].item() == 1.0 and curve.calibration_cost[-1].item() <= 1.0 + 1e-12
    early = curve.test_exit_counts[-1, :-1].sum().item() / test_trace.num_samples
    assert abs(curve.test_accuracy[-1].item() - large_acc) <= early + 1e-12
    assert curve.calibration_cost[0].item() < 0.3  # DEC_small's exit is really used


def test_calibration_view_is_label_free(fitted) -> None:
    strategy, _, train, _ = fitted
    trace = compute_trace(strategy, train, batch_size=100, device="cpu")
    view = strategy.calibration_view(trace)
    clusters = _clusters(strategy, train.images)
    assert torch.equal(view.labels, clusters[-1])  # DEC_large's own assignment, not the true label
    assert torch.equal(view.preds[-1], clusters[-1])
    for j in range(2):
        assert torch.equal(view.preds[j], hungarian_mapping(clusters[j], clusters[-1], 10)[clusters[j]])
    # other true labels (hence other evaluation mappings) give the very same calibration view
    other = copy.copy(strategy)
    shuffled = train.labels[torch.randperm(len(train), generator=torch.Generator().manual_seed(3))]
    other.truth_maps = torch.stack([hungarian_mapping(c, shuffled, 10) for c in clusters])
    again = other.calibration_view(compute_trace(other, train, batch_size=100, device="cpu"))
    assert torch.equal(again.preds, view.preds) and torch.equal(again.labels, view.labels)


def test_costs_and_operating_points(fitted) -> None:
    strategy, budget, train, test = fitted
    costs = strategy.exit_costs()
    stage = strategy.context.stage_costs.stage_macs
    # E²CM's distances in MACs (issue 12, the core's cost table), not K·(3D−1) operations, D = K = 10:
    # D·K + K (expansion) + D + K (‖x‖²) + 2K (sqrt, ÷ divisor)
    distance = 10 * 10 + 10 + 10 + 10 + 2 * 10
    assert costs.reference_macs == sum(stage) + distance
    assert costs.backbone_macs.tolist() == [stage[0], stage[0] + stage[1], sum(stage)]
    assert costs.overhead_macs.tolist() == [500 * 10 + distance, 500 * 10 + distance, distance]
    trace = compute_trace(strategy, test, batch_size=100, device="cpu")
    small, middle, large = strategy.report().operating_points
    on_small = trace.evaluate(small.thresholds[None], costs)
    assert on_small.exit_counts[0].tolist() == [len(test), 0, 0]
    assert on_small.cost.item() == pytest.approx((stage[0] + 500 * 10 + distance) / costs.reference_macs)
    assert trace.evaluate(middle.thresholds[None], costs).cost.item() == pytest.approx(
        (stage[0] + stage[1] + 500 * 10 + distance) / costs.reference_macs)
    assert trace.evaluate(large.thresholds[None], costs).cost.item() == pytest.approx(1.0)
    assert budget.spend.samples > 0 and budget.spend.extra_forward_samples > 0 and budget.spend.training_macs > 0


def test_extra_metrics_are_nmi_and_ari_per_row(fitted) -> None:
    strategy, _, _, test = fitted
    preds = torch.stack([test.labels, torch.zeros_like(test.labels)])
    metrics = strategy.report().extra_metrics(preds, test.labels)
    assert metrics["NMI"][0] == pytest.approx(1.0) and metrics["ARI"][0] == pytest.approx(1.0)
    assert metrics["NMI"][1] == pytest.approx(0.0) and metrics["ARI"][1] == pytest.approx(0.0)


def test_suite_end_to_end_reports_decs_metrics_and_figure(tmp_path) -> None:
    from eebench.cli import main

    suite = {
        "name": "dec_tiny",
        "datasets": [{"name": "fashion-mnist", "per_class": 20, "test_subset": 300}],
        "backbones": [{"name": "dec", "recipe": {"epochs": 0}}],
        "methods": [{"name": "dec-e2cm", "label": "E²CM-DEC", "params": TINY}],
        "budgets": [{"name": "samples", "params": {"samples": 10_000_000}}],
        "seeds": [0, 1],
        "targets": [0.3, 0.5],
        "batch_size": 100,
    }
    path = tmp_path / "dec.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "boards")]) == 0
    import json

    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "cells").glob("*.json"))]
    assert len(results) == 2 and all(r["backbone_test_accuracy"] is None for r in results)
    for result in results:
        assert set(result["curve"]["test"]["metrics"]) == {"NMI", "ARI"}
        assert [p["name"] for p in result["operating_points"]] == ["DEC_small", "DEC_middle", "DEC_large"]
        large = result["operating_points"][-1]["test"]
        assert large["accuracy"] == result["no_exit"]["test_accuracy"] and large["cost"] == pytest.approx(1.0)
        assert result["no_exit"]["metrics"] == large["metrics"]
        assert result["fit_info"]["phases"][0]["name"] == "DEC_large SAE layer 1"
    board = (tmp_path / "boards" / "dec_tiny.md").read_text()
    assert "| E²CM-DEC | DEC_small |" in board and "| E²CM-DEC | DEC_large |" in board
    assert "| E²CM-DEC | NMI |" in board and "backbone (no early exit)" not in board
    assert (tmp_path / "boards" / "dec_tiny" / "fashion-mnist-dec.png").read_bytes()[:4] == b"\x89PNG"


def test_fitting_twice_gives_identical_numbers_and_the_paper_recipe_is_finite(fitted) -> None:
    strategy, _, train, test = fitted
    bundle = dict(num_classes=10, input_shape=(1, 28, 28))

    def fit(**params) -> DECE2CM:
        torch.manual_seed(0)
        model = dec_backbone(**bundle)
        again = DECE2CM(model, strategy.context, **params)
        again.fit(train, SamplesBudget(10**9))
        return again

    again = fit(**TINY)
    first = compute_trace(strategy, test, batch_size=100, device="cpu")
    second = compute_trace(again, test, batch_size=100, device="cpu")
    assert torch.equal(first.preds, second.preds) and torch.equal(first.scores, second.scores)
    paper = fit(recipe={**TINY["recipe"], "preset": "paper"})  # SGD lr 0.1, momentum 0.9, step decay
    assert paper.recipe.optimizer == "sgd" and paper.recipe.lr == 0.1
    assert all(math.isfinite(p["last_loss"]) for p in paper.fit_log["phases"])


def test_the_budget_caps_training(small_fmnist) -> None:
    bundle, train, _ = small_fmnist
    torch.manual_seed(0)
    model = dec_backbone(10, bundle.input_shape)
    context = MethodContext(10, bundle.input_shape, StageCosts.measure(model, bundle.input_shape),
                            torch.device("cpu"), seed=0, batch_size=100)
    strategy = DECE2CM(model, context, **TINY)
    budget = SamplesBudget(500)
    strategy.fit(train, budget)
    phases = {p["name"]: p for p in strategy.fit_log["phases"]}
    assert phases["DEC_large SAE layer 1"]["iterations"] == 10  # 10 x 50 samples: the whole budget
    assert phases["DEC_large SAE layer 2"]["stopped"] == "budget" and phases["DEC_large SAE layer 2"]["iterations"] == 0
    assert phases["DEC_large KL"]["stopped"] == "budget" and phases["DEC_large KL"]["iterations"] == 0
    assert budget.spend.samples == 500
    with torch.no_grad():
        assert strategy.exit_outputs(train.images[:5]).preds.shape == (3, 5)  # still a usable (weak) model


def test_autoencoder_activations_follow_the_paper() -> None:
    """DEC Sec. 3.2: every layer is ReLU except the embedding and the first pair's decoder, so the
    embedding and the reconstructed input may be negative and every other output may not."""
    from torch import nn

    from eebench_plugins.dec.pretrain import StackedAutoencoder

    torch.manual_seed(0)
    sizes = [12, 8, 8, 16, 3]
    sae = StackedAutoencoder([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
    x = torch.randn(256, 12)
    hidden = [x]
    for i in range(4):
        hidden.append(sae.encode(x, upto=i + 1))
    assert all((h >= 0).all() for h in hidden[1:4]) and (hidden[4] < 0).any()  # embedding linear
    assert (sae.pair(0, x, 0.0) < 0).any()  # reconstructs the input: linear
    for i in (1, 2, 3):  # reconstruct ReLU codes (the 2000-d layer included): ReLU
        assert (sae.pair(i, hidden[i], 0.0) >= 0).all()
    assert (sae(x) < 0).any()


def test_the_executor_takes_the_traces_decisions(fitted) -> None:
    strategy, _, _, test = fitted
    strategy.eval()
    trace = compute_trace(strategy, test, batch_size=64, device="cpu")
    quantiles = threshold_vectors(trace)
    points = [p.thresholds for p in strategy.report().operating_points]  # each DEC alone
    assert_executor_matches(strategy, [trace], test.images, quantiles + points)
    first = trace.first_exit(torch.stack(quantiles[:3]))
    assert len(set(first.flatten().tolist())) == trace.num_exits  # every exit is taken somewhere


def test_state_dict_restores_the_exits_and_the_maps_exactly(fitted) -> None:
    strategy, _, train, test = fitted
    torch.manual_seed(1)  # another initialisation: everything must come from the state
    fresh = DECE2CM(dec_backbone(10, (1, 28, 28)), strategy.context, **TINY)
    fresh.load_state_dict(copy.deepcopy(strategy.state_dict()))
    for split in (train, test):
        first = compute_trace(strategy, split, batch_size=64, device="cpu")
        again = compute_trace(fresh, split, batch_size=64, device="cpu")
        assert_same_traces([first], [again])
        view, view_again = strategy.calibration_view(first), fresh.calibration_view(again)
        assert torch.equal(view.preds, view_again.preds) and torch.equal(view.labels, view_again.labels)
