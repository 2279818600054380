"""Progress bars with ETA on a terminal, a few plain lines when output is not a TTY."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence progress output (tests, nested runs)."""
    global _quiet
    _quiet = quiet


class _Tracker:
    def __init__(self, advance_fn) -> None:
        self._advance = advance_fn

    def advance(self, amount: float = 1) -> None:
        self._advance(amount)


@contextmanager
def progress(description: str, total: float | None) -> Iterator[_Tracker]:
    """Track one loop: ``with progress("train", n) as bar: ... bar.advance(k)``."""
    if _quiet:
        yield _Tracker(lambda amount: None)
        return
    if console.is_terminal:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield _Tracker(lambda amount: bar.advance(task, amount))
        return
    start = time.perf_counter()
    done = 0.0
    next_report = 0.25

    def advance(amount: float) -> None:
        nonlocal done, next_report
        done += amount
        if total and done / total >= next_report and done < total:
            elapsed = time.perf_counter() - start
            eta = elapsed * (total - done) / max(done, 1e-9)
            print(f"  {description}: {done / total:4.0%} ({elapsed:.0f}s, eta {eta:.0f}s)",
                  file=sys.stderr, flush=True)
            next_report += 0.25

    yield _Tracker(advance)
    print(f"  {description}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
