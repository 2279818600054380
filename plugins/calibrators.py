"""Built-in calibrators: they propose threshold vectors from the calibration trace.

The core keeps the upper convex hull of the proposals on the calibration split and
evaluates those vectors on test; a calibrator never sees the test split.
"""

from __future__ import annotations

import torch

from eebench.api import Calibrator, ExitCosts, ExitTrace, exit_fires
from eebench_plugins.manifests.calibrators import PerExitBisectionParams, RandomSearchParams, SharedThresholdParams


def _boundaries(sorted_desc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds letting exactly the top m scores exit (m = 0..N), and which m are reachable.

    Midpoints between consecutive distinct scores work for both ``>`` and ``>=`` rules.
    Scores of -inf (a vetoed exit) can never leave, so no m past the finite ones is reachable.
    """
    down = torch.full_like(sorted_desc[:1], float("-inf"))
    finite = int(torch.isfinite(sorted_desc).sum())
    if finite == 0:
        limits = torch.full((sorted_desc.numel() + 1,), float("inf"), dtype=sorted_desc.dtype)
        reachable = torch.zeros(sorted_desc.numel() + 1, dtype=torch.bool)
        reachable[0] = True
        return limits, reachable
    top = torch.nextafter(sorted_desc[:1], -down)
    mids = (sorted_desc[:-1] + sorted_desc[1:]) / 2
    bottom = torch.nextafter(sorted_desc[finite - 1 : finite], down)
    limits = torch.cat([top, mids, bottom])
    limits[finite] = bottom[0]  # between the last finite score and the vetoed ones
    reachable = torch.ones(sorted_desc.numel() + 1, dtype=torch.bool)
    reachable[1:-1] = sorted_desc[:-1] > sorted_desc[1:]
    reachable[finite + 1 :] = False
    return limits, reachable


def per_exit_search(
    trace: ExitTrace,
    costs: ExitCosts,
    targets: torch.Tensor,
    generator: torch.Generator,
    *,
    sweeps: int = 4,
    tolerance: float = 5e-4,
    chunk: int = 0,
) -> torch.Tensor:
    """The E2CM paper's search, run for every target at once.

    Thresholds start at random (uniform quantiles of each exit's scores). Exits are then
    visited front to back (alternating optimisation), each threshold set by binary search
    over that exit's sorted calibration scores to the value whose mean cost is closest
    to the target while the others stay fixed; sweeps repeat until every target is met or a sweep changes nothing.
    The 1-D search is exact: cost is a monotone step function of one threshold.
    """
    scores = trace.scores[:-1].double()  # [J, N]
    num_thresholds, num_samples = scores.shape
    if num_thresholds == 0:
        return torch.empty(targets.numel(), 0, dtype=torch.float64)
    exit_cost = costs.normalised().float()  # [E], every exit enabled while searching (float32: 2x faster)
    reachable_goal = targets.double().clamp(float(exit_cost[0]), float(exit_cost[-1]))
    sorted_scores, order = scores.sort(dim=1, descending=True)
    bounds = [_boundaries(sorted_scores[j]) for j in range(num_thresholds)]
    penalties = [torch.where(ok, 0.0, float("inf")) for _, ok in bounds]  # unreachable split points
    levels = torch.rand(targets.numel(), num_thresholds, generator=generator, dtype=torch.float64)
    picks = (levels * (num_samples - 1)).round().long()
    init = torch.stack([bounds[j][0][1:][picks[:, j]] for j in range(num_thresholds)], dim=1)  # finite
    chunk = chunk or max(1, int(2e7 // (num_samples * (num_thresholds + 6))))
    results = []
    for start in range(0, targets.numel(), chunk):
        goal = reachable_goal[start : start + chunk].float()
        limits = init[start : start + chunk].clone()
        fires = exit_fires(scores[None], limits[:, :, None], trace.strict)  # [v, J, N]
        for _ in range(sweeps):
            before = limits.clone()
            # cost of the first exit that fires after j (the last exit if none), for every j
            after = torch.empty(limits.shape[0], num_thresholds, num_samples)
            running = torch.full_like(after[:, 0], float(exit_cost[-1]))
            for j in range(num_thresholds - 1, -1, -1):
                after[:, j] = running
                running = torch.where(fires[:, j], exit_cost[j], running)
            settled = torch.zeros_like(running)  # cost of samples that left before j (0 if not)
            reach = torch.ones_like(fires[:, 0])
            for j in range(num_thresholds):
                base = settled.sum(1) + torch.where(reach, after[:, j], 0.0).sum(1)
                delta = torch.where(reach, exit_cost[j] - after[:, j], 0.0).index_select(1, order[j])
                cost_if_top = torch.cat([base[:, None], base[:, None] + delta.cumsum(1)], 1) / num_samples
                distance = (cost_if_top - goal[:, None]).abs() + penalties[j]
                limits[:, j] = bounds[j][0][distance.argmin(1)]
                fires[:, j] = exit_fires(scores[j][None], limits[:, j, None], trace.strict)
                settled = torch.where(reach & fires[:, j], exit_cost[j], settled)
                reach = reach & ~fires[:, j]
                achieved = (settled + torch.where(reach, after[:, j], 0.0)).mean(1)
                if bool(((achieved - goal).abs() <= tolerance).all()):
                    break  # every target of this chunk is met: later thresholds stay as they are
            if bool(((achieved - goal).abs() <= tolerance).all()) or torch.equal(before, limits):
                break  # targets met, or a whole sweep changed nothing (the unmet ones are unreachable)
        results.append(limits)
    return torch.cat(results)


def disable_unused_exits(trace: ExitTrace, thresholds: torch.Tensor) -> torch.Tensor:
    """Set to +inf (off, no overhead) every exit that no calibration sample leaves at."""
    counts = torch.zeros(thresholds.shape[0], trace.num_exits, dtype=torch.long)
    first = trace.first_exit(thresholds)
    counts.scatter_add_(1, first, torch.ones_like(first))
    unused = counts[:, :-1] == 0
    return torch.where(unused, torch.full_like(thresholds, float("inf")), thresholds)


class PerExitBisection(Calibrator):
    """Per-exit binary search with alternating optimisation (E2CM paper, Sec. IV-A).

    ``targets`` cost targets spaced evenly over (0, 1] (1000: the paper's 0.001 grid), shared by the
    method's rule variants: of V variants, variant v searches targets v+1, v+1+V, … (each still spans
    the whole cost range), so every method proposes ``targets`` vectors whatever its variant count
    and the search costs the same; ``per_variant: true`` gives each variant all ``targets`` instead.
    """

    Params = PerExitBisectionParams

    def __init__(self, targets: int = 1000, sweeps: int = 4, tolerance: float = 5e-4,
                 per_variant: bool = False) -> None:
        self.targets = targets
        self.sweeps = sweeps
        self.tolerance = tolerance
        self.per_variant = per_variant

    def thresholds(self, trace: ExitTrace, costs: ExitCosts, generator: torch.Generator) -> torch.Tensor:
        return self._search(trace, costs, generator, self._goals())

    def variant_thresholds(self, traces: list[ExitTrace], costs: ExitCosts,
                           generator: torch.Generator) -> list[torch.Tensor]:
        goals = self._goals()
        if self.per_variant:
            return [self._search(trace, costs, generator, goals) for trace in traces]
        return [self._search(trace, costs, generator, goals[v :: len(traces)]) for v, trace in enumerate(traces)]

    def _goals(self) -> torch.Tensor:
        return torch.arange(1, self.targets + 1, dtype=torch.float64) / self.targets

    def _search(self, trace: ExitTrace, costs: ExitCosts, generator: torch.Generator,
                goals: torch.Tensor) -> torch.Tensor:
        if goals.numel() == 0:  # more variants than targets
            return torch.empty(0, trace.num_exits - 1, dtype=torch.float64)
        found = per_exit_search(trace, costs, goals, generator, sweeps=self.sweeps, tolerance=self.tolerance)
        return disable_unused_exits(trace, found)


class SharedThresholdSweep(Calibrator):
    """One threshold shared by every exit, swept over quantiles of all calibration scores."""

    Params = SharedThresholdParams

    def __init__(self, points: int = 1000) -> None:
        self.points = points

    def thresholds(self, trace: ExitTrace, costs: ExitCosts, generator: torch.Generator) -> torch.Tensor:
        pooled = trace.scores[:-1].flatten().double().sort().values
        picks = torch.linspace(0, pooled.numel() - 1, self.points).round().long()
        values = torch.nextafter(pooled[picks], torch.full_like(pooled[picks], float("-inf")))
        shared = values[:, None].expand(-1, trace.num_exits - 1).contiguous()
        return disable_unused_exits(trace, shared)


class RandomSearch(Calibrator):
    """The E2CM code's baseline: thresholds drawn uniformly at random (in quantile space)."""

    Params = RandomSearchParams

    def __init__(self, samples: int = 100) -> None:
        self.samples = samples

    def thresholds(self, trace: ExitTrace, costs: ExitCosts, generator: torch.Generator) -> torch.Tensor:
        sorted_scores = trace.scores[:-1].double().sort(dim=1).values
        levels = torch.rand(self.samples, trace.num_exits - 1, generator=generator, dtype=torch.float64)
        picks = (levels * (trace.num_samples - 1)).round().long()
        return torch.stack([sorted_scores[j, picks[:, j]] for j in range(trace.num_exits - 1)], dim=1)

