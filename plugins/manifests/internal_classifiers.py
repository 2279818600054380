"""Parameters shared by the internal-classifier methods (SDN, E²CM+SDN, BWDS); not an entry point."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from eebench.params import Params

SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)
#: where each IC goes for its cost fraction (``eebench_plugins.internal_classifiers.place_ics``): the
#: exit point whose cumulative backbone MACs are nearest the fraction, or the first one reaching it
PLACEMENTS = ("nearest", "first-at-least")


class ICParams(Params):
    """The internal-classifier parameters SDN, E²CM+SDN and BWDS share: ``fractions`` (each IC's
    target share of the backbone's MACs), ``placement`` (how a fraction picks its exit point, see
    ``PLACEMENTS``), and the ICs' Adam ``lr`` / ``weight_decay``."""

    fractions: list[float] = Field(default_factory=lambda: list(SDN_FRACTIONS))
    placement: Literal["nearest", "first-at-least"] = "nearest"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < f <= 1 for f in value):
            raise ValueError(f"fractions must be a non-empty list of numbers in (0, 1], got {value}")
        return value
