"""BWDS (spec §4.1 proposal) on a real, briefly trained ResNet-20 and real Fashion-MNIST."""

from __future__ import annotations

import copy

import pytest
import torch

from eebench.api import EebenchError
from eebench.calibration import build_curve
from eebench.costs import StageCosts
from eebench.datasets import take
from eebench.lazy import resolve
from eebench.strategy import MethodContext
from eebench.testing import assert_executor_matches, assert_state_reloads
from eebench.trace import compute_traces
from eebench_plugins.budgets import EpochsBudget, SamplesBudget, SecondsBudget
from eebench_plugins.bwds import (
    BWDS,
    DEFAULT_LAMBDAS,
    continue_value,
    exit_values,
    phase_shares,
    policy_macs,
    wbc_targets,
)
from eebench_plugins.calibrators import PerExitBisection

EPOCHS = 30  # 6 phases (one per decision function, its IC trained alongside) of 5 epochs of the 200 samples


def ic_state(strategy: BWDS) -> list[list[torch.Tensor]]:
    return [[p.detach().clone() for p in ic.parameters()] for ic in strategy.bank.ics]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def make_context(model, bundle) -> MethodContext:
    costs = StageCosts.measure(model, bundle.input_shape)
    return MethodContext(bundle.num_classes, bundle.input_shape, costs, torch.device("cpu"), seed=0,
                         batch_size=100, train_batch_size=32, backbone_key="test-resnet20")


@pytest.fixture(scope="module")
def fitted(trained_resnet20, small_fmnist):
    bundle, train, test = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = BWDS(model, make_context(model, bundle))
    budget = EpochsBudget(EPOCHS)
    budget.bind(len(train))
    strategy.fit(train, budget)
    strategy.eval()
    return strategy, budget, before


@pytest.fixture(scope="module")
def curve_and_traces(fitted, small_fmnist):
    strategy, *_ = fitted
    _, train, test = small_fmnist
    calibration = compute_traces(strategy, train, batch_size=100, device="cpu")
    traces = compute_traces(strategy, test, batch_size=100, device="cpu")
    costs = strategy.exit_costs()
    candidates = [PerExitBisection(targets=100).thresholds(t, costs, torch.Generator().manual_seed(0))
                  for t in calibration]
    return build_curve(calibration, traces, costs, candidates), calibration, traces


def test_wbc_labels_and_weights_match_a_hand_computed_case() -> None:
    # 4 samples, 2 IC exits + final; normalised costs 0.25, 0.5, 1.0; three λ
    losses = torch.tensor([[0, 1, 1, 0],  # IC 0
                           [0, 0, 1, 1],  # IC 1
                           [0, 0, 0, 1]], dtype=torch.float64)  # final
    costs = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    lambdas = torch.tensor([0.1, 1.0, 4.0], dtype=torch.float64)
    values = exit_values(losses, costs, lambdas)  # [Λ, 3, 4]
    assert values[2, 1].tolist() == [2.0, 2.0, 3.0, 3.0]

    # exit 1 (last IC): V_2 = ℓ_final + λ·1.0, E_1 = ℓ_1 + λ·0.5
    v2 = continue_value(values[:, 2:], torch.zeros(3, 0, 4, dtype=torch.bool))
    labels, weights = wbc_targets(losses[1], v2, 0.5, lambdas)
    assert labels.tolist() == [[1, 1, 0, 1], [1, 1, 0, 1], [1, 1, 1, 1]]  # sample 2 flips at λ = 4
    expected_w = [[0.05, 0.05, 0.95, 0.05], [0.5, 0.5, 0.5, 0.5], [2.0, 2.0, 1.0, 2.0]]
    assert torch.allclose(weights, torch.tensor(expected_w, dtype=torch.float64))

    # γ_1 (fixed, as if trained) follows its labels; V_1 = E_1 where it exits, else V_2
    gamma1 = labels.bool()[:, None, :]
    v1 = continue_value(values[:, 1:], gamma1)
    assert torch.allclose(v1, torch.tensor([[0.05, 0.05, 0.1, 1.05], [0.5, 0.5, 1.0, 1.5], [2.0, 2.0, 3.0, 3.0]],
                                           dtype=torch.float64))
    # exit 0: E_0 = ℓ_0 + λ·0.25
    labels0, weights0 = wbc_targets(losses[0], v1, 0.25, lambdas)
    assert labels0.tolist() == [[1, 0, 0, 1], [1, 0, 0, 1], [1, 0, 1, 1]]  # sample 2 flips at λ = 4
    expected_w0 = [[0.025, 0.975, 0.925, 1.025], [0.25, 0.75, 0.25, 1.25], [1.0, 0.0, 1.0, 2.0]]
    assert torch.allclose(weights0, torch.tensor(expected_w0, dtype=torch.float64))
    assert weights0[2, 1].item() == 0.0  # E_0 == V_1 exactly: zero weight, dropped from the loss


