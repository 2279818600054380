"""Class exclusion on a real (briefly trained) ResNet-20 and Fashion-MNIST images."""

from __future__ import annotations

import copy

import pytest
import torch

from eebench.calibration import build_curve
from eebench.costs import StageCosts
from eebench.strategy import MethodContext
from eebench.trace import compute_traces
from eebench_plugins.budgets import SamplesBudget
from eebench_plugins.class_exclusion import (
    ClassExclusion,
    ClassExclusionSearch,
    ClassExclusionTrace,
    exclusion_outcome,
    search_betas,
)


def one_sample(scores: list[torch.Tensor], final_logits: torch.Tensor, betas: list[float]) -> tuple[int, int]:
    """The reference LargeN._inference at batch 1 (with −inf masking at the end)."""
    alive = torch.ones(final_logits.numel(), dtype=torch.bool)
    for i, (s, beta) in enumerate(zip(scores, betas, strict=True)):
        if beta == 0 or beta == float("inf"):
            continue
        alive[int(s.argmax())] = True
        alive &= s > beta * s.max()
        if int(alive.sum()) == 1:
            return i, int(alive.nonzero()[0])
    return len(scores), int(final_logits.masked_fill(~alive, float("-inf")).argmax())


def test_batched_inference_equals_per_sample_inference() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 200, 6, generator=generator, dtype=torch.float64) ** 3
    logits = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    betas = torch.rand(5, 4, generator=generator, dtype=torch.float64) * 0.9
    betas[0, 1] = float("inf")  # an exit switched off
    betas[1, 2] = 0.0
    first, pred = exclusion_outcome(scores, logits, betas)
    for v in range(betas.shape[0]):
        for n in range(scores.shape[1]):
            expected = one_sample([scores[i, n] for i in range(4)], logits[n], betas[v].tolist())
            assert (int(first[v, n]), int(pred[v, n])) == expected
    assert bool((first < 4).any()) and bool((first == 4).any())  # both early exits and fall-throughs


def test_top_class_is_never_excluded_and_exit_means_one_class_left() -> None:
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 500, 10, generator=generator, dtype=torch.float64)
    logits = torch.randn(500, 10, generator=generator, dtype=torch.float64)
    betas = torch.tensor([[0.95, 0.95, 0.95], [0.5, 0.9, 0.99]], dtype=torch.float64)
    first, pred = exclusion_outcome(scores, logits, betas)
    for v in range(2):
        early = first[v] < 3
        assert bool(early.any())
        # the one class left is that exit's top class: the top class always survives
        top = scores.argmax(2).gather(0, first[v].clamp(max=2)[None])[0]
        assert bool((pred[v][early] == top[early]).all())
        for n in torch.nonzero(early).flatten().tolist()[:50]:
            i = int(first[v, n])
            s = scores[i, n]
            assert int((s > betas[v, i] * s.max()).sum()) >= 1
    # with every exit at β=0 nothing is excluded: all samples take the final classifier's argmax
    none_first, none_pred = exclusion_outcome(scores, logits, torch.zeros(1, 3, dtype=torch.float64))
    assert bool((none_first == 3).all()) and bool((none_pred[0] == logits.argmax(1)).all())


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


def test_search_keeps_accuracy_above_goal_and_curve_is_built(fitted) -> None:
    strategy, _, _, train, test = fitted
    [calibration] = compute_traces(strategy, train, batch_size=100, device="cpu")
    [on_test] = compute_traces(strategy, test, batch_size=100, device="cpu")
    assert isinstance(calibration, ClassExclusionTrace)
    start = float(calibration.outcome(torch.zeros(1, len(strategy.exit_stages)))[1].double().mean())
    order = list(range(len(strategy.exit_stages)))
    for tolerance in (0.0, 0.05, 0.2):
        betas = search_betas(calibration, order, tolerance)
        assert bool(((betas >= 0.01) & (betas <= 0.99)).all())
        accuracy = float(calibration.outcome(betas[None])[1].double().mean())
        clamped = bool((betas == 0.01).any())
        assert accuracy > start - tolerance or clamped
    costs = strategy.exit_costs()
    vectors = ClassExclusionSearch(tolerances=(0.0, 0.05, 0.2, 0.5)).thresholds(calibration, costs,
                                                                                  torch.Generator())
    curve = build_curve([calibration], [on_test], costs, [vectors])
    assert bool((curve.calibration_accuracy.diff() >= 0).all())
    assert float(curve.calibration_cost.min()) < 1.0  # exclusion does make samples leave early
