"""``--jobs N``: N worker processes on this machine, one group of cells each at a time.

Workers are spawned (not forked: a fork of a process that already ran torch's thread pools can
hang) and each serves one group only, so a group starts from a fresh process whatever ran before
it and gives its memory back when done.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from eebench.worker import GroupOutcome, GroupTask, run_group


class LocalPool:
    """A spawn-context process pool of ``jobs`` workers with ``threads`` torch threads each."""

    def __init__(self, jobs: int, threads: int | None) -> None:
        self.jobs, self.threads = jobs, threads
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Future, int] = {}

    def describe(self, groups: int) -> str:
        threads = f"{self.threads} torch thread(s)" if self.threads else "torch's default threads"
        return f"{min(self.jobs, groups)} local worker processes, {threads} each"

    def start(self, tasks: list[GroupTask]) -> None:
        options = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
        self._pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(tasks)),
                                         mp_context=multiprocessing.get_context("spawn"), **options)
        self._futures = {self._pool.submit(run_group, task): task.group.index for task in tasks}

    def poll(self, timeout: float) -> list[tuple[int, GroupOutcome | BaseException]]:
        finished, _ = wait(self._futures, timeout=timeout, return_when=FIRST_COMPLETED)
        out: list[tuple[int, GroupOutcome | BaseException]] = []
        for future in finished:
            index = self._futures.pop(future)
            try:
                out.append((index, future.result()))
            except BaseException as exc:  # noqa: BLE001 -- a dead worker (BrokenProcessPool) or a raise
                out.append((index, exc))
        return out

    def cancel(self) -> None:
        for future in self._futures:
            future.cancel()
        processes = getattr(self._pool, "_processes", None) or {}
        for process in list(processes.values()):
            if process.is_alive():
                process.terminate()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
