"""E²CM+SDN consulting on a real (briefly trained) ResNet-20 and Fashion-MNIST images."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from eebench.calibration import build_curve
from eebench.costs import StageCosts
from eebench.datasets import take
from eebench.stepping import ExitPlan
from eebench.strategy import MethodContext
from eebench.testing import assert_executor_matches, assert_state_reloads, executor_outcome, threshold_vectors
from eebench.trace import compute_traces
from eebench_plugins.budgets import EpochsBudget
from eebench_plugins.calibrators import PerExitBisection
from eebench_plugins.e2cm_sdn import (
    E2CM_EXIT_SCORE,
    E2CMSDN,
    ConsultingTrace,
    E2CMSDNWithE2CMClass,
    cm_threshold_grid,
)
from eebench_plugins.manifests.e2cm_sdn import DEFAULT_RULES, RULES, E2CMSDNParams

ALL_RULES = list(RULES)  # same-class, confidence, or, or-e2cm-class
VARIANTS = len(ALL_RULES) * 2  # x grid 2


@pytest.fixture(scope="module")
def consulting(trained_resnet20, small_fmnist):
    bundle, train, test = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    context = MethodContext(10, bundle.input_shape, StageCosts.measure(model, bundle.input_shape),
                            torch.device("cpu"), seed=0, batch_size=100, train_batch_size=32)
    strategy = E2CMSDN(model, context, grid=2, rules=ALL_RULES)  # x 4 rules = 8 variants
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


def _rule_of(strategy: E2CMSDN, variant: int) -> tuple[str, int]:
    """(rule, T_cm grid level) of a variant: rule-major, as ``report().variants`` lists them."""
    return strategy.rules[variant // strategy.grid], variant % strategy.grid


@pytest.fixture(scope="module")
def curve_setup(consulting):
    strategy, _, train, test = consulting
    calibration = compute_traces(strategy, train, batch_size=100, device="cpu", calibration=True)
    traces = compute_traces(strategy, test, batch_size=100, device="cpu")
    costs = strategy.exit_costs()
    candidates = [PerExitBisection(targets=100).thresholds(t, costs, torch.Generator().manual_seed(0))
                  for t in calibration]
    return calibration, traces, candidates, build_curve(calibration, traces, costs, candidates)


def test_each_rule_exits_where_it_says(consulting, curve_setup) -> None:
    """Veto rules never exit where either party says continue; OR rules exit where the IC passes T_ic or,
    below it, E²CM passes T_cm (level 0: never), with the IC's class (or E²CM's, for or-e2cm-class)."""
    strategy, _, _, test = consulting
    calibration, traces, candidates, curve = curve_setup
    variants = strategy.report().variants
    assert len(traces) == VARIANTS == len(variants) == len(calibration)
    assert all(isinstance(t, ConsultingTrace) for t in traces + calibration)  # or-e2cm-class is among the rules
    assert variants[0] == "same-class, T_cm = q0.00" and variants[3] == "confidence, T_cm = q0.50"
    assert variants[4:] == ["or, T_cm = +inf", "or, T_cm = q0.50", "or-e2cm-class, T_cm = +inf",
                            "or-e2cm-class, T_cm = q0.50"]
    batches = [strategy.parts(test.images[i : i + 100]) for i in range(0, len(test), 100)]  # the traces' batches
    parts = {key: torch.cat([b[key] for b in batches], dim=1) for key in batches[0]}
    checked, by_e2cm = 0, 0
    for variant, (trace, vectors) in enumerate(zip(traces, candidates, strict=True)):
        rule, level = _rule_of(strategy, variant)
        first = trace.first_exit(vectors)  # [V, N]
        answers = trace.predictions(vectors)
        for j in range(trace.num_exits - 1):
            leaving = first == j
            reached = first >= j
            ic_ok = parts["ic_conf"][j][None] >= vectors[:, j, None]
            cm_ok = (parts["cm_conf"][j] > strategy.cm_thresholds[level, j])[None].expand_as(ic_ok)
            if rule in ("same-class", "confidence"):
                if rule == "same-class":
                    cm_ok = cm_ok & (parts["cm_pred"][j] == parts["ic_pred"][j])[None]
                assert not bool((leaving & ~(ic_ok & cm_ok)).any())
                assert torch.equal(answers[leaving], parts["ic_pred"][j][None].expand_as(leaving)[leaving])
            else:
                if level == 0:
                    cm_ok = torch.zeros_like(cm_ok)  # T_cm = +inf: E²CM never says exit
                # E²CM's "exit" scores E2CM_EXIT_SCORE: it passes any T_ic up to 2 (above 1: E²CM alone
                # decides), never +inf (the exit off)
                says_exit = ic_ok | (cm_ok & (vectors[:, j, None] <= E2CM_EXIT_SCORE))
                assert torch.equal(leaving, reached & says_exit)
                by_ic = leaving & ic_ok
                e2cm_alone = leaving & ~ic_ok
                expected = parts["cm_pred"][j] if rule == "or-e2cm-class" else parts["ic_pred"][j]
                assert torch.equal(answers[by_ic], parts["ic_pred"][j][None].expand_as(by_ic)[by_ic])
                assert torch.equal(answers[e2cm_alone], expected[None].expand_as(e2cm_alone)[e2cm_alone])
                if rule == "or-e2cm-class":
                    by_e2cm += int((e2cm_alone & (parts["cm_pred"][j] != parts["ic_pred"][j])[None]).sum())
            checked += int(leaving.sum())
    assert checked > 0 and by_e2cm > 0  # early exits happen, some with E²CM's own class: not vacuous
    assert curve.variants is not None and len(curve.test_cost) >= 1
    assert int(curve.variants.max()) < len(variants)  # every hull point names its variant
    assert bool((curve.calibration_accuracy.diff() >= 0).all())


def test_or_exits_at_least_as_early_as_the_ic_alone(consulting, curve_setup) -> None:
    """For the same T_ic the OR rule leaves no later than the IC alone (the OR rule at level 0, which is
    the confidence rule at level 0 too), and strictly earlier for some samples once E²CM speaks."""
    strategy, *_ = consulting
    _, traces, candidates, _ = curve_setup
    alone = traces[strategy.rules.index("or") * strategy.grid]
    assert torch.equal(alone.scores, traces[strategy.rules.index("confidence") * strategy.grid].scores)
    earlier = 0
    for rule in ("or", "or-e2cm-class"):
        speaking = traces[strategy.rules.index(rule) * strategy.grid + 1]
        for vectors in candidates:
            first_or, first_alone = speaking.first_exit(vectors), alone.first_exit(vectors)
            assert bool((first_or <= first_alone).all())
            earlier += int((first_or < first_alone).sum())
    assert earlier > 0


def test_default_rules_keep_the_plain_threshold_rule(consulting) -> None:
    """Without or-e2cm-class the strategy is a plain E2CMSDN: no detail, the core's threshold rule (and
    its batch-1 fast path); every answer is the IC's class, so the plain trace is exact."""
    strategy, *_ = consulting
    assert E2CMSDNParams().rules == list(DEFAULT_RULES) == ["same-class", "confidence", "or"]
    plain = E2CMSDN(strategy.backbone, strategy.context, grid=2)
    assert type(plain) is E2CMSDN and ExitPlan(plain).default_rule
    assert type(strategy) is E2CMSDNWithE2CMClass and not ExitPlan(strategy).default_rule
    assert len(plain.report().variants) == 6 and plain.report().variants[4] == "or, T_cm = +inf"
    assert plain.report().notes.endswith(plain.bank.placement_note()) and "% of backbone MACs" in plain.report().notes
    with pytest.raises(ValueError, match="rules"):
        E2CMSDN(strategy.backbone, strategy.context, rules=["majority"])
    with pytest.raises(ValueError):
        E2CMSDNParams(rules=["majority"])


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
    """The real executor (compaction, masking, batch 1) leaves each sample where the trace says, with the
    class it says, for every rule and T_cm level: or-e2cm-class's own decide and ConsultingTrace agree."""
    strategy, _, _, test = consulting
    subset = take(test, torch.arange(150))  # 8 variants x 4 threshold matrices x 3 modes: keep it short
    traces = compute_traces(strategy, subset, batch_size=100, device="cpu")
    assert len(traces) == VARIANTS
    assert_executor_matches(strategy, traces, subset.images, vectors=lambda v, t: threshold_vectors(t, (0.3, 0.9)),
                            mix=(0, 1))
    # a vector under which E²CM alone sends samples out with its own class: the executor answers so too
    variant = strategy.rules.index("or-e2cm-class") * strategy.grid + 1
    trace = traces[variant]
    vector = torch.full((1, trace.num_exits - 1), 1.5, dtype=torch.float64)  # T_ic > 1: E²CM alone decides
    exits, preds = executor_outcome(strategy, subset.images, vector.expand(150, -1),
                                    torch.full((150,), variant, dtype=torch.long), "compact")
    assert torch.equal(exits, trace.first_exit(vector)[0]) and torch.equal(preds, trace.predictions(vector)[0])
    early = exits < trace.num_exits - 1
    assert bool(early.any())
    ic_answers = trace.ic_pred[exits[early], early.nonzero()[:, 0]]
    assert bool((preds[early] != ic_answers).any())  # E²CM's class, not the IC's, for some samples


