"""E²CM and E²CM+SDN share one set of class-mean passes per run (issue 3, item 5)."""

from __future__ import annotations

import copy

import pytest
import torch

from eebench.activations import ActivationCache
from eebench.costs import StageCosts
from eebench.strategy import MethodContext
from eebench.trace import compute_trace
from eebench_plugins.budgets import EpochsBudget, SamplesBudget, SecondsBudget
from eebench_plugins.e2cm import E2CM
from eebench_plugins.e2cm_sdn import E2CMSDN


def _context(model, bundle, cache: ActivationCache) -> MethodContext:
    return MethodContext(10, bundle.input_shape, StageCosts.measure(model, bundle.input_shape), torch.device("cpu"),
                         seed=0, batch_size=100, train_batch_size=32, backbone_key="base", activations=cache)


def _epochs(n: float, size: int) -> EpochsBudget:
    budget = EpochsBudget(n)
    budget.bind(size)
    return budget


def _statistics_passes(cache: ActivationCache) -> int:
    return sum(count for name, count in cache.computed.items() if name.startswith("class-means"))


@pytest.fixture(scope="module")
def shared_pair(trained_resnet20, small_fmnist):
    """E²CM then E²CM+SDN in one run, sharing the cache, as two cells of a suite do."""
    bundle, train, _ = small_fmnist
    cache = ActivationCache()
    e2cm = E2CM(copy.deepcopy(trained_resnet20), _context(trained_resnet20, bundle, cache))
    e2cm_budget = _epochs(1, len(train))
    e2cm.fit(train, e2cm_budget)
    consulting = E2CMSDN(copy.deepcopy(trained_resnet20), _context(trained_resnet20, bundle, cache), grid=2)
    consulting_budget = _epochs(1, len(train))
    consulting.fit(train, consulting_budget)
    return cache, e2cm, e2cm_budget, consulting, consulting_budget


def test_the_second_method_pays_no_statistics_pass(shared_pair) -> None:
    cache, *_ = shared_pair
    assert _statistics_passes(cache) == 1


def test_shared_means_and_divisors_are_the_same_numbers_at_every_common_exit(shared_pair) -> None:
    _, e2cm, _, consulting, _ = shared_pair
    e2cm_exits = dict(zip(e2cm.exit_stages, e2cm.exits, strict=True))
    assert set(consulting.bank.stages) <= set(e2cm_exits)
    for stage, means in zip(consulting.bank.stages, consulting.means, strict=True):
        assert torch.equal(means.sums, e2cm_exits[stage].sums)
        assert torch.equal(means.divisors, e2cm_exits[stage].divisors)


def test_sharing_changes_no_number_and_no_spend(shared_pair, trained_resnet20, small_fmnist) -> None:
    """With sharing off each method computes its own passes: same statistics, traces and spend."""
    cache, e2cm, e2cm_budget, consulting, consulting_budget = shared_pair
    bundle, train, test = small_fmnist
    alone = ActivationCache(share=False)
    solo = E2CMSDN(copy.deepcopy(trained_resnet20), _context(trained_resnet20, bundle, alone), grid=2)
    solo_budget = _epochs(1, len(train))
    solo.fit(train, solo_budget)
    solo_e2cm = E2CM(copy.deepcopy(trained_resnet20), _context(trained_resnet20, bundle, alone))
    solo_e2cm_budget = _epochs(1, len(train))
    solo_e2cm.fit(train, solo_e2cm_budget)
    assert _statistics_passes(alone) == 2
    assert torch.equal(solo.cm_thresholds, consulting.cm_thresholds)
    for shared_trace, own_trace in [
        (compute_trace(e2cm, test, batch_size=100, device="cpu"), compute_trace(solo_e2cm, test, batch_size=100,
                                                                                 device="cpu")),
        (compute_trace(e2cm, train, batch_size=100, device="cpu"), compute_trace(solo_e2cm, train, batch_size=100,
                                                                                  device="cpu")),
    ]:
        assert torch.equal(shared_trace.preds, own_trace.preds) and torch.equal(shared_trace.scores, own_trace.scores)
    for shared_budget, own_budget in [(e2cm_budget, solo_e2cm_budget), (consulting_budget, solo_budget)]:
        assert shared_budget.spend.samples == own_budget.spend.samples
        assert shared_budget.spend.extra_forward_samples == own_budget.spend.extra_forward_samples
        assert shared_budget.spend.training_macs == own_budget.spend.training_macs


def test_the_reader_records_the_payers_seconds(shared_pair) -> None:
    """Seconds do not depend on which cell ran first: the core charges both the passes' wall time."""
    _, _, e2cm_budget, consulting, consulting_budget = shared_pair
    passes = consulting.statistics_seconds  # measured inside the passes E²CM paid for
    assert passes > 0
    assert passes <= e2cm_budget.spend.seconds < passes + 0.5  # E²CM does little else
    assert consulting_budget.spend.seconds >= passes  # the reader is charged them too


def test_e2cm_spends_one_epoch_of_a_larger_budget(trained_resnet20, small_fmnist) -> None:
    bundle, train, _ = small_fmnist
    strategy = E2CM(copy.deepcopy(trained_resnet20), _context(trained_resnet20, bundle, ActivationCache()))
    budget = _epochs(6, len(train))
    strategy.fit(train, budget)
    assert budget.spend.samples == len(train)
    assert int(strategy.exits[0].counts.sum()) == len(train)


def test_budgets_that_may_stop_early_draw_their_own_batches(trained_resnet20, small_fmnist) -> None:
    """A sample budget below the split or a clock cannot take the whole-split statistics."""
    bundle, train, _ = small_fmnist
    assert _epochs(1, len(train)).covers(len(train)) and SamplesBudget(len(train)).covers(len(train))
    assert not SamplesBudget(len(train) - 1).covers(len(train))
    assert not SecondsBudget(3600).covers(1)
    cache = ActivationCache()
    strategy = E2CM(copy.deepcopy(trained_resnet20), _context(trained_resnet20, bundle, cache))
    budget = SecondsBudget(3600)
    strategy.fit(train, budget)
    assert _statistics_passes(cache) == 0
    assert budget.spend.samples == len(train)  # one epoch, then it stops drawing
    assert int(strategy.exits[0].counts.sum()) == len(train)
