"""Plugin discovery through the ``eebench`` entry-point group, one code path for all.

Each entry point loads in isolation: one that fails to import, or whose register hook
raises (any exception, SystemExit from ``sys.exit()`` included; only KeyboardInterrupt
stops), is reported once and skipped (with nothing of it left registered). Two plugins
registering the same name is an error naming both packages.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from types import ModuleType

import pluggy

from eebench import hookspecs
from eebench.errors import EebenchError

GROUP = "eebench"
KINDS = {
    "datasets": "register_datasets",
    "backbones": "register_backbones",
    "exit_strategies": "register_exit_strategies",
    "calibrators": "register_calibrators",
    "budgets": "register_budgets",
}
KIND_LABELS = {
    "datasets": "dataset",
    "backbones": "backbone",
    "exit_strategies": "exit strategy",
    "calibrators": "calibrator",
    "budgets": "budget",
}


@dataclass
class PluginInfo:
    entry_point: str
    package: str
    version: str
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Registry:
    """Every registered factory by kind and name, plus who registered it."""

    factories: dict[str, dict[str, Callable]] = field(default_factory=lambda: {k: {} for k in KINDS})
    owners: dict[str, dict[str, str]] = field(default_factory=lambda: {k: {} for k in KINDS})
    plugins: list[PluginInfo] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def get(self, kind: str, name: str, *, where: str | None = None, key: str | None = None) -> Callable:
        """The factory for ``name``; ``timm:resnet18`` resolves to the ``timm:`` prefix factory."""
        table = self.factories[kind]
        if name in table:
            return table[name]
        prefix = name.split(":", 1)[0] + ":"
        if ":" in name and prefix in table:
            suffix = name.split(":", 1)[1]
            return lambda *a, **kw: table[prefix](suffix, *a, **kw)
        known = ", ".join(sorted(table)) or "none installed"
        raise EebenchError(f"unknown {KIND_LABELS[kind]} '{name}'; expected one of: {known}", where=where, key=key)

    def owner(self, kind: str, name: str) -> str:
        """The package that registered ``name`` (``timm:x`` -> the ``timm:`` prefix's), or "?"."""
        base = name if name in self.owners[kind] else name.split(":", 1)[0] + ":"
        return self.owners[kind].get(base, "?")

    def plugin_version(self, kind: str, name: str) -> str:
        package = self.owner(kind, name)
        for info in self.plugins:
            if info.package == package:
                return f"{package} {info.version}"
        return package


def _distribution_of(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return entry_point.value.split(".")[0], "unknown"
    return dist.metadata["Name"], dist.version


def _register_module(
    registry: Registry, manager: pluggy.PluginManager, module: ModuleType, info: PluginInfo
) -> None:
    manager.register(module, name=f"{info.package}:{info.entry_point}")  # two packages may share an entry name
    for kind, hook_name in KINDS.items():
        hook = getattr(manager.hook, hook_name)
        for impl in hook.get_hookimpls():
            if impl.plugin is not module:
                continue
            info.hooks.append(hook_name)

            def register(name: str, factory: Callable, _kind: str = kind) -> None:
                owner = registry.owners[_kind].get(name)
                if owner is not None:
                    raise EebenchError(
                        f"{KIND_LABELS[_kind]} '{name}' is registered by both '{owner}' and '{info.package}'",
                        where="plugins",
                    )
                registry.factories[_kind][name] = factory
                registry.owners[_kind][name] = info.package
                info.registered.setdefault(_kind, []).append(name)

            impl.function(register=register)


def _skip(registry: Registry, entry_point: str, package: str, step: str, exc: BaseException) -> None:
    """Report a broken plugin once (stderr and ``eebench plugins``) and go on without it."""
    text = (str(exc).strip().splitlines() or [""])[0]
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, SystemExit):
        detail = f"SystemExit: it called sys.exit({'' if exc.code is None else repr(exc.code)})"
    message = f"plugin '{entry_point}' ({package}) failed to {step}: {detail}"
    registry.failures.append(message)
    print(f"eebench: warning: {message}; skipped", file=sys.stderr)


def _unregister(registry: Registry, manager: pluggy.PluginManager, module: ModuleType, info: PluginInfo) -> None:
    """Undo a half-finished registration."""
    for kind, names in info.registered.items():
        for name in names:
            registry.factories[kind].pop(name, None)
            registry.owners[kind].pop(name, None)
    if manager.is_registered(module):
        manager.unregister(module)


def load_registry(extra_modules: dict[str, ModuleType] | None = None) -> Registry:
    """Discover and load every plugin of the ``eebench`` entry-point group."""
    registry = Registry()
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    entry_points = sorted(metadata.entry_points(group=GROUP), key=lambda ep: (ep.name, ep.value))
    seen: set[tuple[str, str]] = set()
    for entry_point in entry_points:
        if (entry_point.name, entry_point.value) in seen:
            continue  # the same distribution visible twice on sys.path
        seen.add((entry_point.name, entry_point.value))
        package, version = _distribution_of(entry_point)
        try:
            module = entry_point.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin (even one calling sys.exit()) must not take the CLI down
            _skip(registry, entry_point.name, package, "load", exc)
            continue
        info = PluginInfo(entry_point=entry_point.name, package=package, version=version)
        try:
            _register_module(registry, manager, module, info)
        except EebenchError:
            raise  # a name clash is the user's to resolve: it names both packages
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a hook that raises (or exits) must not take the CLI down either
            _unregister(registry, manager, module, info)
            _skip(registry, entry_point.name, package, "register", exc)
            continue
        registry.plugins.append(info)
    for name, module in (extra_modules or {}).items():
        info = PluginInfo(entry_point=name, package=name, version="local")
        _register_module(registry, manager, module, info)
        registry.plugins.append(info)
    return registry


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return load_registry()
