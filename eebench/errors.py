"""User-facing errors: one line, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class EebenchError(Exception):
    """Bad input or environment, reported as ``<where>: <key>: <what was expected>``.

    ``where`` is usually a file path, ``key`` a dotted path inside it. A plugin leaves
    ``where`` empty and sets ``key`` to the parameter's name relative to itself (``"lr"``,
    ``"weights.0"``) or to None; the core prefixes it with the plugin's place in the suite
    (``methods[0].params.lr``), see :func:`plugin_errors`.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, key: str | None = None) -> None:
        self.where = where
        self.key = key
        self.detail = message
        parts = [p for p in (where, key) if p]
        super().__init__(": ".join([*parts, message]))


def check_writable(directory: Path, key: str, expected: str = "a writable directory") -> None:
    """Create ``directory`` if needed and prove it takes a file, before any work depends on it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise EebenchError(f"cannot write there ({exc.strerror}); expected {expected}", where=str(directory),
                           key=key) from exc


def join_key(prefix: str, key: str | None) -> str:
    """``prefix`` + a plugin's relative ``key``: ``methods[0].params`` + ``lr`` -> ``methods[0].params.lr``."""
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


@contextmanager
def plugin_errors(where: str, key: str, params_key: str | None = None,
                  rejects: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Locate the errors a plugin raises inside the block in the suite file.

    An ``EebenchError`` without a ``where`` gets ``where`` and a key: ``params_key`` (default
    ``key``) joined with the plugin's relative key when it names a parameter, else ``key``.
    So a NaN loss in ``fit`` raised with ``key="lr"`` reads ``suite.yaml: methods[0].params.lr:
    ...`` and one raised without a key ``suite.yaml: methods[0]: ...``. Exceptions of the
    ``rejects`` types become one line at ``key`` too; anything else propagates unchanged.
    """
    try:
        yield
    except EebenchError as exc:
        if exc.where:
            raise
        located = join_key(params_key or key, exc.key) if exc.key else key
        raise EebenchError(exc.detail, where=where, key=located) from exc
    except rejects as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EebenchError(f"{detail}; expected valid parameter values", where=where, key=key) from exc


def build_plugin(factory: Callable[..., Any], where: str, key: str, args: tuple = (), params: dict | None = None,
                 rejects: tuple[type[Exception], ...] = (TypeError, ValueError), params_key: str | None = None) -> Any:
    """Call a plugin factory; a parameter value it rejects becomes one line naming the suite key.

    ``key`` is where the factory's parameters sit (``methods[0].params``), or the plugin's entry
    (``backbones[0]``) with ``params_key`` its parameters (``backbones[0].params``); a plugin's
    ``EebenchError(key="lr")`` is reported at ``<params_key or key>.lr``. ``params`` are first checked
    against the plugin's declared schema (what ``validate`` checks) and the plugin is built from
    the validated values (``eebench.params.check_params``).
    """
    from eebench.params import check_params

    params = check_params(factory, params, where=where, key=params_key or key, skip=len(args))
    with plugin_errors(where, key, params_key=params_key, rejects=rejects):
        return factory(*args, **params)


def check_finite_loss(loss: Any, where: str, *, key: str | None = "lr", hint: str = "try a lower lr") -> None:
    """Stop training with one line when ``loss`` (a number or a one-element tensor) is NaN or infinite.

    ``where`` says which loss and when (``"SDN IC loss after 128 samples"``); ``key`` is the
    plugin parameter to change (relative, prefixed by the core), ``hint`` what to try.
    Every built-in training loop calls it once per step; third-party loops should too.
    """
    value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    if not math.isfinite(value):
        raise EebenchError(f"{where} is {value}; expected a finite loss ({hint})", key=key)
