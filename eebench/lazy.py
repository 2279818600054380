"""Lazy plugin factories: a name registered now, its implementation imported on first use.

Every ``eebench`` command loads every installed plugin's register hooks, so a hook module that
imports torch (or any slow library) makes ``eebench plugins`` and ``eebench validate`` pay for
it. A register hook registers a *reference* instead, with the parameter model (from a light
module: pydantic only) and the attributes the harness reads before building the plugin::

    from eebench import hookimpl
    from eebench.lazy import lazy
    from my_exit.params import MyExitParams  # pydantic only: no torch

    @hookimpl
    def register_exit_strategies(register):
        register("my-exit", lazy("my_exit.method:MyExit", params=MyExitParams,
                                 default_calibrator="shared-threshold"))

``lazy("module:attribute", params=Model, **attributes)`` is a factory that imports ``module``
and looks ``attribute`` up on its first call, or on the first access of an attribute not given
here. Until then ``eebench validate`` checks a suite's ``params`` against ``Model``, reads
``default_calibrator`` (an exit strategy's) and ``for_methods`` (a calibrator's: registered
method names) from what was given, and builds nothing: ``Model`` must refuse every value the
constructor refuses. Without ``params`` the target's own schema (or signature) is the check,
and validating imports it. A target that cannot be imported or found is one line naming the
reference (an :class:`~eebench.errors.EebenchError`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from eebench.errors import EebenchError

_UNSET: Any = object()


class _TargetSignature:
    """``inspect.signature(factory)`` is the target's (importing it); None on the class itself."""

    def __get__(self, instance: LazyFactory | None, owner: type | None = None) -> inspect.Signature | None:
        return None if instance is None else inspect.signature(instance._eebench_load())


class LazyFactory:
    """A plugin factory named by ``module:attribute``, imported on first use (see :func:`lazy`).

    Every other attribute is the target's (importing it), so the instance keeps no public names
    of its own; :func:`resolve` returns the target, and a class statement naming the factory as a
    base subclasses the target.
    """

    def __init__(self, target: str, *, params: type[BaseModel] | None = None, **attributes: Any) -> None:
        module, colon, qualname = str(target).partition(":")
        if not colon or not module or not qualname:
            raise ValueError(f"a lazy factory's target must be 'module:attribute', got {target!r}")
        if params is not None and not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise TypeError(f"params must be a pydantic model (an eebench Params subclass), got {params!r}")
        vars(self).update(attributes)
        if params is not None:
            self.Params = params  # where eebench.params.declared_params looks: no import needed
        self.__name__ = qualname.rsplit(".", 1)[-1]
        self.__qualname__ = qualname
        self.__module__ = module
        self._eebench_target = target
        self._eebench_loaded: Any = _UNSET

    def _eebench_load(self) -> Callable[..., Any]:
        if self._eebench_loaded is _UNSET:
            self._eebench_loaded = _import(self._eebench_target)
        return self._eebench_loaded

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._eebench_load()(*args, **kwargs)

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        """``class Mine(registry_factory)``: subclassing a lazy factory subclasses its target."""
        return (self._eebench_load(),)

    def __getattr__(self, name: str) -> Any:
        # only for attributes not given up front; protocol probes (__wrapped__, __deepcopy__ ...) import nothing
        if name.startswith(("__", "_eebench_")):
            raise AttributeError(name)
        return getattr(self._eebench_load(), name)

    __signature__ = _TargetSignature()

    def __repr__(self) -> str:
        return f"lazy({self._eebench_target!r}{'' if self._eebench_loaded is _UNSET else ', loaded'})"


def lazy(target: str, *, params: type[BaseModel] | None = None, **attributes: Any) -> LazyFactory:
    """A factory for ``register(name, factory)`` that imports ``target`` (``"module:attribute"``) on first use.

    ``params``: the target's parameter model (keep it in a light module); ``attributes``: what the
    harness reads before building the plugin, e.g. ``default_calibrator="shared-threshold"`` for
    an exit strategy or ``for_methods=("my-exit",)`` for a calibrator.
    """
    return LazyFactory(target, params=params, **attributes)


def resolve(factory: Any) -> Any:
    """The real factory behind a lazy one (importing it); any other factory unchanged."""
    return factory._eebench_load() if isinstance(factory, LazyFactory) else factory


def declared_attribute(factory: Any, name: str, default: Any = None) -> Any:
    """``factory.name`` without importing a lazy factory's target (then: what was given, else ``default``)."""
    if isinstance(factory, LazyFactory) and factory._eebench_loaded is _UNSET:
        return vars(factory).get(name, default)
    return getattr(factory, name, default)


def _import(target: str) -> Any:
    module_name, _, qualname = target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = f"module '{exc.name}'" if exc.name else "a module"
        raise EebenchError(f"cannot import plugin factory '{target}': {missing} is not installed; expected an "
                           "importable module (is the plugin's package installed?)", where="plugins") from exc
    except Exception as exc:  # a plugin module that fails to import: one line, the traceback under --debug
        text = (str(exc).strip().splitlines() or [""])[0]
        raise EebenchError(f"cannot import plugin factory '{target}': {type(exc).__name__}"
                           f"{': ' + text if text else ''}", where="plugins") from exc
    for part in qualname.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise EebenchError(f"cannot find plugin factory '{target}': module '{module_name}' has no attribute "
                               f"'{qualname}'; expected a class or function of that name", where="plugins") from None
    if not callable(found):
        raise EebenchError(f"plugin factory '{target}' is a {type(found).__name__}, not callable; expected a class "
                           "or function", where="plugins")
    return found
