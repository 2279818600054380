"""The ``bwds`` exit strategy's manifest (implementation: ``eebench_plugins.bwds``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field, field_validator

from eebench import hookimpl
from eebench.lazy import lazy
from eebench_plugins.manifests.internal_classifiers import ICParams

_STEP = 5 / 24
#: 25 λ log-spaced over [1e-4, 10]: torch.logspace(-4, 1, 25, dtype=torch.float64) to the bit, computed as
#: torch does (each half from its own end), without importing torch
DEFAULT_LAMBDAS = tuple(10.0 ** (-4 + _STEP * i) if i < 12 else 10.0 ** (1 - _STEP * (24 - i)) for i in range(25))


class BWDSParams(ICParams):
    """SDN's IC parameters plus ``lambdas`` (rule variants), ``policy_lr`` and ``schedule``."""

    lambdas: list[float] = Field(default_factory=lambda: list(DEFAULT_LAMBDAS), max_length=1000)
    policy_lr: float = Field(1e-2, gt=0)
    schedule: Literal["per-exit", "ics-first"] = "per-exit"

    @field_validator("lambdas")
    @classmethod
    def _lambdas(cls, value: list[float]) -> list[float]:
        if not value or any(not v > 0 for v in value):
            raise ValueError(f"lambdas must be a non-empty list of positive numbers, got {value}")
        return value


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("bwds", lazy("eebench_plugins.bwds:BWDS", params=BWDSParams, default_calibrator="per-exit-bisection"))
