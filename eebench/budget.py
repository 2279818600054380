"""Training budgets: the harness, not the method, hands out data and stops when spent.

The Budget owns a method's training spend. A method gets every piece of training data
from it (``batches``; ``index_batches`` for tensors the method holds; ``statistics_batches``
for an un-augmented statistics pass that is not training), charges every further forward
pass through it (``forward_batches``, ``charge_forward``), and reads the run's shared
frozen-backbone passes through ``ExitStrategy.shared_activations`` / ``shared_result``,
which charge the reader (``read_shared``). ``spend`` is a read-only snapshot: only these
core methods move the counters, so methods are compared at matched training cost.

After ``fit`` the runner calls ``finish()``, fails the cell when ``overspent()`` says so and
records ``utilisation()``. Within budget means:

* samples (a ``samples`` budget; an ``epochs`` budget is ``round(epochs × training size)``
  samples, set by ``bind``): training samples handed out or charged ≤ the limit, exactly
  (the core trims the last batch);
* seconds: the fit's charged seconds ≤ the limit + its longest step + 1 % of the limit
  (timer noise). Charged seconds are the fit's wall time (from ``start()`` to ``finish()``;
  without a runner, from the first to the last core call) minus the time spent computing
  shared passes, plus the recorded seconds of every shared pass read (whoever paid it, so
  the numbers do not depend on cell order). A *step* is the charged time between two
  consecutive core events (a hand-out, a charge, a shared read, the end of a stream); the
  time after the last event counts in the seconds but is no step. The core hands out no
  training batch once the clock is spent, so a method that works on what it is handed
  overruns by at most the batch in hand; one that keeps working after its clock is spent
  (several passes' worth, or outside the core) is over budget.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from eebench.datasets import Augment
from eebench.passes import iterate_batches

if TYPE_CHECKING:
    from eebench.activations import SharedPass

SECONDS_SLACK = 0.01  # a seconds budget's tolerance for timer noise, as a fraction of the budget


@dataclass(frozen=True)
class Spend:
    """What a method really used while fitting: a read-only snapshot (``Budget.spend``)."""

    samples: int = 0  # training samples handed out (or charged with a shared result)
    batches: int = 0  # training batches handed out
    seconds: float = 0.0  # charged seconds (see the module docstring)
    training_macs: float = 0.0  # every MAC charged: training steps and extra forward passes
    extra_forward_samples: int = 0  # samples of forward passes that are not training batches

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Charge:
    """What reading a shared pass costs the reader (``ExitStrategy.shared_result``): training
    samples and batches (they count against a samples budget), extra forward samples, MACs."""

    samples: int = 0
    batches: int = 0
    forward_samples: int = 0
    macs: float = 0.0


@dataclass
class _Ledger:
    """The mutable counters behind ``Budget.spend``; only the core's methods write them."""

    samples: int = 0
    batches: int = 0
    training_macs: float = 0.0
    extra_forward_samples: int = 0
    started: float | None = None  # perf_counter of start()
    last_event: float | None = None  # perf_counter of the last core event
    finished: float | None = None  # perf_counter of finish()
    excluded: float = 0.0  # wall seconds spent computing shared passes (charged at their recorded seconds)
    charged: float = 0.0  # recorded seconds of the shared passes read
    mark: float = 0.0  # charged seconds at the last event
    longest_step: float = 0.0


def _size(item: Any) -> int:
    return int(item[1].shape[0]) if isinstance(item, tuple) else int(item.shape[0])


def _split(item: Any, n: int) -> tuple[Any, Any]:
    if isinstance(item, tuple):
        return tuple(t[:n] for t in item), tuple(t[n:] for t in item)
    return item[:n], item[n:]


