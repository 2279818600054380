"""The ``e2cm+sdn`` exit strategy's manifest (implementation: ``eebench_plugins.e2cm_sdn``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field

from eebench import hookimpl
from eebench.lazy import lazy
from eebench_plugins.manifests.internal_classifiers import ICParams

#: E²CM vetoes the IC's exit (Sec. IV-A): exit only when both agree, with or without the same class
AGREEMENT_RULES = ("same-class", "confidence")
#: E²CM is consulted when the IC says continue (Sec. III-B): exit when either says exit; the answer is
#: the IC's class (the paper's words) or, for ``or-e2cm-class``, E²CM's when E²CM alone sends it out
OR_RULES = ("or", "or-e2cm-class")
RULES = AGREEMENT_RULES + OR_RULES
DEFAULT_RULES = ("same-class", "confidence", "or")


class E2CMSDNParams(ICParams):
    """SDN's IC parameters plus ``rules`` (the consulting rules, each with ``grid`` T_cm levels a rule
    variant), ``grid`` (T_cm quantile levels) and E²CM's ``pool_to`` / ``auto_pool_above`` /
    ``count_softmax``."""

    rules: list[Literal["same-class", "confidence", "or", "or-e2cm-class"]] = Field(
        default_factory=lambda: list(DEFAULT_RULES), min_length=1)
    grid: int = Field(5, ge=1, le=1000)
    pool_to: int | None = Field(None, ge=1, le=4096)
    auto_pool_above: int | None = Field(16384, ge=1, le=2**31 - 1)
    count_softmax: bool = False


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("e2cm+sdn", lazy("eebench_plugins.e2cm_sdn:E2CMSDN", params=E2CMSDNParams,
                              default_calibrator="per-exit-bisection"))
