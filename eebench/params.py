"""Plugin parameter schemas: one declaration that ``eebench validate`` and ``eebench run`` both check.

A plugin declares its parameters as a pydantic model deriving from :class:`Params` (unknown keys
refused, NaN and infinities refused) and attaches it to its factory:

* a class factory (an ExitStrategy, Calibrator or Budget subclass) sets the class attribute
  ``Params = MyParams``; a subclass that overrides ``__init__`` without declaring its own
  ``Params`` is checked against its signature instead of the parent's schema;
* a function factory (or a ``functools.partial``) is decorated with ``@params_model(MyParams)``
  (or gets ``factory.Params = MyParams``);
* a lazy factory (``eebench.lazy.lazy("module:Name", params=MyParams)``) is given it, so that
  checking a suite imports nothing heavy (keep ``MyParams`` in a module that imports pydantic only).

``validate`` checks the suite's ``params`` against the model; ``run`` builds the plugin from the
validated model's values (``Params.to_kwargs()``: the parameters the suite gave, parsed and
converted; the factory's own defaults fill the rest), so the two check the same thing. A factory
without a schema keeps the older check: its signature must accept the given names. In both cases
every number in ``params`` must be finite.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from eebench.errors import EebenchError
from eebench.lazy import LazyFactory, resolve


class Params(BaseModel):
    """Base of a plugin's parameter model: unknown keys and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    def to_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the factory is called with: the given parameters, validated and converted."""
        return {name: getattr(self, name) for name in self.model_fields_set}


F = TypeVar("F", bound=Callable[..., Any])


def params_model(model: type[BaseModel]) -> Callable[[F], F]:
    """Decorator declaring a function factory's parameter model (``@params_model(MyParams)``)."""

    def attach(factory: F) -> F:
        factory.Params = model  # type: ignore[attr-defined]
        return factory

    return attach


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def declared_params(factory: Any) -> type[BaseModel] | None:
    """The parameter model a factory declares, or None (then its signature is the check)."""
    for _ in range(8):  # wrappers (functools.wraps, partial) around the real factory
        if isinstance(factory, type):
            for klass in factory.__mro__:
                own = vars(klass)
                if _is_model(own.get("Params")):
                    return own["Params"]
                if "__init__" in own:
                    return None  # a constructor newer than any declared schema
            return None
        model = getattr(factory, "__dict__", {}).get("Params")
        if _is_model(model):
            return model
        if isinstance(factory, LazyFactory):
            factory = resolve(factory)  # a lazy factory given no params: the target's own (importing it)
            continue
        inner = getattr(factory, "__wrapped__", None) or getattr(factory, "func", None)
        if inner is None:
            return None
        factory = inner
    return None


def printable(text: str) -> str:
    """``text`` for a one-line message: control characters and line breaks escaped."""
    text = str(text)
    if all(c.isprintable() for c in text):
        return text
    return text.encode("unicode_escape").decode("ascii")


def location(parts: tuple[Any, ...] | list[Any], base: str = "") -> str:
    """``('fractions', 2)`` -> ``fractions[2]``; ``base`` prefixes it (``methods[0].params``)."""
    out = base
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{printable(part)}" if out else printable(part))
    return out


def non_finite(value: Any, path: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], float] | None:
    """The first NaN or infinite float inside ``value`` (nested lists and mappings), with its path."""
    stack: list[tuple[tuple[Any, ...], Any]] = [(path, value)]
    seen: set[int] = set()
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where, item
        if isinstance(item, (Mapping, list, tuple)):
            if id(item) in seen:
                continue  # shared (or recursive) containers are looked at once
            seen.add(id(item))
        if isinstance(item, Mapping):
            stack.extend((where + (k,), v) for k, v in reversed(list(item.items())))
        elif isinstance(item, (list, tuple)):
            stack.extend((where + (i,), v) for i, v in reversed(list(enumerate(item))))
    return None


def _bound(error: dict[str, Any]) -> str:
    ctx = error.get("ctx") or {}
    symbols = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    key = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}
    bound = ctx.get(key[error["type"]])
    if isinstance(bound, float) and bound.is_integer() and abs(bound) < 1e15:
        bound = int(bound)  # "> 0", not "> 0.0"
    return f"must be {symbols[error['type']]} {bound}"


EXPECTATIONS = {
    "finite_number": "must be a finite number",
    "int_from_float": "must be an integer",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def describe(error: dict[str, Any], fields: list[str] | None = None) -> str:
    """One pydantic error as ``<name> <what was expected>, got <input>``."""
    kind = error["type"]
    loc = tuple(p for p in error["loc"] if isinstance(p, int) or not str(p).startswith(("function-", "json-")))
    name = location(loc) or "the parameters"
    got = error.get("input")
    shown = f"{got!r}"
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if kind == "extra_forbidden":
        return f"unknown parameter '{name}'; expected parameters among: {', '.join(fields or []) or 'none'}"
    if kind == "missing":
        return f"required parameter '{name}' is missing"
    if kind in ("value_error", "assertion_error"):
        cause = (error.get("ctx") or {}).get("error")
        if cause is None:
            return error["msg"]
        return printable(getattr(cause, "detail", None) or str(cause))  # an EebenchError: its message alone
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{name} {_bound(error)}, got {shown}"
    if kind == "literal_error":
        return f"{name} must be one of {(error.get('ctx') or {}).get('expected')}, got {shown}"
    if kind in ("too_short", "too_long"):
        ctx = error.get("ctx") or {}
        limit = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"{name} must have {'at least' if kind == 'too_short' else 'at most'} {limit} items, got {shown}"
    expected = EXPECTATIONS.get(kind)
    if expected:
        return f"{name} {expected}, got {shown}"
    return f"{name}: {error['msg']}, got {shown}"


def validation_error(exc: ValidationError, model: type[BaseModel], where: str, key: str) -> EebenchError:
    """The first problem of a failed parameter validation as one line: ``<key>.<param>: <expected>``."""
    first = exc.errors()[0]
    loc = tuple(p for p in first["loc"] if isinstance(p, int) or not str(p).startswith(("function-", "json-")))
    fields = [n for n in model.model_fields if n != "model_config"]
    return EebenchError(describe(first, fields), where=where, key=location(loc, key))


def _check_signature(factory: Callable, params: Mapping[str, Any], skip: int, where: str, key: str) -> None:
    """Without a schema, unknown parameter names are still caught before any work starts."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind_partial(*([None] * skip), **params)
    except TypeError as exc:
        names = [p for p in signature.parameters if p not in ("self",)][skip:]
        raise EebenchError(f"{exc}; expected parameters among: {', '.join(names) or 'none'}",
                           where=where, key=key) from exc


def check_params(factory: Callable, params: Mapping[str, Any] | None, *, where: str, key: str,
                 skip: int = 0) -> dict[str, Any]:
    """Validate a suite's ``params`` for ``factory``; returns the keyword arguments to build it with.

    ``skip`` is the number of positional arguments the harness passes first (backbone and
    context for an exit strategy, num_classes and input_shape for a backbone).
    """
    params = dict(params or {})
    bad = non_finite(params)
    if bad is not None:
        path, value = bad
        raise EebenchError(f"{location(path) or 'value'} must be a finite number, got {value!r}", where=where,
                           key=location(path, key))
    model = declared_params(factory)
    if model is None:
        _check_signature(factory, params, skip, where, key)
        return params
    try:
        validated = model.model_validate(params)
    except ValidationError as exc:
        raise validation_error(exc, model, where, key) from exc
    if isinstance(validated, Params):
        return validated.to_kwargs()
    return {name: getattr(validated, name) for name in validated.model_fields_set}

