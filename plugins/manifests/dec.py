"""The DEC plugin's manifest: the ``dec`` backbone and the ``dec-e2cm`` exit strategy
(implementation: ``eebench_plugins.dec``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from eebench import hookimpl
from eebench.lazy import lazy
from eebench.params import Params
from eebench_plugins.dec.recipes import FIELDS, DECRecipe

PAPER_DIMS = (500, 500, 2000, 10)


class DECBackboneParams(Params):
    """``dims``: encoder widths, the last the embedding; ``num_clusters`` (default: the dataset's
    classes); ``alpha``: the Student-t degrees of freedom."""

    dims: list[int] = Field(default_factory=lambda: list(PAPER_DIMS), min_length=2, max_length=64)
    num_clusters: int | None = Field(None, ge=1, le=100_000)
    alpha: float = Field(1.0, gt=0)

    @field_validator("dims")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(not 1 <= d <= 1_000_000 for d in value):
            raise ValueError(f"dims must list at least two positive widths (at most 1,000,000 each), got {value}")
        return value


class DECE2CMParams(Params):
    """``recipe``: a preset name (``paper``, ``quick``) or a mapping of ``DECRecipe`` overrides on top
    of its ``preset``; ``exit_stages``: the encoder layers the smaller DECs branch after (checked
    against the backbone when the cell starts); ``prediction``: ``dec`` or ``e2cm``."""

    recipe: DECRecipe = Field(default_factory=DECRecipe)
    exit_stages: list[int] = Field(default_factory=lambda: [0, 1], min_length=1, max_length=64)
    count_softmax: bool = False
    prediction: Literal["dec", "e2cm"] = "dec"

    @model_validator(mode="before")
    @classmethod
    def _recipe_fields_inside(cls, data: Any) -> Any:
        misplaced = sorted(set(data) & FIELDS) if isinstance(data, Mapping) else []
        if misplaced:
            raise ValueError(f"{misplaced[0]} is a DEC recipe field; expected it under recipe, e.g. recipe: "
                             f"{{preset: quick, {misplaced[0]}: ...}}")
        return data

    @field_validator("exit_stages")
    @classmethod
    def _stages(cls, value: list[int]) -> list[int]:
        if any(s < 0 for s in value):
            raise ValueError(f"exit_stages must be encoder layers (>= 0), got {value}")
        return value


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    register("dec", lazy("eebench_plugins.dec.backbone:dec_backbone", params=DECBackboneParams))


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("dec-e2cm", lazy("eebench_plugins.dec.strategy:DECE2CM", params=DECE2CMParams,
                              default_calibrator="per-exit-bisection"))