def test_policies_train_backwards_and_values_propagate(trained_resnet20, small_fmnist, fitted, monkeypatch) -> None:
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    order: list[int] = []
    original = BWDS._train_policy

    def recording(self, j, *args, **kwargs):
        order.append(j)
        trained = [k for k in range(len(self.bank.stages)) if self.policies.weight[k].abs().sum() > 0]
        assert all(k > j for k in trained)  # every policy already trained lies downstream of j
        # per-exit: the ICs trained so far are exactly the downstream ones; IC j is still at its init
        moved = [k for k, (now, init) in enumerate(zip(ic_state(self), initial, strict=True)) if not same(now, init)]
        assert moved == list(range(j + 1, len(self.bank.stages)))
        return original(self, j, *args, **kwargs)

    monkeypatch.setattr(BWDS, "_train_policy", recording)
    strategy = BWDS(model, make_context(model, bundle))
    initial = ic_state(strategy)
    budget = SamplesBudget(700)
    budget.bind(len(train))
    strategy.fit(train, budget)
    assert order == [5, 4, 3, 2, 1, 0]
    assert [name for name, _ in strategy.phase_log] == [f"ic{j}+policy{j}" for j in order]

    # V_{j+1} is E at the first downstream exit whose (trained) policy exits, else E at the final exit
    trained, *_ = fitted
    acts = trained.cached_activations(train, "sdn-pool")
    features = [acts.features[s] for s in trained.bank.stages]
    rows = torch.arange(len(train))
    inputs, losses = trained.decision_inputs(rows, features, acts.logits, acts.labels)
    values = exit_values(losses, trained.exit_costs().normalised(), trained.lambdas)  # [Λ, 7, N]
    exits = trained.downstream_exits(inputs, 0)  # [Λ, 6, N]
    num_ics = len(trained.bank.stages)
    early = at_final = 0
    for j in range(num_ics):
        v_next = continue_value(values[:, j + 1:], exits[:, j + 1:])
        # reference: index of the first downstream exit that says exit (the final exit if none)
        says_exit = torch.cat([exits[:, j + 1:], torch.ones_like(exits[:, :1])], dim=1)
        first = says_exit.int().argmax(1)  # [Λ, N], 0 = exit j+1
        assert torch.equal(v_next, values[:, j + 1:].gather(1, first[:, None])[:, 0])
        early += int((first < num_ics - j - 1).sum())
        at_final += int((first == num_ics - j - 1).sum())
    assert early > 0 and at_final > 0  # both branches were exercised


def test_budget_gives_each_decision_function_its_phase_and_trains_its_ic_there(
        trained_resnet20, small_fmnist, monkeypatch) -> None:
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    strategy = BWDS(model, make_context(model, bundle))
    assert strategy.schedule == "per-exit"
    num_ics = len(strategy.bank.stages)
    assert num_ics == 6
    budget = SamplesBudget(500)
    budget.bind(len(train))
    ic_rows: list[int] = []  # samples IC 0 was trained on (its forward with gradients, in train mode)
    first = strategy.bank.ics[0]
    forward = first.forward_pooled
    monkeypatch.setattr(first, "forward_pooled",
                        lambda pair, extra=None: (torch.is_grad_enabled() and first.training
                                                  and ic_rows.append(len(pair))) or forward(pair, extra))
    policy_rows: dict[int, int] = {}
    inputs = strategy.decision_inputs

    def recording(rows, *args, start=0, **kwargs):
        assert not any(ic.training for ic in strategy.bank.ics)  # policy inputs come from ICs in eval mode
        policy_rows[start] = policy_rows.get(start, 0) + int(rows.numel())
        return inputs(rows, *args, start=start, **kwargs)

    monkeypatch.setattr(strategy, "decision_inputs", recording)
    changed: dict[int, list[int]] = {}  # phase j -> the ICs whose weights moved during it
    train_policy = strategy._train_policy

    def phase(j, *args, **kwargs):
        before = ic_state(strategy)
        train_policy(j, *args, **kwargs)
        changed[j] = [k for k, (a, b) in enumerate(zip(before, ic_state(strategy), strict=True)) if not same(a, b)]

    monkeypatch.setattr(strategy, "_train_policy", phase)
    strategy.fit(train, budget)
    shares = phase_shares(500, len(train), num_ics)
    assert shares == [84, 84, 83, 83, 83, 83]
    assert sum(n for _, n in strategy.phase_log) == 500 == budget.spend.samples  # the core counted them
    assert strategy.phase_log == [(f"ic{j}+policy{j}", n) for j, n in zip(range(5, -1, -1), shares, strict=True)]
    assert [policy_rows[j] for j in range(5, -1, -1)] == shares  # each policy gets planned / J samples
    assert sum(ic_rows) == shares[-1]  # IC 0 trained on exactly its policy's phase, the last one
    assert changed == {j: [j] for j in range(num_ics)}  # IC j trained in phase j, and only there
    assert budget.spend.extra_forward_samples == len(train)
    expected_macs = len(train) * strategy.context.stage_costs.total + sum(
        n * (strategy._policy_phase_macs(j) + 3.0 * strategy.bank.macs()[j])
        for j, n in zip(range(5, -1, -1), shares, strict=True))
    assert budget.spend.training_macs == pytest.approx(expected_macs)

    # under epochs: J (the paper's 6 epochs for 6 exits) that is one epoch per decision function
    epochs = BWDS(copy.deepcopy(trained_resnet20), make_context(model, bundle))
    six = EpochsBudget(num_ics)
    six.bind(len(train))
    epochs.fit(train, six)
    assert [n for _, n in epochs.phase_log] == [len(train)] * num_ics and six.spend.samples == num_ics * len(train)

    # no plan (a seconds budget): one epoch of the training split per phase, in order
    seconds = BWDS(copy.deepcopy(trained_resnet20), make_context(model, bundle))
    clock = SecondsBudget(60)
    clock.bind(len(train))
    seconds.fit(train, clock)
    assert [n for _, n in seconds.phase_log] == [len(train)] * 6 and clock.spend.samples == 6 * len(train)


