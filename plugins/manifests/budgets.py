"""The built-in budgets' manifest (implementation: ``eebench_plugins.budgets``).

Each declares its parameters: a positive, finite amount with a sane ceiling, so ``eebench
validate`` refuses a budget the run could not honour (``epochs: .inf`` would overflow the sample
count).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from eebench import hookimpl
from eebench.lazy import lazy
from eebench.params import Params

MAX_EPOCHS = 1_000_000
MAX_SAMPLES = 10**15
MAX_SECONDS = 1e9  # about 31 years


class EpochsParams(Params):
    epochs: float = Field(1, gt=0, le=MAX_EPOCHS)


class SamplesParams(Params):
    samples: int = Field(gt=0, le=MAX_SAMPLES)


class SecondsParams(Params):
    seconds: float = Field(gt=0, le=MAX_SECONDS)


@hookimpl
def register_budgets(register: Callable[..., None]) -> None:
    register("epochs", lazy("eebench_plugins.budgets:EpochsBudget", params=EpochsParams))
    register("samples", lazy("eebench_plugins.budgets:SamplesBudget", params=SamplesParams))
    register("seconds", lazy("eebench_plugins.budgets:SecondsBudget", params=SecondsParams))
