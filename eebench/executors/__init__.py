"""Where a run's groups of cells execute: this process, a local process pool, Ray, or SLURM.

An executor takes ``GroupTask``s (``eebench.worker``), runs ``run_group`` on each somewhere, and
hands back each group's ``GroupOutcome`` (or the exception that stopped its worker) as it
finishes; ``eebench.fanout`` drives it. Every executor writes results the same way (atomic
per-cell files in the run directory), so they agree to the last digit with a serial run at the
same torch thread count (CPU float reductions depend on it; ``provenance.threads`` records it).
Ray and submitit are optional extras, imported only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from eebench.errors import EebenchError
from eebench.worker import GroupOutcome, GroupTask

EXECUTORS = ("local", "ray", "submitit")
CLUSTERS = ("slurm", "local")
TIMEOUT_MIN = 720  # a SLURM job's default time limit, minutes


class Executor(Protocol):
    threads: int | None  # torch threads per worker (None: torch's default)

    def describe(self, groups: int) -> str:
        """Where the groups go, for the run's first line."""

    def start(self, tasks: list[GroupTask]) -> None:
        """Send every group off (or queue it)."""

    def poll(self, timeout: float) -> list[tuple[int, GroupOutcome | BaseException]]:
        """Groups finished since the last poll, as (group index, outcome or what stopped the worker);
        waits up to ``timeout`` seconds for the first."""

    def cancel(self) -> None:
        """Ctrl-C: stop every worker (finished cells are on disk already)."""

    def close(self) -> None:
        """Release what ``start`` took (pool processes, a Ray instance this run started)."""


@dataclass
class ExecutorSettings:
    """The command line's choice of executor and its parameters."""

    kind: str = "local"
    jobs: int | None = None  # groups at once: pool size, Ray tasks in flight, SLURM array parallelism
    threads: int | None = None  # torch threads per worker, and the CPUs each Ray task / SLURM job asks for
    ray_address: str | None = None
    cluster: str | None = None  # submitit: slurm (default), or local (processes on this machine)
    slurm_partition: str | None = None
    timeout_min: int | None = None  # default TIMEOUT_MIN
    mem_gb: float | None = None

    def misplaced(self) -> tuple[str, str] | None:
        """(option, its executor) of an option given for another executor than the one chosen (it would
        be silently ignored)."""
        owners = {"--ray-address": ("ray", self.ray_address), "--submitit-cluster": ("submitit", self.cluster),
                  "--slurm-partition": ("submitit", self.slurm_partition),
                  "--timeout-min": ("submitit", self.timeout_min), "--slurm-mem-gb": ("submitit", self.mem_gb)}
        return next(((option, kind) for option, (kind, value) in owners.items()
                     if value is not None and kind != self.kind), None)


def cores() -> int:
    """The cores torch would use on its own (physical cores, or OMP_NUM_THREADS)."""
    return max(1, torch.get_num_threads())


def worker_threads(settings: ExecutorSettings) -> int | None:
    """Torch threads per worker: ``--threads``, else the local cores divided among ``--jobs`` workers
    (a lone local run keeps torch's default), else one per Ray task or SLURM job."""
    if settings.threads:
        return settings.threads
    if settings.kind == "local":
        jobs = settings.jobs or 1
        return None if jobs == 1 else max(1, cores() // jobs)
    return max(1, cores() // settings.jobs) if settings.jobs else 1


def _usage(message: str, key: str) -> EebenchError:
    return EebenchError(message, where="command line", key=key)


def make_executor(settings: ExecutorSettings, device: torch.device, run_dir: Path,
                  name: str) -> Executor | None:
    """The executor ``settings`` ask for, checked before any work (an extra that is not installed, a
    cluster that is not there: one line, exit 2); None for a serial run in this process."""
    if settings.jobs is not None and settings.jobs < 1:
        raise _usage(f"--jobs {settings.jobs}; expected a whole number of at least 1", "--jobs")
    if settings.threads is not None and settings.threads < 1:
        raise _usage(f"--threads {settings.threads}; expected a whole number of at least 1", "--threads")
    misplaced = settings.misplaced()
    if misplaced:
        option, kind = misplaced
        raise _usage(f"{option} is an option of --executor {kind}; expected --executor {kind} with it, or "
                     "no such option", option)
    threads = worker_threads(settings)
    gpus = 1 if device.type == "cuda" else 0
    if settings.kind == "local":
        if (settings.jobs or 1) == 1:
            return None
        from eebench.executors.local import LocalPool

        return LocalPool(settings.jobs or 1, threads)
    if settings.kind == "ray":
        from eebench.executors.ray_tasks import RayTasks

        return RayTasks(settings.ray_address, threads, gpus, settings.jobs)
    if settings.kind == "submitit":
        from eebench.executors.slurm import SubmititJobs

        cluster, timeout = settings.cluster or "slurm", settings.timeout_min or TIMEOUT_MIN
        if cluster not in CLUSTERS:
            raise _usage(f"unknown cluster '{cluster}'; expected one of {', '.join(CLUSTERS)}", "--submitit-cluster")
        if timeout < 1:
            raise _usage(f"--timeout-min {timeout}; expected minutes, at least 1", "--timeout-min")
        if settings.mem_gb is not None and not settings.mem_gb > 0:
            raise _usage(f"--slurm-mem-gb {settings.mem_gb}; expected a positive number of GB", "--slurm-mem-gb")
        return SubmititJobs(run_dir / "submitit", cluster, threads=threads, gpus=gpus, jobs=settings.jobs,
                            partition=settings.slurm_partition, timeout_min=timeout, mem_gb=settings.mem_gb,
                            name=f"eebench-{name}")
    raise _usage(f"unknown executor '{settings.kind}'; expected one of {', '.join(EXECUTORS)}", "--executor")
