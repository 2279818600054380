"""The core owns the training budget (issue 12): every built-in method gets its data from the
Budget and is charged by it, stays within it, and a method that overspends fails its cell."""

from __future__ import annotations

import copy
import dataclasses
import time
from functools import partial

import pytest
import torch

from eebench.activations import ActivationCache
from eebench.api import (
    Charge,
    EebenchError,
    ExitCosts,
    ExitState,
    ExitStrategy,
    Spend,
    StepOutput,
    TrainingBudget,
)
from eebench.costs import StageCosts
from eebench.runner import Runner
from eebench.strategy import MethodContext
from eebench.suite import Suite, expand
from eebench_plugins.backbones.cifar_resnet import cifar_resnet
from eebench_plugins.budgets import EpochsBudget, SamplesBudget, SecondsBudget
from eebench_plugins.dec.backbone import dec_backbone

SAMPLES = 150  # below the 200-sample split: E²CM and E²CM+SDN cannot take the shared whole-split statistics
# A clock no method reaches on a loaded 2-core machine, with one epoch as the cap that really stops training:
# these tests check the ledger and the clock-budget code paths (no shared whole-split results), never
# wall-clock speed (no timed assertions); cutting by the clock is tested with strategies built to overrun.
SECONDS = 120.0
TINY_DEC = dict(recipe=dict(preset="quick", pretrain_iterations=10, finetune_iterations=40, batch_size=50,
                            update_interval=20, dec_max_iterations=40, kmeans_n_init=3, head_pretrain_iterations=20,
                            head_finetune_iterations=40))
PARAMS = {"dec-e2cm": TINY_DEC, "e2cm+sdn": {"grid": 2}, "bwds": {"lambdas": [0.01, 0.1, 1.0]}}


def _budget(kind: str, train_size: int):
    budget = {"epochs": lambda: EpochsBudget(1), "samples": lambda: SamplesBudget(SAMPLES),
              "seconds": lambda: TrainingBudget(max_samples=train_size, max_seconds=SECONDS)}[kind]()
    budget.bind(train_size)
    return budget


def _builtin_methods() -> list[str]:
    from eebench.plugins import default_registry

    owners = default_registry().owners["exit_strategies"]
    return sorted(name for name, owner in owners.items() if owner == "eebench")


class _Bench:
    """Tiny backbones (a quarter-width ResNet-20; DEC's encoder), one cache per budget kind (as a
    run shares one), and every fit memoised so the E²CM / E²CM+SDN comparison reuses them."""

    def __init__(self, registry, small_fmnist) -> None:
        self.registry = registry
        self.bundle, self.train, _ = small_fmnist
        torch.manual_seed(0)
        self.resnet = cifar_resnet(20, 10, self.bundle.input_shape, width=0.25).eval()
        self.dec = dec_backbone(10, self.bundle.input_shape).eval()
        self.costs = {"resnet": StageCosts.measure(self.resnet, self.bundle.input_shape),
                      "dec": StageCosts.measure(self.dec, self.bundle.input_shape)}
        self.caches = {kind: ActivationCache() for kind in ("epochs", "samples", "seconds")}
        self.fits: dict[tuple[str, str], tuple[ExitStrategy, object]] = {}

    def fit(self, method: str, kind: str):
        if (method, kind) not in self.fits:
            which = "dec" if method.startswith("dec") else "resnet"
            base = self.dec if which == "dec" else self.resnet
            fresh = partial(cifar_resnet, 20, 10, self.bundle.input_shape, width=0.25)
            context = MethodContext(10, self.bundle.input_shape, self.costs[which], torch.device("cpu"), seed=0,
                                    batch_size=100, train_batch_size=32, backbone_key=f"tiny-{which}",
                                    activations=self.caches[kind], fresh_backbone=fresh)
            torch.manual_seed(0)
            strategy = self.registry.get("exit_strategies", method)(copy.deepcopy(base), context,
                                                                   **PARAMS.get(method, {}))
            budget = _budget(kind, len(self.train))
            budget.start()  # as the runner does around fit
            strategy.fit(self.train, budget)
            budget.finish()
            self.fits[(method, kind)] = (strategy, budget)
        return self.fits[(method, kind)]


