"""The ``e2cm+sdn`` exit strategy's manifest (implementation: ``eebench_plugins.e2cm_sdn``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field

from eebench import hookimpl
from eebench.lazy import lazy
from eebench_plugins.manifests.internal_classifiers import ICParams

AGREEMENT_RULES = ("same-class", "confidence")


class E2CMSDNParams(ICParams):
    """SDN's IC parameters plus ``rules`` (the agreement rules, each a rule variant), ``grid`` (T_cm
    quantile levels) and E²CM's ``pool_to`` / ``auto_pool_above`` / ``count_softmax``."""

    rules: list[Literal["same-class", "confidence"]] = Field(default_factory=lambda: list(AGREEMENT_RULES),
                                                            min_length=1)
    grid: int = Field(5, ge=1, le=1000)
    pool_to: int | None = Field(None, ge=1, le=4096)
    auto_pool_above: int | None = Field(16384, ge=1, le=2**31 - 1)
    count_softmax: bool = False


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("e2cm+sdn", lazy("eebench_plugins.e2cm_sdn:E2CMSDN", params=E2CMSDNParams,
                              default_calibrator="per-exit-bisection"))
