"""DEC training recipes: the paper's settings and a ``quick`` preset for a 2-core CPU.

Every field can be overridden from the suite (method params); the preset only fills what
the suite leaves out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal


@dataclass(frozen=True)
class DECRecipe:
    """Iteration counts and optimiser settings for every training phase.

    Defaults are the DEC paper's (Xie et al. 2016, Sec. 4.3): 50k iterations per layer of
    denoising pre-training, 100k of end-to-end fine-tuning, SGD lr 0.1 divided by 10 every
    20k iterations, dropout 0.2, batch 256; DEC with SGD lr 0.01, target distribution
    every 140 iterations, stop below 0.1 % changed assignments. ``dec_max_iterations`` is
    DEC-keras's cap (2e4): the paper gives none.
    """

    pretrain_iterations: int = 50_000
    finetune_iterations: int = 100_000
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    lr_step: int = 20_000
    momentum: float = 0.9
    dropout: float = 0.2
    batch_size: int = 256
    dec_lr: float = 0.01
    dec_momentum: float = 0.9
    update_interval: int = 140
    tol: float = 0.001
    dec_max_iterations: int = 20_000
    kmeans_n_init: int = 20
    head_pretrain_iterations: int | None = None  # the smaller DECs' new layer; None: as pretrain_iterations
    head_finetune_iterations: int | None = None  # None: as finetune_iterations

    def __post_init__(self) -> None:
        for name in ("pretrain_iterations", "finetune_iterations", "dec_max_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("batch_size", "update_interval", "kmeans_n_init", "lr_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must lie in [0, 1)")

    @property
    def head_pretrain(self) -> int:
        return self.pretrain_iterations if self.head_pretrain_iterations is None else self.head_pretrain_iterations

    @property
    def head_finetune(self) -> int:
        return self.finetune_iterations if self.head_finetune_iterations is None else self.head_finetune_iterations

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, DECRecipe] = {
    "paper": DECRecipe(),
    # About 3 minutes per seed on 2 shared CPU cores with a 10k training subset: 0.6-1 % of
    # the paper's pre-training iterations, hence Adam (lr 1e-3, no decay) instead of SGD,
    # and DEC capped at 10 target-distribution updates.
    "quick": DECRecipe(
        pretrain_iterations=300, finetune_iterations=1000, optimizer="adam", lr=1e-3, lr_step=1_000_000,
        dec_max_iterations=1400, head_pretrain_iterations=300, head_finetune_iterations=600,
    ),
}

FIELDS = {f.name for f in fields(DECRecipe)}


def resolve(preset: str, overrides: dict[str, Any]) -> DECRecipe:
    """The preset with the suite's overrides applied (None means "keep the preset's")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DEC recipe '{preset}'; expected one of: {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - FIELDS)
    if unknown:
        raise ValueError(f"unknown DEC recipe fields {unknown}; expected among: {', '.join(sorted(FIELDS))}")
    return replace(PRESETS[preset], **given)
