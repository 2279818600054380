"""User-facing errors: one line, exit code 2, no traceback unless --debug."""

from __future__ import annotations

from pathlib import Path


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
