"""Class exclusion on a real (briefly trained) ResNet-20 and Fashion-MNIST images."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from eebench.calibration import build_curve
from eebench.costs import ExitCosts, StageCosts
from eebench.strategy import MethodContext
from eebench.testing import assert_executor_matches
from eebench.trace import compute_traces
from eebench_plugins.budgets import SamplesBudget
from eebench_plugins.class_exclusion import (
    ClassExclusion,
    ClassExclusionSearch,
    ClassExclusionTrace,
    exclusion_outcome,
    level_accuracies,
    search_betas,
    search_order,
)


def one_sample(scores: list[torch.Tensor], final_logits: torch.Tensor, betas: list[float]) -> tuple[int, int]:
    """The reference LargeN._inference at batch 1 (with −inf masking at the end), with the
    harness's fix that the current top class survives the β rule even at β ≥ 1."""
    alive = torch.ones(final_logits.numel(), dtype=torch.bool)
    for i, (s, beta) in enumerate(zip(scores, betas, strict=True)):
        if beta == 0 or beta == float("inf"):
            continue
        top = int(s.argmax())
        alive[top] = True
        keep = s > min(beta, 1.0) * s.max()
        keep[top] = True
        alive &= keep
        assert bool(alive[top])  # the top class at every evaluated exit is alive afterwards
        if int(alive.sum()) == 1:
            return i, int(alive.nonzero()[0])
    assert bool(alive.any())  # never an empty alive set
    return len(scores), int(final_logits.masked_fill(~alive, float("-inf")).argmax())