def test_ics_first_schedule_keeps_the_equal_split_over_ics_and_policies(
        trained_resnet20, small_fmnist, monkeypatch) -> None:
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    strategy = BWDS(model, make_context(model, bundle), schedule="ics-first")
    budget = SamplesBudget(500)
    budget.bind(len(train))
    ic_rows: list[int] = []  # samples the ICs were trained on (the IC forward with gradients)
    first = strategy.bank.ics[0]
    forward = first.forward_pooled
    monkeypatch.setattr(first, "forward_pooled",
                        lambda pair, extra=None: (torch.is_grad_enabled() and ic_rows.append(len(pair)))
                        or forward(pair, extra))
    policy_rows: dict[int, int] = {}
    inputs = strategy.decision_inputs

    def recording(rows, *args, start=0, **kwargs):
        policy_rows[start] = policy_rows.get(start, 0) + int(rows.numel())
        return inputs(rows, *args, start=start, **kwargs)

    monkeypatch.setattr(strategy, "decision_inputs", recording)
    frozen: list[bool] = []
    train_policy = strategy._train_policy

    def phase(j, *args, **kwargs):
        before = ic_state(strategy)
        train_policy(j, *args, **kwargs)
        frozen.append(all(same(a, b) for a, b in zip(before, ic_state(strategy), strict=True)))

    monkeypatch.setattr(strategy, "_train_policy", phase)
    strategy.fit(train, budget)
    shares = phase_shares(500, len(train), 7)
    assert shares == [72, 72, 72, 71, 71, 71, 71]
    assert budget.spend.samples == 500
    assert strategy.phase_log == list(zip(["ics"] + [f"policy{j}" for j in range(5, -1, -1)], shares, strict=True))
    assert sum(ic_rows) == shares[0]
    assert [policy_rows[j] for j in range(5, -1, -1)] == shares[1:]
    assert frozen == [True] * 6  # the ICs do not move in the policy phases

    with pytest.raises(EebenchError, match="schedule must be one of") as error:
        BWDS(copy.deepcopy(trained_resnet20), make_context(model, bundle), schedule="joint")
    assert error.value.key == "schedule"


def test_outputs_costs_and_variants(fitted, small_fmnist) -> None:
    strategy, budget, _ = fitted
    _, _, test = small_fmnist
    out = strategy.exit_outputs(test.images[:50])
    assert out.preds.shape == out.scores.shape == (25, 7, 50)
    variants = strategy.report().variants
    assert len(variants) == 25 and variants[0] == "λ=0.0001"
    assert strategy.strict and len(DEFAULT_LAMBDAS) == 25
    assert DEFAULT_LAMBDAS[0] == pytest.approx(1e-4) and DEFAULT_LAMBDAS[-1] == pytest.approx(10.0)
    head = torch.softmax(strategy.backbone(test.images[:50]).double(), 1)
    assert torch.equal(out.preds[:, -1], head.argmax(1)[None].expand(25, -1))
    assert torch.allclose(out.scores[:, -1], head.max(1).values[None].expand(25, -1))
    assert bool(((out.scores[:, :-1] > 0) & (out.scores[:, :-1] < 1)).all())  # exit probabilities
    costs = strategy.exit_costs()
    # sort K·ceil(log2 K) + softmax 3K + entropy 2K (log, multiply-add: the core's cost table,
    # issue 12; it was 3K) + ÷ ln K + linear K+2 (K=10)
    per_policy = 10 * 4 + 30 + 20 + 1 + 12
    assert policy_macs(10) == per_policy
    expected = [ic.macs() + per_policy for ic in strategy.bank.ics] + [0.0]
    assert costs.overhead_macs.tolist() == pytest.approx(expected)
    assert costs.backbone_macs[-1].item() == costs.reference_macs
    assert budget.spend.samples == EPOCHS * 200


