"""DEC (Deep Embedded Clustering, Xie et al. 2016) with E²CM early exits: unsupervised early exit.

Registers the ``dec`` backbone (the d–500–500–2000–10 encoder) and the ``dec-e2cm`` exit
strategy (DEC_small / DEC_middle / DEC_large with class-means exits on cluster centres).
"""

from __future__ import annotations

from collections.abc import Callable

from eebench import hookimpl
from eebench_plugins.dec.backbone import dec_backbone
from eebench_plugins.dec.strategy import DECE2CM


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    register("dec", dec_backbone)


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("dec-e2cm", DECE2CM)