def test_a_fresh_strategy_loading_the_state_gives_the_same_traces(consulting, trained_resnet20, small_fmnist) -> None:
    """The T_cm grid (no module holds it) and the class means come back with the ICs."""
    strategy, _, _, test = consulting
    bundle = small_fmnist[0]
    model = copy.deepcopy(trained_resnet20)
    fresh = E2CMSDN(model, _context(model, bundle), grid=2, rules=ALL_RULES)
    assert not torch.equal(fresh.cm_thresholds, strategy.cm_thresholds)
    assert "cm_thresholds" in strategy.state_dict()
    assert_state_reloads(strategy, fresh, test)
    assert torch.equal(fresh.cm_thresholds, strategy.cm_thresholds)


def test_calibration_trace_reads_the_fit_distances_only_for_the_training_split(consulting) -> None:
    strategy, _, train, test = consulting
    assert strategy.split_traces(test) is None  # the test trace runs the images
    cached = strategy.split_traces(train)
    assert cached is not None and len(cached) == VARIANTS and cached[0].num_samples == len(train)
    assert all(isinstance(t, ConsultingTrace) and t.ic_conf.shape == (len(strategy.bank.stages), len(train))
               for t in cached)


def test_the_or_rules_pass_the_conformance_kit() -> None:
    """The whole cell flow (cached calibration trace, calibration, executor, state reload) with the OR rules,
    or-e2cm-class's own decide and trace among them; the default rules are checked by tests/test_conformance.py."""
    from eebench.testing import check_exit_strategy

    report = check_exit_strategy("e2cm+sdn", {"rules": ["or", "or-e2cm-class"], "grid": 2}, skip=("determinism",))
    assert report.method == "e2cm+sdn"