class BatchStream(Iterator[Any]):
    """Training batches a Budget hands out: ``(x, y)`` tuples (``Budget.batches``) or index
    tensors (``Budget.index_batches``). Iterate it, or share it between consecutive training
    phases with ``take``. Each item's training MACs (``macs_per_sample`` × its size) are
    charged when it is handed out; samples and batches are counted when the core draws it."""

    def __init__(self, budget: Budget, draw: Iterator[Any], macs_per_sample: float = 0.0) -> None:
        self._budget = budget
        self._draw = draw
        self._carry: Any = None
        self.macs_per_sample = float(macs_per_sample)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._carry is not None:
            item, self._carry = self._carry, None
        else:
            item = next(self._draw)
        self._budget._hand_out(_size(item), self.macs_per_sample)
        return item

    def take(self, samples: int, *, macs_per_sample: float | None = None) -> Iterator[Any]:
        """At most ``samples`` samples of the stream, as one phase: a batch crossing the boundary
        is split, its rest opens the next ``take``. ``macs_per_sample``: this phase's rate."""
        rate = self.macs_per_sample if macs_per_sample is None else float(macs_per_sample)
        left = int(samples)
        while left > 0:
            if self._carry is not None:
                item, self._carry = self._carry, None
            else:
                item = next(self._draw, None)
                if item is None:
                    return
            if _size(item) > left:
                item, self._carry = _split(item, left)
            left -= _size(item)
            self._budget._hand_out(_size(item), rate)
            yield item

    def close(self) -> None:
        self._carry = None
        self._draw.close()


