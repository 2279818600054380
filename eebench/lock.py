"""One run at a time per run directory: ``RUN_DIR/.lock``, held with ``fcntl.flock``.

The kernel releases the lock when its holder dies, so a killed run never leaves a stale lock.
A second run refuses with one line naming the holder's pid, or, with ``wait``, says so in one
line and blocks until the holder is done (then it finds the holder's cells finished and skips
them). The lock is re-entrant within a process, so ``eebench run`` can hold it across the run
and the leaderboard while ``run_suite`` takes it again on its own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from eebench.errors import EebenchError

LOCK_NAME = ".lock"
_held: set[Path] = set()  # run directories this process holds


def _say(line: str) -> None:
    print(f"eebench: {line}", file=sys.stderr, flush=True)


@contextmanager
def run_lock(run_dir: Path, *, wait: bool = False, log: Callable[[str], None] = _say) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` for the block; refuse (``EebenchError``, exit 2) when another run holds it,
    or wait for it when ``wait``."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    key = run_dir.resolve()
    if key in _held:  # this process holds it already (the CLI around run_suite)
        yield
        return
    path = run_dir / LOCK_NAME
    try:
        handle = open(path, "a+")  # noqa: SIM115 -- held open for the whole run
    except OSError as exc:
        raise EebenchError(f"cannot create the run lock {path.name} ({exc.strerror}); expected a writable "
                           "run directory", where=str(run_dir), key="--out") from exc
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(handle)
            if not wait:
                raise EebenchError(f"another eebench run (pid {holder}) is using this run directory; expected it "
                                   "to finish first (or --wait for it), or another --out", where=str(run_dir),
                                   key="--out") from exc
            log(f"waiting for the eebench run (pid {holder}) using {run_dir} to finish (--wait)")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
    finally:
        handle.close()  # closing releases the lock


def _holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "unknown"
