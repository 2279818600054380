"""What one worker of a parallel run does: one group of cells, in a process of its own.

A worker process (a pool process, a Ray task, a SLURM job) gets a ``GroupTask`` — plain,
picklable data — and writes each finished cell into the run directory exactly as the serial run
does (atomic per-cell files), so the run directory stays the single source of truth: a driver
that restarts resumes from it, and a retried task skips what an earlier attempt finished. The
``GroupOutcome`` it returns only says what happened; bad input of the suite comes back as text
(exceptions that cross process boundaries lose their fields).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eebench.errors import EebenchError
from eebench.groups import CellGroup
from eebench.plugins import default_registry
from eebench.progress import set_quiet
from eebench.runner import Runner, RunPlan, RunReport, declare_frozen_products, run_cells
from eebench.suite import Suite


@dataclass
class GroupTask:
    """Everything a worker needs, none of it live: the suite, the group, where to write, how to run."""

    suite: Suite
    suite_path: str
    run_dir: str
    device: str
    group: CellGroup
    total: int  # cells in the whole run, for [k/N]
    share_activations: bool
    threads: int | None  # torch intra-op threads for this worker (None: torch's default)
    env: dict[str, str] = field(default_factory=dict)  # EEBENCH_CACHE and the like, set before any work


@dataclass
class GroupOutcome:
    """What one group did; ``error`` is the one line of bad input that stopped it (exit code 2)."""

    index: int
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unsaved: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


def run_group(task: GroupTask) -> GroupOutcome:
    """Run the group's cells not yet finished, in order, in this process; quiet (the driver reports)."""
    os.environ.update(task.env)
    set_quiet(True)  # per-epoch progress of parallel workers would interleave into noise
    if task.threads:
        torch.set_num_threads(task.threads)
    registry = default_registry()
    device = torch.device(task.device)
    run_dir = Path(task.run_dir)
    plan = RunPlan(task.suite, task.suite_path, run_dir, device, [task.group], set(task.group.cell_ids),
                   task.total, task.share_activations)
    runner = Runner(task.suite, registry, suite_path=task.suite_path, device=device,
                    share_activations=task.share_activations)
    declare_frozen_products(runner, registry, plan.pending_cells())
    report = RunReport(run_dir)
    outcome = GroupOutcome(task.group.index)
    try:
        run_cells(runner, registry, plan, task.group, report, log=lambda line: None, recheck=True)
    except EebenchError as exc:
        outcome.error = str(exc)
    outcome.done, outcome.failed, outcome.skipped = report.done, report.failed, report.skipped
    outcome.unsaved = report.unsaved
    return outcome
