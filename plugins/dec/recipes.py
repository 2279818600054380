"""DEC training recipes: the paper's settings and a ``quick`` preset for a 2-core CPU.

A recipe is a parameter model (``DECRecipe``). In a suite, ``dec-e2cm``'s ``recipe`` is a
preset name (``recipe: quick``) or a mapping that starts from a preset and overrides any
field (``recipe: {preset: quick, lr: 0.01}``; the preset defaults to ``paper``). Every field
is checked by ``eebench validate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from eebench.params import Params  # not eebench.api (torch): the dec manifest imports this module

#: Each preset's values that differ from the paper's (the model's defaults).
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "paper": {},
    # For a 2-core CPU: suites/unsupervised_dec.yaml (the whole 60k training split, 3 seeds) in
    # 6-7 minutes. 300 Adam iterations (lr 1e-3, no decay) per layer of denoising pre-training,
    # 0.6 % of the paper's 50k, hence Adam instead of SGD. No end-to-end fine-tuning: at this length
    # it made the embedding less clusterable (k-means accuracy 58 % after layer-wise pre-training,
    # 54 / 49 % after 1000 / 2000 fine-tuning iterations, one seed on a 10k subset). DEC's KL stage
    # as the paper's but capped at 2800 iterations (20 target updates, 12 epochs of 60k). The new
    # 500→10 layers of DEC_small / DEC_middle get the very same (head_* None: DEC_large's counts).
    "quick": dict(pretrain_iterations=300, finetune_iterations=0, optimizer="adam", lr=1e-3,
                  lr_step=1_000_000, dec_max_iterations=2800),
}
MAX_ITERATIONS = 10**9


class DECRecipe(Params):
    """Iteration counts and optimiser settings for every training phase.

    Defaults are the DEC paper's (Xie et al. 2016, Sec. 4.3): 50k iterations per layer of
    denoising pre-training, 100k of end-to-end fine-tuning, SGD lr 0.1 divided by 10 every
    20k iterations, dropout 0.2, batch 256; DEC with SGD lr 0.01, target distribution
    every 140 iterations, stop below 0.1 % changed assignments. ``dec_max_iterations`` is
    DEC-keras's cap (2e4): the paper gives none. ``preset`` names the preset the other fields
    start from (validating ``"quick"`` or ``{"preset": "quick", "lr": 0.01}`` fills the rest
    from it).
    """

    preset: Literal["paper", "quick"] = "paper"
    pretrain_iterations: int = Field(50_000, ge=0, le=MAX_ITERATIONS)
    finetune_iterations: int = Field(100_000, ge=0, le=MAX_ITERATIONS)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    lr_step: int = Field(20_000, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    batch_size: int = Field(256, ge=1, le=2**31 - 1)
    dec_lr: float = Field(0.01, gt=0)
    dec_momentum: float = Field(0.9, ge=0, lt=1)
    update_interval: int = Field(140, ge=1)
    tol: float = Field(0.001, ge=0, le=1)
    dec_max_iterations: int = Field(20_000, ge=0, le=MAX_ITERATIONS)
    kmeans_n_init: int = Field(20, ge=1, le=10_000)
    head_pretrain_iterations: int | None = Field(None, ge=0, le=MAX_ITERATIONS)  # None: as pretrain_iterations
    head_finetune_iterations: int | None = Field(None, ge=0, le=MAX_ITERATIONS)  # None: as finetune_iterations

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data: Any) -> Any:
        """A preset name, or a mapping of overrides on top of its ``preset`` (default ``paper``)."""
        if isinstance(data, str):
            data = {"preset": data}
        if isinstance(data, Mapping):
            preset = data.get("preset", "paper")
            if isinstance(preset, str) and preset in PRESET_VALUES:
                return {**PRESET_VALUES[preset], **data}
        return data

    @property
    def head_pretrain(self) -> int:
        return self.pretrain_iterations if self.head_pretrain_iterations is None else self.head_pretrain_iterations

    @property
    def head_finetune(self) -> int:
        return self.finetune_iterations if self.head_finetune_iterations is None else self.head_finetune_iterations

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


PRESETS: dict[str, DECRecipe] = {name: DECRecipe(preset=name) for name in PRESET_VALUES}

FIELDS = set(DECRecipe.model_fields) - {"preset"}


def resolve(preset: str, overrides: Mapping[str, Any]) -> DECRecipe:
    """The preset with ``overrides`` applied (None means "keep the preset's"); a ValueError names a bad one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DEC recipe '{preset}'; expected one of: {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - FIELDS)
    if unknown:
        raise ValueError(f"unknown DEC recipe fields {unknown}; expected among: {', '.join(sorted(FIELDS))}")
    return recipe_from({"preset": preset, **given})


def recipe_from(value: str | Mapping[str, Any] | DECRecipe) -> DECRecipe:
    """A ``DECRecipe`` from a preset name, a mapping of overrides, or a recipe (returned as is)."""
    if isinstance(value, DECRecipe):
        return value
    try:
        return DECRecipe.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "recipe"
        raise ValueError(f"DEC recipe {where}: {first['msg']} (got {first.get('input')!r:.60})") from exc