class Budget(ABC):
    """A rule for how much training a method may consume, and the only source of its data."""

    name: str = "budget"

    def __init__(self) -> None:
        self._ledger = _Ledger()

    # -- the rule (what a budget plugin defines) -------------------------------------------

    @abstractmethod
    def exhausted(self) -> bool:
        """True once no further training batch may be handed out."""

    @abstractmethod
    def describe(self) -> str:
        """Short human label, e.g. ``1 epoch``."""

    def bind(self, train_size: int) -> None:
        """Learn the training-set size (epoch budgets turn epochs into samples here)."""
        return None

    @property
    def planned_samples(self) -> int | None:
        """Samples the budget will hand out, when known in advance (for LR schedules)."""
        return None

    def samples_left(self) -> int | None:
        """Training samples the budget may still hand out (None: no sample limit)."""
        return None

    def seconds_left(self) -> float | None:
        """Charged seconds left on the budget's clock (None: no clock)."""
        return None

    def limits(self) -> dict[str, float]:
        """The limits ``overspent`` checks: ``samples`` and/or ``seconds`` (empty: unlimited)."""
        return {}

    def covers(self, samples: int) -> bool:
        """True when the budget will certainly hand out ``samples`` more samples, whatever the
        clock: a method may then take a result computed on exactly those samples from the shared
        cache (``ExitStrategy.shared_result``, which charges them) instead of drawing them."""
        return False

    # -- what was spent ------------------------------------------------------------------------

    @property
    def spend(self) -> Spend:
        """A snapshot of what was spent so far (read-only: only the core's methods move it)."""
        ledger = self._ledger
        end = ledger.finished if ledger.finished is not None else ledger.last_event
        return Spend(ledger.samples, ledger.batches, self._seconds_at(end), ledger.training_macs,
                     ledger.extra_forward_samples)

    def utilisation(self) -> dict[str, float]:
        """Used / allowed for each limit of the budget, e.g. ``{"samples": 1.0}``."""
        spend = self.spend
        used = {"samples": float(spend.samples), "seconds": spend.seconds}
        return {key: used[key] / limit for key, limit in self.limits().items() if key in used and limit > 0}

    def overspent(self) -> str | None:
        """None when the spend is within the budget (see the module docstring), else one line."""
        spend, limits = self.spend, self.limits()
        problems = []
        if "samples" in limits and spend.samples > limits["samples"]:
            problems.append(f"{spend.samples:,} training samples handed out or charged, "
                            f"{int(limits['samples']):,} allowed")
        if "seconds" in limits:
            limit = limits["seconds"]
            step = self._ledger.longest_step
            if spend.seconds > limit + step + SECONDS_SLACK * limit:
                problems.append(f"{spend.seconds:.2f} s charged, {limit:g} s allowed (+ one step, {step:.2f} s, "
                                f"+ {SECONDS_SLACK:.0%})")
        return f"overspent its budget ({self.describe()}): " + "; ".join(problems) if problems else None

    # -- the clock -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the clock (the runner calls it right before ``fit``; else the first core call does)."""
        ledger = self._ledger
        if ledger.started is None:
            ledger.started = ledger.last_event = time.perf_counter()

    def finish(self) -> None:
        """Stop the clock (the runner calls it right after ``fit``)."""
        if self._ledger.started is not None and self._ledger.finished is None:
            self._ledger.finished = time.perf_counter()

    def elapsed(self) -> float:
        """Charged seconds so far (the live clock a seconds budget reads)."""
        ledger = self._ledger
        now = ledger.finished if ledger.finished is not None else time.perf_counter()
        return self._seconds_at(now)

    def _seconds_at(self, when: float | None) -> float:
        ledger = self._ledger
        if ledger.started is None or when is None:
            return 0.0
        return max(0.0, when - ledger.started - ledger.excluded + ledger.charged)

    def _event(self) -> None:
        """A core event: closes the current step."""
        self.start()
        ledger = self._ledger
        if ledger.finished is not None:
            return
        now = time.perf_counter()
        seconds = self._seconds_at(now)
        ledger.longest_step = max(ledger.longest_step, seconds - ledger.mark)
        ledger.mark, ledger.last_event = seconds, now

    def _clock_spent(self) -> bool:
        left = self.seconds_left()
        return left is not None and left <= 0

    def _hand_out(self, samples: int, macs_per_sample: float) -> None:
        self._ledger.training_macs += samples * macs_per_sample
        self._event()

    # -- handing out data ------------------------------------------------------------------------

    def batches(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        augment: Augment | None = None,
        shuffle: bool = True,
        seed: int = 0,
        description: str = "fit",
        macs_per_sample: float = 0.0,
        epochs: float | None = None,
        followup_passes: int = 0,
    ) -> BatchStream:
        """Training batches until the budget is spent (epoch after epoch), counted as training
        samples; each sample is charged ``macs_per_sample`` training MACs when handed out.

        ``epochs`` caps the stream at that many passes over ``dataset`` (E²CM's class means need
        one). ``followup_passes``: forward passes the method will make over the handed-out samples
        after the stream (E²CM's divisor pass); under a clock the stream stops early enough to
        leave them the time the stream itself took per pass.
        """
        draw = self._training_draw(dataset, batch_size, device, augment, shuffle, seed, description, epochs,
                                   followup_passes)
        return BatchStream(self, draw, macs_per_sample)

    def index_batches(self, size: int, batch_size: int, generator: torch.Generator, *,
                      macs_per_sample: float = 0.0) -> BatchStream:
        """Mini-batches of indices into ``size`` samples the method holds as tensors (DEC), reshuffled
        by ``generator`` at the start of every epoch (the last partial batch kept), counted and
        stopped like ``batches``."""
        return BatchStream(self, self._index_draw(int(size), int(batch_size), generator), macs_per_sample)

    def statistics_batches(self, dataset: Dataset, batch_size: int, *, device: torch.device | str = "cpu",
                           macs_per_sample: float = 0.0, description: str = "statistics") -> Iterator[Any]:
        """An un-augmented statistics pass that is not training (E²CM+SDN's class means): the first
        samples of ``dataset`` in order, at most one epoch and at most the samples the budget has
        left (the very samples ``batches(..., shuffle=False, epochs=1)`` would hand out), stopped
        by the clock. Counted as extra forward samples, so the training samples stay untouched."""
        self.start()
        left = self.samples_left()
        cap = len(dataset) if left is None else min(len(dataset), left)
        handed = 0
        try:
            stream = iterate_batches(dataset, batch_size, device=device, description=description)
            for x, y in stream:
                if handed >= cap or self._clock_spent() or self.exhausted():
                    stream.close()
                    return
                x, y = x[: cap - handed], y[: cap - handed]
                handed += int(y.shape[0])
                self._count_forward(int(y.shape[0]), macs_per_sample)
                yield x, y
        finally:
            self._event()

    def forward_batches(self, dataset: Dataset, batch_size: int, *, device: torch.device | str = "cpu",
                        macs_per_sample: float = 0.0, stoppable: bool = False,
                        description: str = "forward pass") -> Iterator[Any]:
        """A forward pass over ``dataset`` in order, un-augmented, that is not training (E²CM's divisor
        pass), charged as extra forward samples. ``stoppable``: it stops when the clock is spent (the
        method copes with a partial pass); otherwise the method needs all of it and it is not stopped."""
        self.start()
        try:
            stream = iterate_batches(dataset, batch_size, device=device, description=description)
            for x, y in stream:
                if stoppable and self._clock_spent():
                    stream.close()
                    return
                self._count_forward(int(y.shape[0]), macs_per_sample)
                yield x, y
        finally:
            self._event()

    def charge_forward(self, samples: int, macs_per_sample: float = 0.0) -> None:
        """Charge a forward pass of ``samples`` samples the method ran on data it holds (DEC's
        full-data passes): extra forward samples and ``samples × macs_per_sample`` MACs."""
        self.start()
        self._count_forward(int(samples), macs_per_sample)

    def read_shared(self, read: Callable[[], SharedPass], charge: Charge) -> Any:
        """Core (``ExitStrategy.shared_activations`` / ``shared_result``): read a shared pass and charge
        it to this budget, the pass's recorded seconds included, whoever computed it; the wall time of
        computing it here is taken off the clock, so the seconds do not depend on cell order."""
        self._event()
        shared = read()
        ledger = self._ledger
        if not shared.cached:
            ledger.excluded += shared.seconds
        ledger.charged += shared.seconds
        ledger.samples += int(charge.samples)
        ledger.batches += int(charge.batches)
        ledger.extra_forward_samples += int(charge.forward_samples)
        ledger.training_macs += float(charge.macs)
        self._event()
        return shared.value

    def _count_forward(self, samples: int, macs_per_sample: float) -> None:
        self._ledger.extra_forward_samples += samples
        self._ledger.training_macs += samples * macs_per_sample
        self._event()

    def _stop_training(self, handed: int, cap: int | None, began: float, followup_passes: int) -> bool:
        if self.exhausted() or (cap is not None and handed >= cap):
            return True
        left = self.seconds_left()
        return bool(followup_passes) and left is not None and left <= followup_passes * (self.elapsed() - began)

    def _limit(self, handed: int, cap: int | None) -> int | None:
        """How many samples the next batch may still carry (None: no limit)."""
        limits = [n for n in (self.samples_left(), None if cap is None else cap - handed) if n is not None]
        return min(limits) if limits else None

    def _training_draw(self, dataset: Dataset, batch_size: int, device: torch.device | str, augment: Augment | None,
                       shuffle: bool, seed: int, description: str, epochs: float | None,
                       followup_passes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.start()
        generator = torch.Generator().manual_seed(seed)
        cap = None if epochs is None else int(round(epochs * len(dataset)))
        began, handed, epoch = self.elapsed(), 0, 0
        try:
            while not self._stop_training(handed, cap, began, followup_passes):
                stream = iterate_batches(
                    dataset, batch_size, device=device, shuffle=shuffle, generator=generator,
                    description=f"{description} epoch {epoch + 1}",
                )
                for x, y in stream:
                    if self._stop_training(handed, cap, began, followup_passes):
                        stream.close()
                        return
                    limit = self._limit(handed, cap)
                    if limit is not None:
                        x, y = x[:limit], y[:limit]
                    if augment is not None:
                        x = augment(x, generator)
                    handed += int(y.shape[0])
                    self._ledger.samples += int(y.shape[0])
                    self._ledger.batches += 1
                    yield x, y
                epoch += 1
        finally:
            self._event()

    def _index_draw(self, size: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        self.start()
        try:
            while size > 0 and not self.exhausted():
                order = torch.randperm(size, generator=generator)
                for start in range(0, size, batch_size):
                    if self.exhausted():
                        return
                    index = order[start : start + batch_size]
                    limit = self.samples_left()
                    if limit is not None:
                        index = index[:limit]
                    self._ledger.samples += int(index.numel())
                    self._ledger.batches += 1
                    yield index
        finally:
            self._event()


class TrainingBudget(Budget):
    """Budgets counted in samples (epochs are a number of samples too) and/or wall seconds."""

    def __init__(self, max_samples: int | None = None, max_seconds: float | None = None) -> None:
        super().__init__()
        self.max_samples = max_samples
        self.max_seconds = max_seconds

    @property
    def planned_samples(self) -> int | None:
        return self.max_samples

    def samples_left(self) -> int | None:
        return None if self.max_samples is None else max(0, self.max_samples - self._ledger.samples)

    def seconds_left(self) -> float | None:
        return None if self.max_seconds is None else self.max_seconds - self.elapsed()

    def limits(self) -> dict[str, float]:
        limits: dict[str, float] = {}
        if self.max_samples is not None:
            limits["samples"] = self.max_samples
        if self.max_seconds is not None:
            limits["seconds"] = self.max_seconds
        return limits

    def covers(self, samples: int) -> bool:
        left = self.samples_left()
        return self.max_seconds is None and (left is None or left >= samples)

    def exhausted(self) -> bool:
        return self.samples_left() == 0 or self._clock_spent()

    def describe(self) -> str:
        parts = []
        if self.max_samples is not None:
            parts.append(f"{self.max_samples} samples")
        if self.max_seconds is not None:
            parts.append(f"{self.max_seconds:g} s")
        return ", ".join(parts) or "unlimited"