@pytest.fixture(scope="module")
def bench(registry, small_fmnist) -> _Bench:
    return _Bench(registry, small_fmnist)


@pytest.mark.parametrize("kind", ["epochs", "samples", "seconds"])
@pytest.mark.parametrize("method", _builtin_methods())
def test_every_builtin_method_stays_within_its_budget(bench, method: str, kind: str) -> None:
    _, budget = bench.fit(method, kind)
    spend = budget.spend
    assert budget.overspent() is None, budget.overspent()
    assert spend.samples > 0 and spend.training_macs > 0
    limit = {"epochs": len(bench.train), "samples": SAMPLES}.get(kind)
    if limit is not None:  # exact, whatever the method
        assert spend.samples <= limit and budget.utilisation() == {"samples": spend.samples / limit}
    else:
        assert set(budget.utilisation()) == {"samples", "seconds"} and budget.utilisation()["seconds"] < 1.0


@pytest.mark.parametrize("kind", ["epochs", "samples", "seconds"])
def test_e2cm_and_e2cm_sdn_take_their_class_means_on_the_same_samples(bench, kind: str) -> None:
    e2cm, e2cm_budget = bench.fit("e2cm", kind)
    consulting, consulting_budget = bench.fit("e2cm+sdn", kind)
    expected = {"epochs": len(bench.train), "samples": SAMPLES, "seconds": len(bench.train)}[kind]
    by_stage = dict(zip(e2cm.exit_stages, e2cm.exits, strict=True))
    for stage, means in zip(consulting.bank.stages, consulting.means, strict=True):
        assert int(means.counts.sum()) == expected
        assert torch.equal(means.counts, by_stage[stage].counts)
        assert torch.equal(means.sums, by_stage[stage].sums)  # the same samples, in the same batches
        assert torch.equal(means.divisors, by_stage[stage].divisors)
    # E²CM trains on them; E²CM+SDN reads them as statistics and leaves its samples to the ICs
    assert e2cm_budget.spend.samples == expected
    assert consulting_budget.spend.extra_forward_samples >= len(bench.train) + expected


def test_spend_is_read_only_to_plugins() -> None:
    budget = SamplesBudget(10)
    snapshot = budget.spend
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.samples += 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        budget.spend = Spend(samples=0)  # type: ignore[misc]
    assert budget.spend.samples == 0
    data = torch.utils.data.TensorDataset(torch.zeros(30, 1, 2, 2), torch.zeros(30, dtype=torch.long))
    assert sum(len(y) for _, y in budget.batches(data, 4, macs_per_sample=2.0)) == 10
    assert budget.spend.samples == 10 and budget.spend.training_macs == 20.0 and snapshot.samples == 0


def test_core_iterators_count_trim_split_and_charge() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(30.0).view(30, 1, 1, 1), torch.arange(30) % 3)
    budget = SamplesBudget(25)
    assert budget.covers(25) and not budget.covers(26)
    statistics = torch.cat([x.flatten() for x, _ in budget.statistics_batches(data, 4, macs_per_sample=1.0)])
    assert statistics.tolist() == list(range(25))  # the first samples in order, as many as the budget allows
    assert budget.spend.samples == 0 and budget.spend.extra_forward_samples == 25  # not training
    stream = budget.batches(data, 4, shuffle=False, epochs=1)
    first = [len(y) for _, y in stream.take(6, macs_per_sample=10.0)]  # a phase boundary splits a batch
    rest = [len(y) for _, y in stream.take(100, macs_per_sample=1.0)]
    assert first == [4, 2] and rest == [2, 4, 4, 4, 4, 1] and budget.spend.samples == 25  # trimmed to the budget
    assert budget.spend.training_macs == 25 * 1.0 + 6 * 10.0 + 19 * 1.0 and not budget.covers(1)
    indices = SamplesBudget(7)  # DEC's mini-batches: reshuffled every epoch by its generator, trimmed
    reference = torch.Generator().manual_seed(0)
    first_epoch, second_epoch = torch.randperm(5, generator=reference), torch.randperm(5, generator=reference)
    expected = [*first_epoch.split(2), second_epoch[:2]]
    drawn = list(indices.index_batches(5, 2, torch.Generator().manual_seed(0)))
    assert [i.tolist() for i in drawn] == [i.tolist() for i in expected]
    assert indices.spend.samples == 7 and indices.spend.batches == 4
    assert not SecondsBudget(3600).covers(1)  # a clock never certainly hands out anything


