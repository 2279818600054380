"""The ``sdn`` exit strategy's manifest (implementation: ``eebench_plugins.sdn``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from eebench import hookimpl
from eebench.lazy import lazy
from eebench_plugins.manifests.internal_classifiers import ICParams


class SDNParams(ICParams):
    fallback: Literal["final", "most_confident"] = "final"
    count_softmax: bool = False


@hookimpl
def register_exit_strategies(register: Callable[..., None]) -> None:
    register("sdn", lazy("eebench_plugins.sdn:SDN", params=SDNParams, default_calibrator="shared-threshold"))
