"""The ``eenet`` exit strategy's manifest (implementation: ``eebench_plugins.eenet``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field

from eebench import hookimpl
from eebench.lazy import lazy
from eebench.params import Params


class EENetParams(Params):
    num_ee: int = Field(2, ge=1, le=64)
    distribution: Literal["pareto", "golden_ratio", "fine", "linear", "quadratic"] = "fine"
    exit_type: Literal["plain", "pool", "bnpool", "poolbn"] = "poolbn"
    lambda_coef: float = Field(1.0, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    native_cost: bool = False
    from_scratch: bool = False
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(0.5, ge=0, lt=1)


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("eenet", lazy("eebench_plugins.eenet:EENet", params=EENetParams, default_calibrator="shared-threshold"))