def test_a_shared_pass_costs_every_reader_the_same_seconds() -> None:
    cache = ActivationCache()

    def slow() -> int:
        time.sleep(0.2)
        return 1

    payer, reader = EpochsBudget(1), EpochsBudget(1)
    for budget in (payer, reader):
        budget.bind(10)
        budget.start()
        value = budget.read_shared(lambda: cache.read("base", cache, "slow", slow), Charge(forward_samples=10))
        budget.finish()
        assert value == 1 and budget.spend.extra_forward_samples == 10
    assert cache.computed == {"slow": 1}
    assert payer.spend.seconds >= 0.2 and reader.spend.seconds >= 0.2  # the reader pays the pass it did not run
    assert abs(payer.spend.seconds - reader.spend.seconds) < 0.1


# -------------------------------------------------------------- the runner's post-fit check


class _Stub(ExitStrategy):
    """Test strategies: the backbone's head is the one exit (never reached: fit fails the cell)."""

    def exit_taps(self) -> list[int]:
        return []

    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        scores, preds = torch.softmax(self.backbone.head(features), 1).max(1)
        return StepOutput(preds, scores)

    def exit_costs(self) -> ExitCosts:
        total = self.context.stage_costs.total
        return ExitCosts(torch.tensor([total], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), total)


class WholeSplitReader(_Stub):
    """Calls into the core wrongly: reads whole-split statistics without asking ``budget.covers``."""

    def fit(self, train, budget) -> None:
        self.shared_result(train, "greedy", lambda: 0, budget, Charge(samples=len(train), forward_samples=len(train)))


class KeepsWorking(_Stub):
    """Draws until the clock refuses, then keeps working (five steps' worth) after it is spent."""

    def fit(self, train, budget) -> None:
        for _ in budget.index_batches(len(train), 10, torch.Generator().manual_seed(0)):
            pass
        for _ in range(5):
            time.sleep(0.1)
            budget.charge_forward(1)


def _runner(registry, method: str, budget: dict) -> tuple[Runner, object]:
    factories = {kind: dict(table) for kind, table in registry.factories.items()}
    factories["exit_strategies"].update({"whole-split-reader": WholeSplitReader, "keeps-working": KeepsWorking})
    suite = Suite.model_validate({
        "name": "budget-ownership",
        "datasets": [{"name": "fashion-mnist", "per_class": 10, "test_subset": 50}],
        "backbones": [{"name": "resnet20", "params": {"width": 0.25}, "recipe": {"epochs": 0}}],
        "methods": [{"name": method}],
        "budgets": [budget],
        "targets": [0.5],
        "batch_size": 50,
        "train_batch_size": 25,
    })
    runner = Runner(suite, dataclasses.replace(registry, factories=factories), suite_path="suite.yaml",
                    device=torch.device("cpu"))
    [cell] = expand(suite)
    return runner, cell


@pytest.mark.parametrize(("method", "budget", "says"), [
    ("whole-split-reader", {"name": "samples", "params": {"samples": 50}}, "100 training samples"),
    ("keeps-working", {"name": "seconds", "params": {"seconds": 0.2}}, "s charged, 0.2 s allowed"),
])
def test_a_method_that_overspends_fails_its_cell_in_one_line(registry, method: str, budget: dict, says: str) -> None:
    runner, cell = _runner(registry, method, budget)
    with pytest.raises(EebenchError) as error:
        runner.run_cell(cell)
    message = str(error.value)
    assert "\n" not in message and f"method '{method}' overspent its budget" in message and says in message
    assert error.value.where == "suite.yaml" and error.value.key == "methods[0]"


def test_the_result_records_limits_and_utilisation(registry) -> None:
    runner, cell = _runner(registry, "e2cm", {"name": "samples", "params": {"samples": 50}})
    result = runner.run_cell(cell)
    assert result["budget"]["limits"] == {"samples": 50} and result["budget"]["utilisation"] == {"samples": 1.0}
    assert result["spend"]["samples"] == 50 and result["spend"]["extra_forward_samples"] == 50