def test_curve_mixes_lambdas_and_lambda_trades_accuracy_for_cost(fitted, curve_and_traces) -> None:
    strategy, *_ = fitted
    curve, calibration, _ = curve_and_traces
    assert len(calibration) == 25
    assert curve.variants is not None and len(set(curve.variants.tolist())) > 1
    assert bool((curve.calibration_cost.diff() > 0).all())
    assert bool((curve.calibration_accuracy.diff() >= 0).all())
    costs = strategy.exit_costs()
    half = torch.full((1, calibration[0].num_exits - 1), 0.5, dtype=torch.float64)
    mean_cost = [trace.evaluate(half, costs).cost.item() for trace in calibration]
    assert mean_cost[-1] < mean_cost[0] - 0.1  # λ = 10 exits far earlier than λ = 1e-4
    assert mean_cost[-1] < 0.5 < mean_cost[0]


def test_frozen_backbone_is_bit_identical_after_fit(fitted) -> None:
    strategy, _, before = fitted
    after = strategy.backbone.state_dict()
    assert any(k.endswith("running_mean") for k in after)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_registered_as_bwds(registry) -> None:
    assert resolve(registry.get("exit_strategies", "bwds")) is BWDS  # registered lazily


@pytest.fixture(scope="module")
def three_lambdas(trained_resnet20, small_fmnist):
    """BWDS with three λ (three rule variants), one epoch per decision function."""
    bundle, train, _ = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    strategy = BWDS(model, make_context(model, bundle), lambdas=[0.01, 0.1, 1.0])
    budget = EpochsBudget(6)
    budget.bind(len(train))
    strategy.fit(train, budget)
    strategy.eval()
    return strategy


def test_executor_matches_the_trace_for_every_lambda(three_lambdas, small_fmnist) -> None:
    _, _, test = small_fmnist
    subset = take(test, torch.arange(150))  # 3 variants x 5 threshold matrices x 3 modes: keep it short
    traces = compute_traces(three_lambdas, subset, batch_size=100, device="cpu")
    assert len(traces) == 3
    assert_executor_matches(three_lambdas, traces, subset.images)


def test_a_fresh_bwds_loading_the_state_gives_the_same_traces(three_lambdas, trained_resnet20, small_fmnist) -> None:
    """The decision functions (and ICs) come back from the state: the reloaded exits are the fitted ones."""
    bundle, _, test = small_fmnist
    model = copy.deepcopy(trained_resnet20)
    fresh = BWDS(model, make_context(model, bundle), lambdas=[0.01, 0.1, 1.0])
    assert all(bool((w == 0).all()) for w in fresh.policies.weight)  # untrained: the state must bring them
    assert_state_reloads(three_lambdas, fresh, test)


def test_placement_reaches_the_bank_and_the_notes(registry) -> None:
    """Issue 13: BWDS places its ICs as SDN does (nearest by default, first-at-least on request) and says
    where they sit in its notes and fit_info."""
    model = registry.get("backbones", "resnet20")(10, (1, 28, 28)).eval()
    costs = StageCosts.measure(model, (1, 28, 28))
    context = MethodContext(10, (1, 28, 28), costs, torch.device("cpu"), seed=0)
    nearest = BWDS(model, context, lambdas=[0.1])
    old = BWDS(model, context, lambdas=[0.1], placement="first-at-least")
    assert old.bank.stages == [2, 3, 5, 6, 7, 8] and nearest.bank.stages[0] == 1
    assert nearest.exit_taps() == nearest.bank.stages
    shares = "/".join(f"{100 * costs.through(s) / costs.total:.1f}" for s in nearest.bank.stages)
    report = nearest.report()
    assert report.notes.startswith(BWDS.notes) and f"ICs at {shares} % of backbone MACs" in report.notes
    assert report.fit_info["ic_stages"] == nearest.bank.stages and report.fit_info["placement"] == "nearest"
    with pytest.raises(EebenchError) as error:
        BWDS(model, context, placement="last")
    assert error.value.key == "placement"
