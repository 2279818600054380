"""The driver of a parallel run: groups out to an executor, one progress line per finished cell.

The driver holds the run directory's lock, sends each group with cells still to do to the
executor, and watches ``RUN_DIR/cells`` (the single source of truth: workers write there) so each
cell gets its line as soon as its file lands, in whatever order the workers finish. It collects
the groups' outcomes into one ``RunReport``; the caller renders the leaderboard. Bad input that
stopped a group, or a worker that died, is raised once every other group is done (exit 2;
everything finished is on disk, and the same command resumes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eebench.errors import EebenchError
from eebench.executors import Executor
from eebench.groups import CellGroup
from eebench.results import cell_path, is_failure, is_result, read_result, safe_cell_path
from eebench.runner import RunPlan, RunReport, done_line, failed_line
from eebench.worker import GroupOutcome, GroupTask

POLL_SECONDS = 1.0
PASSED_ON = ("EEBENCH_CACHE",)  # environment a worker must see as the driver does


class CellWatcher:
    """Announces each watched cell once, when a new file for it appears (a changed stamp)."""

    def __init__(self, run_dir: Path, positions: dict[str, int], total: int) -> None:
        self.run_dir, self.positions, self.total = run_dir, positions, total
        self.before = {path: _stamp(path) for cell_id in positions for path in self._paths(cell_id)}
        self.announced: set[str] = set()

    def _paths(self, cell_id: str) -> tuple[Path, Path]:
        return cell_path(self.run_dir, cell_id), safe_cell_path(self.run_dir, cell_id)

    def scan(self) -> list[str]:
        lines = []
        for cell_id, position in sorted(self.positions.items(), key=lambda item: item[1]):
            if cell_id in self.announced:
                continue
            for path in self._paths(cell_id):
                stamp = _stamp(path)
                if stamp is None or stamp == self.before[path]:
                    continue
                line = _line(position, self.total, read_result(path), path)
                if line:
                    lines.append(line)
                    self.announced.add(cell_id)
                    break
        return lines

    def announce(self, cell_id: str, payload: dict[str, Any]) -> str | None:
        """The line of a cell whose file could not be written (kept in memory by its worker)."""
        if cell_id in self.announced:
            return None
        self.announced.add(cell_id)
        return _line(self.positions[cell_id], self.total, payload, None)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _line(position: int, total: int, content: dict[str, Any] | None, path: Path | None) -> str | None:
    if is_result(content):
        seconds = (content.get("provenance") or {}).get("seconds") or {}
        return done_line(position, total, content, sum(seconds.values()) if isinstance(seconds, dict) else 0.0)
    if is_failure(content):
        seconds = (content.get("provenance") or {}).get("seconds") or 0.0
        return failed_line(position, total, content, float(seconds), path)
    return None  # half a file cannot appear (atomic writes); anything else is not this run's


def _tasks(plan: RunPlan, executor: Executor) -> list[GroupTask]:
    """One task per group with cells still to do, carrying only those cells."""
    env = {name: os.environ[name] for name in PASSED_ON if name in os.environ}
    tasks = []
    for group in plan.groups:
        todo = tuple((position, cell) for position, cell in group.cells if cell.cell_id in plan.pending)
        if todo:
            tasks.append(GroupTask(plan.suite, plan.suite_path, str(plan.run_dir), str(plan.device),
                                   CellGroup(group.index, group.label, todo), plan.total, plan.share_activations,
                                   executor.threads, env))
    return tasks


def run_groups(plan: RunPlan, executor: Executor, log: Callable[[str], None]) -> RunReport:
    """Run the plan's pending groups on ``executor``; skipped cells are said first, then one line per
    cell as its result lands."""
    report = RunReport(plan.run_dir)
    start = time.perf_counter()
    for group in plan.groups:
        for position, cell in group.cells:
            if cell.cell_id not in plan.pending:
                report.skipped.append(cell.cell_id)
                log(f"[{position}/{plan.total}] {cell.cell_id}: already done, skipped")
    tasks = _tasks(plan, executor)
    if not tasks:
        return report
    by_index = {task.group.index: task.group for task in tasks}
    cells = sum(len(task.group.cells) for task in tasks)
    log(f"{cells} cell(s) in {len(tasks)} group(s) (cells sharing a base backbone run together) on "
        f"{executor.describe(len(tasks))}")
    watcher = CellWatcher(plan.run_dir, {cell.cell_id: position for task in tasks
                                         for position, cell in task.group.cells}, plan.total)
    outcomes: list[GroupOutcome] = []
    lost: list[tuple[CellGroup, BaseException]] = []
    try:
        executor.start(tasks)
        while len(outcomes) + len(lost) < len(tasks):
            for index, got in executor.poll(POLL_SECONDS):
                if isinstance(got, GroupOutcome):
                    outcomes.append(got)
                    if got.error:
                        log(f"group {index} ({by_index[index].label}) stopped: {got.error}")
                else:
                    lost.append((by_index[index], got))
                    log(f"group {index} ({by_index[index].label}) lost its worker: {_one_line(got)}")
            for line in watcher.scan():
                log(line)
    except BaseException:
        executor.cancel()  # Ctrl-C, or the driver failing: stop the workers, keep what is on disk
        raise
    finally:
        executor.close()
    for line in watcher.scan():
        log(line)
    _merge(report, plan, outcomes, watcher, log)
    report.seconds = time.perf_counter() - start
    _raise_stops(plan, outcomes, lost)
    return report


def _merge(report: RunReport, plan: RunPlan, outcomes: list[GroupOutcome], watcher: CellWatcher,
           log: Callable[[str], None]) -> None:
    """The groups' outcomes into one report, in the run's cell order."""
    order = {cell.cell_id: position for group in plan.groups for position, cell in group.cells}
    for outcome in sorted(outcomes, key=lambda o: o.index):
        report.done.extend(outcome.done)
        report.failed.extend(outcome.failed)
        report.skipped.extend(outcome.skipped)
        report.unsaved.update(outcome.unsaved)
        for cell_id, payload in outcome.unsaved.items():
            line = watcher.announce(cell_id, payload)
            if line:
                log(line)
    for ids in (report.done, report.failed, report.skipped):
        ids.sort(key=lambda cell_id: order.get(cell_id, 0))


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _raise_stops(plan: RunPlan, outcomes: list[GroupOutcome], lost: list[tuple[CellGroup, BaseException]]) -> None:
    """Bad input that stopped a group, else a lost worker: one line, exit code 2, after all groups ended."""
    errors = [outcome.error for outcome in sorted(outcomes, key=lambda o: o.index) if outcome.error]
    if errors:
        more = f" (and {len(errors) - 1} more group(s) stopped by bad input)" if len(errors) > 1 else ""
        raise EebenchError(f"{errors[0]}{more}")
    if lost:
        group, exc = lost[0]
        more = f" (and {len(lost) - 1} more group(s))" if len(lost) > 1 else ""
        raise EebenchError(f"the worker running group {group.index} ({group.label}) stopped without finishing: "
                           f"{_one_line(exc)}{more}; expected finished workers: finished cells are kept in "
                           f"{plan.run_dir}/cells, rerun the same command to resume", key="--executor")
