"""The built-in calibrators' manifest (implementation: ``eebench_plugins.calibrators``)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from eebench import hookimpl
from eebench.lazy import lazy
from eebench.params import Params

MAX_CANDIDATES = 100_000  # threshold vectors one calibrator proposes (memory grows with them)


class PerExitBisectionParams(Params):
    targets: int = Field(1000, ge=1, le=MAX_CANDIDATES)
    sweeps: int = Field(4, ge=1, le=1000)
    tolerance: float = Field(5e-4, ge=0, le=1)
    per_variant: bool = False  # True: ``targets`` for each rule variant (the pre-0.2 behaviour), not shared


class SharedThresholdParams(Params):
    points: int = Field(1000, ge=1, le=MAX_CANDIDATES)


class RandomSearchParams(Params):
    samples: int = Field(100, ge=1, le=MAX_CANDIDATES)


@hookimpl
def register_calibrators(register: Callable[..., None]) -> None:
    register("per-exit-bisection", lazy("eebench_plugins.calibrators:PerExitBisection", params=PerExitBisectionParams))
    register("shared-threshold", lazy("eebench_plugins.calibrators:SharedThresholdSweep", params=SharedThresholdParams))
    register("random-search", lazy("eebench_plugins.calibrators:RandomSearch", params=RandomSearchParams))
