"""The ``class-exclusion`` method's and its ``class-exclusion-search`` calibrator's manifest
(implementation: ``eebench_plugins.class_exclusion``)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field, field_validator

from eebench import hookimpl
from eebench.lazy import lazy
from eebench.params import Params

MAX_BETA = 0.99  # the β search's highest level and upper clamp
# accuracy drops: 0, then 32 geometric steps (×1.25) from 0.05 % to 50 %: a dense curve, one β vector each
DEFAULT_TOLERANCES = (0.0, *(round(0.0005 * 1.25**k, 6) for k in range(32)))
MIN_STEP = 1e-4  # the β search's finest step (0.99 / step levels per exit)


class ClassExclusionParams(Params):
    """``exit_stages``: increasing exit points before the last stage (default: all of them; checked
    against the backbone when the cell starts); the rest as in the class docstring."""

    exit_stages: list[int] | None = None
    expansion: int = Field(1, ge=1, le=64)
    pos_weight: float | None = Field(None, gt=0)
    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    from_scratch: bool = False

    @field_validator("exit_stages")
    @classmethod
    def _stages(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(s < 0 for s in value) or value != sorted(set(value))):
            raise ValueError(f"exit_stages must be a non-empty increasing list of exit points (>= 0), got {value}")
        return value


class ClassExclusionSearchParams(Params):
    """``tolerances``: accuracy drops in [0, 1] (one β vector each); ``step``: the β search's step;
    ``order``: the exits' search order (default: by the MACs of the segment before each); ``refine``:
    also propose each searched vector with one exit at β = 1, and each exit alone at β = 1."""

    tolerances: list[float] = Field(default_factory=lambda: list(DEFAULT_TOLERANCES), min_length=1, max_length=1000)
    step: float = Field(0.01, ge=MIN_STEP, le=MAX_BETA)
    order: list[int] | None = None
    refine: bool = True

    @field_validator("tolerances")
    @classmethod
    def _tolerances(cls, value: list[float]) -> list[float]:
        bad = [t for t in value if not 0 <= t <= 1]
        if bad:
            raise ValueError(f"tolerances must be accuracy drops in [0, 1], got {bad[0]}")
        return value

    @field_validator("order")
    @classmethod
    def _order(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (any(j < 0 for j in value) or len(set(value)) != len(value)):
            raise ValueError(f"order must list distinct exit indices (>= 0), got {value}")
        return value


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("class-exclusion", lazy("eebench_plugins.class_exclusion:ClassExclusion", params=ClassExclusionParams,
                                     default_calibrator="class-exclusion-search"))


@hookimpl
def register_calibrators(register: Callable[..., None]) -> None:
    # it searches only class-exclusion's trace; checked by validate
    register("class-exclusion-search", lazy("eebench_plugins.class_exclusion:ClassExclusionSearch",
                                            params=ClassExclusionSearchParams, for_methods=("class-exclusion",)))