def plain_outcome(scores: torch.Tensor, logits: torch.Tensor,
                  betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rule written out on [V, N, K] boolean alive sets, every class compared at every exit (the
    implementation before packed sets): ([V, N] exit, [V, N] class, [V, N, K] alive sets at the end)."""
    heads, samples, k = scores.shape
    vectors = betas.shape[0]
    alive = torch.ones(vectors, samples, k, dtype=torch.bool)
    first = torch.full((vectors, samples), heads, dtype=torch.long)
    pred = torch.zeros(vectors, samples, dtype=torch.long)
    active = torch.ones(vectors, samples, dtype=torch.bool)
    for i in range(heads):
        beta = betas[:, i, None]  # [V, 1]
        top_value, top = scores[i].max(-1, keepdim=True)  # [N, 1]
        top = top.expand(vectors, samples, 1)
        keep = (scores[i] > beta.clamp(max=1.0)[..., None] * top_value).scatter(-1, top, True)
        now = torch.isfinite(beta) & (beta > 0) & active
        alive = torch.where(now[..., None], alive.scatter(-1, top, True) & keep, alive)
        leaving = now & (alive.sum(-1) == 1)
        first[leaving] = i
        pred = torch.where(leaving, alive.int().argmax(-1), pred)
        active &= ~leaving
    pred = torch.where(active, logits[None].masked_fill(~alive, float("-inf")).argmax(2), pred)
    return first, pred, alive


def plain_level_accuracies(trace: ClassExclusionTrace, betas: torch.Tensor, exit_index: int) -> torch.Tensor:
    """[99] accuracy with β[exit_index] = 0.01 .. 0.99, one full ``plain_outcome`` per level."""
    vectors = betas.repeat(99, 1)
    vectors[:, exit_index] = torch.tensor([round(k / 100, 12) for k in range(1, 100)], dtype=torch.float64)
    _, pred, _ = plain_outcome(trace.exclusion_scores, trace.final_logits, vectors)
    return (pred == trace.labels[None]).double().mean(1)


def assert_fast_equals_plain(trace: ClassExclusionTrace, vectors: torch.Tensor) -> None:
    """The packed, prefix-grouped evaluation and the one-pass level search against ``plain_outcome``,
    bit for bit: every vector's exits, classes and alive sets; every exit's 99 level accuracies from
    every searched state the vectors pass through (their prefixes, later exits off or as they are)."""
    scores, logits = trace.exclusion_scores, trace.final_logits
    fast = exclusion_outcome(scores, logits, vectors, with_alive=True)
    for got, expected in zip(fast, plain_outcome(scores, logits, vectors), strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(trace.outcome(vectors)[0], fast[0]) and torch.equal(trace.predictions(vectors), fast[1])
    levels = torch.tensor([round(k / 100, 12) for k in range(1, 100)], dtype=torch.float64)
    heads = scores.shape[0]
    for vector in vectors.where(vectors < 1, 0.0)[:6]:  # states in [0, 1) (0: off), as the search visits
        for exit_index in range(heads):
            for state in (torch.cat([vector[:exit_index], vector.new_zeros(heads - exit_index)]), vector):
                got = level_accuracies(trace, state, exit_index, levels)
                assert torch.equal(got, plain_level_accuracies(trace, state, exit_index)), (exit_index, state)


def tied_trace(samples: int, k: int, seed: int) -> ClassExclusionTrace:
    """Scores on a coarse grid (ties everywhere, ties at the max, all-zero rows), final logits with ties and
    rows of −inf: the corners where a shortcut could pick another class than the plain rule."""
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.rand(3, samples, k, generator=generator, dtype=torch.float64) * 4).floor() / 4
    scores[:, :5] = 0.0
    logits = (torch.randn(samples, k, generator=generator, dtype=torch.float64) * 2).round()
    logits[::7, : k - 1] = float("-inf")
    logits[::11] = float("-inf")
    labels = torch.randint(0, k, (samples,), generator=generator)
    labels[:3] = 0  # all-zero scores: the rule keeps class 0 (the first of the tied top) alone
    return ClassExclusionTrace(scores, logits, labels)


@pytest.mark.parametrize("k", [6, 70])  # 70 classes: two words per packed set
def test_fast_rule_and_level_search_equal_the_plain_rule_on_ties(k) -> None:
    trace = tied_trace(300, k, seed=k)
    vectors = torch.tensor([[0.3, 0.6, 0.9], [0.3, 0.6, 0.25], [0.3, 0.0, 0.75], [0.5, float("inf"), 0.5],
                            [0.25, 0.5, 1.0], [1.0, 0.3, 0.3], [0.0, 0.0, 0.0], [0.3, 0.6, 0.9]],
                           dtype=torch.float64)  # shared prefixes, β = 1, exits off, a repeated vector
    assert_fast_equals_plain(trace, vectors)


def test_batched_inference_equals_per_sample_inference() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 200, 6, generator=generator, dtype=torch.float64) ** 3
    logits = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    betas = torch.rand(7, 4, generator=generator, dtype=torch.float64) * 0.9
    betas[0, 1] = float("inf")  # an exit switched off
    betas[1, 2] = 0.0
    betas[5, 2] = 1.0  # β = 1 (and above) keeps only the top class
    betas[6] = torch.tensor([0.999, 0.0, 1.5, 0.99])
    first, pred = exclusion_outcome(scores, logits, betas)
    for v in range(betas.shape[0]):
        for n in range(scores.shape[1]):
            expected = one_sample([scores[i, n] for i in range(4)], logits[n], betas[v].tolist())
            assert (int(first[v, n]), int(pred[v, n])) == expected
    assert bool((first < 4).any()) and bool((first == 4).any())  # both early exits and fall-throughs


def test_beta_zero_switches_exclusion_off() -> None:
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 500, 10, generator=generator, dtype=torch.float64)
    logits = torch.randn(500, 10, generator=generator, dtype=torch.float64)
    # with every exit at β=0 nothing is excluded: all samples take the final classifier's argmax
    none_first, none_pred = exclusion_outcome(scores, logits, torch.zeros(1, 3, dtype=torch.float64))
    assert bool((none_first == 3).all()) and bool((none_pred[0] == logits.argmax(1)).all())


TRUE, WRONG = 2, 1  # class 0 is never the answer: an empty alive set would predict it


def hand_trace(samples: list[list[tuple[float, float]]]) -> ClassExclusionTrace:
    """Per sample and exit, (score of the true class 2, score of the wrong class 1); class 0
    scores 0. The final logits always favour the true class, so a sample is wrong only when
    an exit leaves it with the wrong class (or its alive set loses the true class)."""
    scores = torch.zeros(len(samples[0]), len(samples), 3, dtype=torch.float64)
    for n, per_exit in enumerate(samples):
        for j, (true, wrong) in enumerate(per_exit):
            scores[j, n, TRUE], scores[j, n, WRONG] = true, wrong
    logits = torch.zeros(len(samples), 3, dtype=torch.float64)
    logits[:, TRUE] = 1.0
    return ClassExclusionTrace(scores, logits, torch.full((len(samples),), TRUE, dtype=torch.long))


ALONE = (1.0, 0.0)  # the true class is the only one above any β: leaves correctly
UNSURE = (1.0, 0.9)  # true class on top, the wrong one close: stays for β < 0.9


def wrong_from(level: float) -> tuple[float, float]:
    """The wrong class on top and the true class at level − 0.005: the exit leaves with the
    wrong class from β = level on (on the 0.01 grid), and keeps both below."""
    return (round(level - 0.005, 6), 1.0)


@pytest.mark.parametrize(("samples", "tolerance", "expected"), [
    ([[ALONE]] * 10, 0.0, 0.01),  # accuracy equal to the goal fails at once: 0.01 − 0.02 clamps to 0.01
    ([[ALONE]] * 10, 0.05, 0.99),  # never failing up to 0.99: β = 0.99 (at 1.00 it would still pass)
    ([[wrong_from(0.99)]] + [[ALONE]] * 9, 0.05, 0.97),  # fails at 0.99: two steps back
    ([[wrong_from(0.05)]] + [[ALONE]] * 9, 0.05, 0.03),
    ([[wrong_from(0.02)]] + [[ALONE]] * 9, 0.05, 0.01),  # 0.02 − 0.02 = 0 clamps to 0.01
    # one error is within the tolerance 0.15, the second (at 0.38) is not: 0.36
    ([[wrong_from(0.05)], [wrong_from(0.38)]] + [[ALONE]] * 8, 0.15, 0.36),
])
def test_search_climbs_and_backs_off_exactly(samples, tolerance, expected) -> None:
    trace = hand_trace(samples)
    assert search_betas(trace, [0], tolerance).tolist() == [pytest.approx(expected, abs=1e-12)]


def order_sensitive_trace() -> ClassExclusionTrace:
    """Two exits; one error is allowed at tolerance 0.15 (10 samples). Exit 0 then exit 1
    gives β = [0.28, 0.03]; exit 1 then exit 0 gives β = [0.03, 0.48] (worked out by hand)."""
    return hand_trace([
        [wrong_from(0.05), ALONE],  # wrong at exit 0 from 0.05
        [wrong_from(0.30), ALONE],  # wrong at exit 0 from 0.30
        [UNSURE, wrong_from(0.05)],  # passes exit 0, wrong at exit 1 from 0.05
        [UNSURE, wrong_from(0.50)],  # passes exit 0, wrong at exit 1 from 0.50
    ] + [[ALONE, ALONE]] * 6)


def test_search_is_greedy_and_sequential_by_hand() -> None:
    trace = order_sensitive_trace()
    assert search_betas(trace, [0, 1], 0.15).tolist() == pytest.approx([0.28, 0.03], abs=1e-12)
    assert search_betas(trace, [1, 0], 0.15).tolist() == pytest.approx([0.03, 0.48], abs=1e-12)


def test_default_search_order_is_preceding_segment_macs_descending() -> None:
    trace = order_sensitive_trace()
    # exit 0 reaches 10 MACs, exit 1 40 (segment 30), the final exit 100: exit 1 is searched first
    costs = ExitCosts(torch.tensor([10.0, 40.0, 100.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                      100.0)
    assert search_order(costs) == [1, 0]
    [vector] = ClassExclusionSearch(tolerances=(0.15,), refine=False).thresholds(trace, costs, torch.Generator())
    assert vector.tolist() == pytest.approx([0.03, 0.48], abs=1e-12)
    # the other way round (segment before exit 0 the larger) searches exit 0 first
    costs = ExitCosts(torch.tensor([30.0, 40.0, 100.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                      100.0)
    [vector] = ClassExclusionSearch(tolerances=(0.15,), refine=False).thresholds(trace, costs, torch.Generator())
    assert vector.tolist() == pytest.approx([0.28, 0.03], abs=1e-12)


def reference_search(trace: ClassExclusionTrace, order: list[int], tolerance: float) -> list[float]:
    """Spec §6.4 written out plainly: β = 0.01, 0.02, … while accuracy > goal (up to 0.99),
    then two steps back from the first failing β, clamped to [0.01, 0.99]; 0.99 if none fails."""
    betas = [0.0] * trace.exclusion_scores.shape[0]

    def accuracy(vector: list[float]) -> float:
        _, pred, _ = plain_outcome(trace.exclusion_scores, trace.final_logits,
                                   torch.tensor([vector], dtype=torch.float64))
        return float((pred == trace.labels).double().mean())

    goal = accuracy(betas) - tolerance
    for j in order:
        chosen = 0.99
        for k in range(1, 100):
            betas[j] = k / 100
            if not accuracy(betas) > goal:
                chosen = min(max((k - 2) / 100, 0.01), 0.99)
                break
        betas[j] = chosen
    return betas


@pytest.fixture(scope="module")
def fitted(trained_resnet20, small_fmnist):
    bundle, train, test = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    context = MethodContext(10, bundle.input_shape, StageCosts.measure(model, bundle.input_shape),
                            torch.device("cpu"), seed=0, batch_size=100, train_batch_size=25)
    strategy = ClassExclusion(model, context, lr=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = SamplesBudget(300)
    budget.bind(len(train))
    strategy.fit(train, budget)
    return strategy, budget, before, train, test


def test_training_spends_the_budget_and_moves_backbone_and_heads(fitted) -> None:
    strategy, budget, before, train, _ = fitted
    assert budget.spend.samples == 300
    assert budget.spend.training_macs > 300 * strategy.context.stage_costs.total
    after = strategy.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # joint training touches the backbone
    assert strategy.pos_weight == 36.0  # 4·(K−1)
    n = len(strategy.exit_stages)
    assert strategy.loss_weights[0] == pytest.approx(1 / (n + 1)) and strategy.loss_weights[-1] == 0.5


def test_loss_is_ce_plus_weighted_bce(fitted) -> None:
    strategy, _, _, train, _ = fitted
    x, y = train.images[:8], train.labels[:8]
    with torch.no_grad():
        heads, final = strategy._forward(x)
    onehot = torch.nn.functional.one_hot(y, 10).float()
    expected = torch.nn.functional.cross_entropy(final, y)
    for i, logits in enumerate(heads):
        bce = -(36.0 * onehot * torch.nn.functional.logsigmoid(logits)
                + (1 - onehot) * torch.nn.functional.logsigmoid(-logits)).mean()
        expected = expected + bce / (len(heads) - i + 1)
    assert float(strategy.loss(heads, final, y)) == pytest.approx(float(expected), rel=1e-5)


@pytest.fixture(scope="module")
def traces(fitted):
    strategy, _, _, train, test = fitted
    [calibration] = compute_traces(strategy, train, batch_size=100, device="cpu")
    [on_test] = compute_traces(strategy, test, batch_size=100, device="cpu")
    assert isinstance(calibration, ClassExclusionTrace)
    return calibration, on_test


def test_top_class_survives_on_real_traces_even_at_beta_one(fitted, traces) -> None:
    strategy, *_ = fitted
    _, on_test = traces
    scores, logits = on_test.exclusion_scores, on_test.final_logits
    heads, samples, _ = scores.shape
    assert heads >= 3
    vectors = torch.tensor([[1.0] * heads, [0.999] * heads, [0.99] * heads, [0.95] * heads,
                            [0.0] * (heads - 1) + [1.0], [1.0] + [0.99] * (heads - 1)], dtype=torch.float64)
    first, pred, alive = exclusion_outcome(scores, logits, vectors, with_alive=True)
    assert bool(alive.any(2).all())  # no sample ever ends with an empty alive set
    assert bool(alive.gather(2, pred[:, :, None]).all())  # the predicted class is alive
    early = first < heads
    assert bool((alive.sum(2)[early] == 1).all())  # leaving means one class left
    top = scores.argmax(2)  # [J, N]
    left_with = top.gather(0, first.clamp(max=heads - 1))  # each sample's top class at its exit
    assert bool((pred[early] == left_with[early]).all())
    # β = 1 keeps only the top class: everyone leaves at the first exit it is on, with its top class
    assert bool((first[0] == 0).all()) and torch.equal(pred[0], top[0])
    assert bool((first[4] == heads - 1).all()) and torch.equal(pred[4], top[-1])
    assert bool((first[5] == 0).all())
    # the batched rule is the per-sample one (which checks the top class survives every exit)
    for v in range(vectors.shape[0]):
        for n in range(0, samples, 7):
            expected = one_sample([scores[i, n] for i in range(heads)], logits[n], vectors[v].tolist())
            assert (int(first[v, n]), int(pred[v, n])) == expected


def test_search_equals_the_plain_reference_loop_and_curve_is_built(fitted, traces) -> None:
    strategy, *_ = fitted
    calibration, on_test = traces
    heads = len(strategy.exit_stages)
    order = list(range(heads))
    found = []
    for tolerance in (0.0, 0.05, 0.2):
        betas = search_betas(calibration, order, tolerance)
        assert betas.tolist() == pytest.approx(reference_search(calibration, order, tolerance), abs=1e-12)
        found += betas.tolist()
    assert any(0.01 < b < 0.99 for b in found)  # the climb stopped inside the range somewhere
    costs = strategy.exit_costs()
    # default order: descending MACs of the backbone segment before each exit
    stage = strategy.context.stage_costs
    reach = [stage.through(s) for s in strategy.exit_stages]
    segments = [reach[0]] + [b - a for a, b in zip(reach, reach[1:], strict=False)]
    assert search_order(costs) == sorted(range(heads), key=lambda j: (-segments[j], j))
    assert len(set(segments)) > 1 and search_order(costs) != order  # the default order is not the exit order
    vectors = ClassExclusionSearch(tolerances=(0.0, 0.05, 0.2, 0.5), refine=False).thresholds(
        calibration, costs, torch.Generator())
    default = search_order(costs)
    for tolerance, vector in zip((0.0, 0.05, 0.2, 0.5), vectors, strict=True):
        assert vector.tolist() == pytest.approx(search_betas(calibration, default, tolerance).tolist(), abs=1e-12)
    curve = build_curve([calibration], [on_test], costs, [vectors])
    assert bool((curve.calibration_accuracy.diff() >= 0).all())
    assert float(curve.calibration_cost.min()) < 1.0  # exclusion does make samples leave early


def test_fast_search_and_evaluation_equal_the_plain_rule_on_real_traces(fitted, traces) -> None:
    """The calibrator's own candidates (every default tolerance, refined) on the real calibration and test
    traces: the packed, grouped evaluation and the one-pass level accuracies equal the plain rule exactly."""
    strategy, *_ = fitted
    calibration, on_test = traces
    vectors = ClassExclusionSearch().thresholds(calibration, strategy.exit_costs(), torch.Generator())
    assert vectors.shape[0] > 100
    for trace in (calibration, on_test):
        first, pred, _ = plain_outcome(trace.exclusion_scores, trace.final_logits, vectors)
        assert torch.equal(trace.outcome(vectors)[0], first) and torch.equal(trace.predictions(vectors), pred)
    assert_fast_equals_plain(calibration, vectors[torch.linspace(0, vectors.shape[0] - 1, 12).long()])


def test_refined_candidates_reach_below_the_searched_ones(fitted, traces) -> None:
    """``refine`` adds each searched vector with one exit at β = 1 and each exit alone at β = 1: the
    hull then reaches cheaper points than the search's 0.99 cap, and keeps every searched vector."""
    strategy, *_ = fitted
    calibration, on_test = traces
    costs = strategy.exit_costs()
    tolerances = (0.0, 0.05, 0.2)
    searched = ClassExclusionSearch(tolerances=tolerances, refine=False).thresholds(calibration, costs,
                                                                                     torch.Generator())
    refined = ClassExclusionSearch(tolerances=tolerances).thresholds(calibration, costs, torch.Generator())
    rows = {tuple(r) for r in refined.tolist()}
    assert {tuple(r) for r in searched.tolist()} <= rows
    heads = searched.shape[1]
    for vector in searched:
        for j in range(heads):
            neighbour = vector.clone()
            neighbour[j] = 1.0
            assert tuple(neighbour.tolist()) in rows
    alone = torch.full((heads, heads), math.inf, dtype=torch.float64).fill_diagonal_(1.0)
    assert {tuple(r) for r in alone.tolist()} <= rows
    cheapest = {name: float(build_curve([calibration], [on_test], costs, [v]).calibration_cost.min())
                for name, v in (("searched", searched), ("refined", refined))}
    first_exit_cost = float(costs.normalised()[0])
    assert cheapest["refined"] < cheapest["searched"]
    assert cheapest["refined"] <= first_exit_cost + 1e-12  # everyone leaving at the first exit is on the table


def test_the_executor_keeps_the_alive_sets_of_the_trace(fitted, traces) -> None:
    """The executor (alive sets in the per-sample state, exited rows leaving the batch) takes the
    trace's decisions exactly, under the searched β vectors and hand-made ones (exits off by +inf
    and by β = 0, β = 1 keeping the top class alone)."""
    strategy, *_, test = fitted
    calibration, on_test = traces
    strategy.eval()
    searched = ClassExclusionSearch(tolerances=(0.02, 0.1, 0.3), refine=False).thresholds(
        calibration, strategy.exit_costs(), torch.Generator())
    heads = on_test.num_exits - 1
    hand = searched[-1].repeat(3, 1)  # the loosest tolerance: exits at several heads
    hand[0, 1] = math.inf  # an exit switched off
    hand[1, ::2] = 0.0  # β = 0: off too, but its head still runs
    hand[2] = searched[-2]
    hand[2, heads // 2] = 1.0  # everyone still running leaves here with its top class
    vectors = torch.cat([searched, hand])
    first, pred = exclusion_outcome(on_test.exclusion_scores, on_test.final_logits, vectors)
    assert torch.equal(on_test.outcome(vectors)[0], first)  # the trace's own outcome and prediction
    assert torch.equal(on_test.outcome(vectors)[1], pred == test.labels)
    assert torch.equal(on_test.predictions(vectors), pred)
    mix = (len(searched) - 1, len(searched) + 1)  # rows alternate: the loosest searched β and hand[1]
    assert_executor_matches(strategy, [on_test], test.images, list(vectors), mix=mix)
    assert bool((first < heads).any()) and bool((first == heads).any())  # early exits and fall-throughs
    assert not torch.equal(first[mix[0]], first[mix[1]])  # the mixed rows really differ


def test_state_dict_restores_the_exits_exactly(fitted, traces, trained_resnet20) -> None:
    strategy, *_, test = fitted
    _, on_test = traces
    fresh = ClassExclusion(copy.deepcopy(trained_resnet20), strategy.context, lr=0.01)
    fresh.load_state_dict(copy.deepcopy(strategy.state_dict()))
    [again] = compute_traces(fresh, test, batch_size=100, device="cpu")
    assert torch.equal(again.exclusion_scores, on_test.exclusion_scores)
    assert torch.equal(again.final_logits, on_test.final_logits)
