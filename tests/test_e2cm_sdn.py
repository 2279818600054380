"""E²CM+SDN consulting on a real (briefly trained) ResNet-20 and Fashion-MNIST images."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from eebench.calibration import build_curve
from eebench.costs import StageCosts
from eebench.datasets import take
from eebench.strategy import MethodContext
from eebench.testing import assert_executor_matches, assert_state_reloads
from eebench.trace import compute_traces
from eebench_plugins.budgets import EpochsBudget
from eebench_plugins.calibrators import PerExitBisection
from eebench_plugins.e2cm_sdn import E2CMSDN, cm_threshold_grid


@pytest.fixture(scope="module")
def consulting(trained_resnet20, small_fmnist):
    bundle, train, test = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    context = MethodContext(10, bundle.input_shape, StageCosts.measure(model, bundle.input_shape),
                            torch.device("cpu"), seed=0, batch_size=100, train_batch_size=32)
    strategy = E2CMSDN(model, context, grid=2)  # x 2 agreement rules = 4 variants
    budget = EpochsBudget(3)
    budget.bind(len(train))
    tick = time.perf_counter()
    strategy.fit(train, budget)
    strategy.fit_wall = time.perf_counter() - tick
    strategy.eval()
    return strategy, budget, train, test


def test_ics_read_the_normalised_distances(consulting) -> None:
    strategy, *_ = consulting
    for ic in strategy.bank.ics:
        assert ic.extra_inputs == 10
        assert ic.linear.in_features == ic.pooled_numel + 10


def test_spend_counts_every_pass(consulting) -> None:
    _, budget, train, _ = consulting
    assert budget.spend.samples == 3 * len(train)  # IC training only
    assert budget.spend.extra_forward_samples == 3 * len(train)  # activations, class means, divisors


def test_seconds_include_the_statistics_passes(consulting) -> None:
    strategy, budget, *_ = consulting
    # the shared passes (statistics, activations) are charged at their recorded wall time, the time
    # of computing them here taken off the clock: no pass is counted twice, none is left out
    assert strategy.statistics_seconds > 0
    assert strategy.statistics_seconds < budget.spend.seconds <= strategy.fit_wall + 1e-3
    assert budget.overspent() is None and budget.utilisation() == {"samples": 1.0}


def test_consulting_never_exits_where_either_party_says_continue(consulting) -> None:
    strategy, _, train, test = consulting
    calibration = compute_traces(strategy, train, batch_size=100, device="cpu", calibration=True)
    traces = compute_traces(strategy, test, batch_size=100, device="cpu")
    variants = strategy.report().variants
    assert len(traces) == 4 == len(variants)
    parts = strategy.parts(test.images)
    costs = strategy.exit_costs()
    candidates = [PerExitBisection(targets=100).thresholds(t, costs, torch.Generator().manual_seed(0))
                  for t in calibration]
    curve = build_curve(calibration, traces, costs, candidates)
    checked = 0
    rules = [rule for rule in strategy.rules for _ in range(strategy.grid)]
    assert variants[0].startswith("same-class") and variants[-1].startswith("conf")
    for variant, trace, vectors in zip(range(4), traces, candidates, strict=True):
        first = trace.first_exit(vectors)  # [V, N]
        for j in range(trace.num_exits - 1):
            leaving = first == j
            ic_ok = parts["ic_conf"][j][None] >= vectors[:, j, None]
            cm_ok = parts["cm_conf"][j] > strategy.cm_thresholds[variant % strategy.grid, j]
            if rules[variant] == "same-class":
                cm_ok &= parts["cm_pred"][j] == parts["ic_pred"][j]
            assert not bool((leaving & ~(ic_ok & cm_ok[None])).any())
            checked += int(leaving.sum())
    assert checked > 0  # early exits do happen, so the check above is not vacuous
    assert curve.variants is not None and len(curve.test_cost) >= 1
    assert bool((curve.calibration_accuracy.diff() >= 0).all())


def test_grid_level_zero_never_vetoes_on_confidence(consulting) -> None:
    strategy, _, train, _ = consulting
    parts = strategy.parts(train.images)
    assert bool((parts["cm_conf"] > strategy.cm_thresholds[0][:, None]).all())
    # level 0 is exactly −inf (not just below the training minimum), the others the training quantiles
    assert strategy.cm_thresholds[0].tolist() == [float("-inf")] * len(strategy.bank.stages)
    assert bool(torch.isfinite(strategy.cm_thresholds[1:]).all())
    assert bool((strategy.cm_thresholds.diff(dim=0) >= 0).all())
    # a sample less confident than every training sample (all K distances equal: confidence 1/K) still passes
    training = torch.tensor([[0.0, 1.0, 1.0], [0.0, 2.0, 2.0]], dtype=torch.float64)  # confidences > 1/3
    assert 1 / 3 > float(cm_threshold_grid([training], 2)[0, 0])
    median = cm_threshold_grid([torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]], dtype=torch.float64)], 2)
    confidence = torch.softmax(-torch.tensor([0.0, 2.0], dtype=torch.float64), 0).max()  # the middle sample
    assert float(median[1, 0]) < float(confidence) and float(median[1, 0]) == pytest.approx(float(confidence))
    scores = strategy.exit_outputs(train.images[:500]).scores  # [variants, exits, N]
    confidence_level_zero = strategy.rules.index("confidence") * strategy.grid
    assert bool(torch.isfinite(scores[confidence_level_zero]).all())  # that rule never vetoes at level 0
    same_class_level_zero = strategy.rules.index("same-class") * strategy.grid
    assert bool(torch.isinf(scores[same_class_level_zero, :-1]).any())  # class disagreements are vetoed


def test_costs_add_the_distance_overhead(consulting) -> None:
    strategy, *_ = consulting
    costs = strategy.exit_costs()
    shapes = strategy.context.stage_costs.stage_shapes
    for j, (stage, ic) in enumerate(zip(strategy.bank.stages, strategy.bank.ics, strict=True)):
        dim = torch.tensor(shapes[stage]).prod().item()
        # E²CM's distances in MACs (issue 12, the core's cost table), not K·(3D−1) operations:
        # D·K + K (expansion) + D + K (‖x‖²) + 2K (sqrt, ÷ divisor)
        assert costs.overhead_macs[j].item() == pytest.approx(ic.macs() + 10 * dim + 10 + dim + 10 + 2 * 10)
    assert bool((costs.cumulative().diff() > 0).all())


def _context(model, bundle) -> MethodContext:
    return MethodContext(10, bundle.input_shape, StageCosts.measure(model, bundle.input_shape), torch.device("cpu"),
                         seed=0, batch_size=100, train_batch_size=32)


def test_executor_matches_the_trace_for_every_rule_and_level(consulting) -> None:
    strategy, _, _, test = consulting
    subset = take(test, torch.arange(150))  # 4 variants x 5 threshold matrices x 3 modes: keep it short
    traces = compute_traces(strategy, subset, batch_size=100, device="cpu")
    assert len(traces) == 4
    assert_executor_matches(strategy, traces, subset.images)


def test_a_fresh_strategy_loading_the_state_gives_the_same_traces(consulting, trained_resnet20, small_fmnist) -> None:
    """The T_cm grid (no module holds it) and the class means come back with the ICs."""
    strategy, _, _, test = consulting
    bundle = small_fmnist[0]
    model = copy.deepcopy(trained_resnet20)
    fresh = E2CMSDN(model, _context(model, bundle), grid=2)
    assert not torch.equal(fresh.cm_thresholds, strategy.cm_thresholds)
    assert "cm_thresholds" in strategy.state_dict()
    assert_state_reloads(strategy, fresh, test)
    assert torch.equal(fresh.cm_thresholds, strategy.cm_thresholds)


def test_calibration_trace_reads_the_fit_distances_only_for_the_training_split(consulting) -> None:
    strategy, _, train, test = consulting
    assert strategy.split_traces(test) is None  # the test trace runs the images
    cached = strategy.split_traces(train)
    assert cached is not None and len(cached) == 4 and cached[0].num_samples == len(train)
