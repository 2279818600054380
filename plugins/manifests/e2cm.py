"""The ``e2cm`` exit strategy's manifest (implementation: ``eebench_plugins.e2cm``)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from eebench import hookimpl
from eebench.lazy import lazy
from eebench.params import Params


class E2CMParams(Params):
    """``pool_to``: max-pool every exit's features to this side (none: only ``auto_pool_above``);
    ``auto_pool_above``: max-pool features with more values than this (none: never);
    ``count_softmax``: add the softmax's MACs to each exit's overhead."""

    pool_to: int | None = Field(None, ge=1, le=4096)
    auto_pool_above: int | None = Field(16384, ge=1, le=2**31 - 1)
    count_softmax: bool = False


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("e2cm", lazy("eebench_plugins.e2cm:E2CM", params=E2CMParams, default_calibrator="per-exit-bisection"))
