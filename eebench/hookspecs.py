"""Hook specifications: each hook receives a ``register(name, factory)`` callback."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("eebench")
hookimpl = pluggy.HookimplMarker("eebench")

Register = Callable[..., None]


@hookspec
def register_datasets(register: Register) -> None:
    """Register dataset factories: ``register(name, factory)``."""


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbone factories; a name ending in ``:`` takes a suffix (``timm:<name>``)."""


@hookspec
def register_exit_strategies(register: Register) -> None:
    """Register early-exit methods."""


@hookspec
def register_calibrators(register: Register) -> None:
    """Register calibrators (threshold choosers)."""


@hookspec
def register_budgets(register: Register) -> None:
    """Register training budgets."""
