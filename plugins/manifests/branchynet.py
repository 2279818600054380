"""The ``branchynet`` exit strategy's manifest (implementation: ``eebench_plugins.branchynet``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator

from eebench import hookimpl
from eebench.lazy import lazy
from eebench.params import Params

WEIGHT_PRESETS: dict[str, tuple[float, float, float]] = {
    "e2cm": (1 / 6, 1 / 4, 1.0),
    "equal": (1.0, 1.0, 1.0),
    "paper": (1.0, 1.0, 0.3),
}


class BranchyNetParams(Params):
    """``weights``: a preset name or 3 loss weights; see the class for the rest."""

    weights: Any = "e2cm"
    second_at: float = Field(1 / 3, gt=0, lt=1)
    branch_channels: int | None = Field(None, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    from_scratch: bool = False
    schedule: Literal["cosine", "constant"] = "cosine"
    count_softmax: bool = False

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: Any) -> str | list[float]:
        """The rule (and messages) of ``eebench_plugins.branchynet.resolve_weights``."""
        numbers = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if (not isinstance(value, str) and not numbers) or (isinstance(value, str) and value not in WEIGHT_PRESETS):
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_PRESETS)} or a list of 3 numbers, "
                             f"got {value!r}")
        if isinstance(value, str):
            return value
        values = [float(v) for v in value]
        if len(values) != 3 or any(w < 0 or not math.isfinite(w) for w in values) or not any(values):
            raise ValueError(f"weights must be 3 non-negative numbers (branch 1, branch 2, final), got {values}")
        return values


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("branchynet", lazy("eebench_plugins.branchynet:BranchyNet", params=BranchyNetParams,
                                default_calibrator="per-exit-bisection"))
