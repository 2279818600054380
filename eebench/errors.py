"""User-facing errors: one line, exit code 2, no traceback unless --debug."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class EebenchError(Exception):
    """Bad input or environment, reported as ``<where>: <key>: <what was expected>``.

    ``where`` is usually a file path, ``key`` a dotted path inside it.
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


def build_plugin(factory: Callable[..., Any], where: str, key: str, args: tuple = (), params: dict | None = None,
                 rejects: tuple[type[Exception], ...] = (TypeError, ValueError)) -> Any:
    """Call a plugin factory; a parameter value it rejects becomes one line naming the suite key."""
    try:
        return factory(*args, **(params or {}))
    except EebenchError as exc:
        if exc.where:
            raise
        raise EebenchError(exc.detail, where=where, key=f"{key} ({exc.key})" if exc.key else key) from exc
    except rejects as exc:
        raise EebenchError(f"{exc}; expected valid parameter values", where=where, key=key) from exc
