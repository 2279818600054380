"""The executor (``eebench.stepping.run_early_exit``) against the trace, on a real backbone.

Two small strategies written against the public contract: a threshold rule with two rule
variants, and a chained rule (the running most-confident exit) that carries per-sample state.
Their exit heads are untrained linear probes: exactness does not need accurate exits, only the
same per-exit calls. Whatever the mode (batch 1, compacted, masked) and whatever per-row
threshold matrix, the executor must leave every sample at the trace's exit with its prediction.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eebench.api import (
    ExitState,
    ExitStrategy,
    MethodContext,
    MethodReport,
    StageCosts,
    StepOutput,
    exit_costs_at,
    seeded_modules,
)
from eebench.inference import EarlyExitNetwork, ExitPolicy, thresholds_from_json
from eebench.passes import iterate_batches
from eebench.policy import runs_high
from eebench.stepping import run_early_exit
from eebench.testing import assert_executor_matches, threshold_vectors
from eebench.trace import compute_traces, thresholds_to_json


class Probes(ExitStrategy):
    """GAP + Linear at every other exit point; two variants: max softmax, and its square."""

    strict = True

    def __init__(self, backbone, context) -> None:
        super().__init__(backbone, context)
        last = len(backbone.stages) - 1
        self.taps = [p for p in backbone.exit_points if p < last][::2]
        shapes = context.stage_costs.stage_shapes
        self.heads = seeded_modules(context.seed, context.device, lambda: nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shapes[s][0], context.num_classes))
            for s in self.taps))

    def fit(self, train, budget) -> None:  # untrained probes: exactness needs no accuracy
        pass

    def exit_taps(self) -> list[int]:
        return self.taps

    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        logits = self.heads[j](features) if j < len(self.taps) else self.backbone.head(features)
        best = torch.softmax(logits.double(), 1).max(1)
        return StepOutput(torch.stack([best.indices, best.indices]), torch.stack([best.values, best.values ** 2]))

    def exit_costs(self):
        return exit_costs_at(self.context.stage_costs, self.taps, [1000.0] * len(self.taps))

    def report(self) -> MethodReport:
        return MethodReport(exit_names=[f"p{s}" for s in self.taps] + ["final"], variants=["p", "p²"])

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.heads]


class RunningBest(Probes):
    """Chained: each exit answers with the most confident exit so far (state: best score and class)."""

    chained = True

    def init_state(self, x: torch.Tensor) -> ExitState:
        rows = x.shape[0]
        return {"score": torch.full((rows,), -1.0, dtype=torch.float64, device=x.device),
                "pred": torch.zeros(rows, dtype=torch.long, device=x.device)}

    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        out = super().exit_step(j, features, state)
        better = out.scores[0] > state["score"]
        state["score"] = torch.where(better, out.scores[0], state["score"])
        state["pred"] = torch.where(better, out.preds[0], state["pred"])
        return StepOutput(state["pred"].clone(), state["score"].clone())

    def report(self) -> MethodReport:
        return MethodReport(exit_names=[f"p{s}" for s in self.taps] + ["final"])


def _strategy(kind, model, bundle) -> ExitStrategy:
    context = MethodContext(bundle.num_classes, bundle.input_shape, StageCosts.measure(model, bundle.input_shape),
                            torch.device("cpu"), seed=3)
    return kind(model, context)


def _images(test) -> torch.Tensor:
    return torch.cat([x for x, _ in iterate_batches(test, 100)])


@pytest.mark.parametrize("kind", [Probes, RunningBest])
def test_executor_equals_the_trace_in_every_mode(kind, trained_resnet20, small_fmnist) -> None:
    bundle, _, test = small_fmnist
    strategy = _strategy(kind, trained_resnet20, bundle)
    traces = compute_traces(strategy, test, batch_size=100, device="cpu")
    images = _images(test)[:60]  # the traces' first 60 samples; batch 1 runs them all
    # the mixed rows alternate the 0.3 vector and one with exit 0 off: rows with an exit on and off in one batch
    assert_executor_matches(strategy, traces, images, batch_size=32, batch1_samples=60, mix=(0, 3))
    for trace in traces:  # the exits really take samples out early: some leave before the final exit
        assert bool((trace.first_exit(threshold_vectors(trace)[0][None])[0, :60] < trace.num_exits - 1).any())


def test_a_phi_policy_from_a_result_runs_the_same_mixture_as_the_leaderboard(trained_resnet20,
                                                                          small_fmnist) -> None:
    """ExitPolicy.from_result lays out the two hull vertices per sample position exactly as
    ``eebench.policy.runs_high`` does, so the network's exits are the policy's on the trace."""
    bundle, _, test = small_fmnist
    strategy = _strategy(Probes, trained_resnet20, bundle)
    trace = compute_traces(strategy, test, batch_size=100, device="cpu")[1]
    high, _, low, _ = threshold_vectors(trace)
    result = {"curve": {"thresholds": [thresholds_to_json(low), thresholds_to_json(high)], "variants": [1, 1]},
              "accuracy_at": {"0.4": {"points": [0, 1], "weight": 0.35, "mixing_seed": 11}}}
    policy = ExitPolicy.from_result(result, "0.4")
    assert torch.equal(thresholds_from_json(thresholds_to_json(low)), low)
    images = _images(test)
    network = EarlyExitNetwork(strategy, policy, images.shape[0], "cpu")
    got_exit, got_pred = network.predict(images, 64, "compact")
    pick = runs_high(images.shape[0], 0.35, 11)
    want_exit = torch.where(pick, trace.first_exit(high[None])[0], trace.first_exit(low[None])[0])
    assert torch.equal(got_exit, want_exit)
    assert torch.equal(got_pred, trace.preds.gather(0, want_exit[None])[0])
    assert 0 < int(pick.sum()) < images.shape[0]  # both vertices are really used


def test_an_exit_no_row_uses_is_not_run(trained_resnet20, small_fmnist) -> None:
    """With exit 0 off for every row, its head is never asked (the MAC model does not charge it)."""
    bundle, _, test = small_fmnist
    strategy = _strategy(Probes, trained_resnet20, bundle)
    asked: list[int] = []
    step = strategy.exit_step
    strategy.exit_step = lambda j, f, s: asked.append(j) or step(j, f, s)
    images = _images(test)[:8]
    thresholds = torch.full((8, strategy.num_exits() - 1), 0.99, dtype=torch.float64)
    thresholds[:, 0] = float("inf")
    run_early_exit(strategy, images, thresholds)
    assert 0 not in asked
    assert asked  # later exits were asked
