"""``--executor submitit``: each group of cells is one SLURM job (an array job), via submitit.

submitit pickles ``run_group`` and its task, submits them, and keeps each job's stdout, stderr
and pickles in ``RUN_DIR/submitit/<job id>/``. The jobs write their cells into the run directory,
which must be on a filesystem the nodes share (it is, on any SLURM cluster submitit supports).
``--submitit-cluster local`` runs the same jobs as processes on this machine (submitit's local
executor), which is how the tests run it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from eebench.errors import EebenchError
from eebench.worker import GroupOutcome, GroupTask, run_group

CHECK_EVERY = 0.5  # seconds between looks at the jobs' states while polling


def import_submitit() -> Any:
    try:
        import submitit
    except ImportError as exc:
        raise EebenchError("submitit is not installed; expected it for --executor submitit: "
                           "pip install 'eebench[slurm]'", where="command line", key="--executor") from exc
    return submitit


class SubmititJobs:
    """Groups as submitit jobs of ``threads`` CPUs (and ``gpus`` GPUs), logs under ``folder``."""

    def __init__(self, folder: Path, cluster: str, *, threads: int | None, gpus: int, jobs: int | None,
                 partition: str | None, timeout_min: int, mem_gb: float | None, name: str) -> None:
        self.submitit = import_submitit()
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise EebenchError("no SLURM on this machine (sbatch not found); expected a SLURM login node, or "
                               "--submitit-cluster local to run the jobs here", where="command line",
                               key="--executor")
        self.folder, self.cluster, self.threads, self.gpus = folder, cluster, threads or 1, gpus
        self.jobs, self.partition, self.timeout_min, self.mem_gb, self.name = jobs, partition, timeout_min, mem_gb, name
        self._jobs: dict[Any, int] = {}

    def describe(self, groups: int) -> str:
        where = f"SLURM partition {self.partition}" if self.partition else f"submitit ({self.cluster})"
        gpu = f" and {self.gpus} GPU" if self.gpus else ""
        return (f"{where}, one job per group with {self.threads} CPU(s){gpu}, {self.timeout_min} min; logs in "
                f"{self.folder}")

    def start(self, tasks: list[GroupTask]) -> None:
        executor = self.submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
        parameters: dict[str, Any] = {"name": self.name, "timeout_min": self.timeout_min,
                                      "cpus_per_task": self.threads, "gpus_per_node": self.gpus}
        if self.mem_gb:
            parameters["mem_gb"] = self.mem_gb
        if self.partition:
            parameters["slurm_partition"] = self.partition
        if self.jobs:
            parameters["slurm_array_parallelism"] = self.jobs
        executor.update_parameters(**parameters)
        jobs = executor.map_array(run_group, tasks)
        self._jobs = {job: task.group.index for job, task in zip(jobs, tasks, strict=True)}

    def poll(self, timeout: float) -> list[tuple[int, GroupOutcome | BaseException]]:
        deadline = time.monotonic() + timeout
        while True:
            finished = [job for job in self._jobs if job.done()]
            if finished or time.monotonic() >= deadline:
                break
            time.sleep(CHECK_EVERY)
        out: list[tuple[int, GroupOutcome | BaseException]] = []
        for job in finished:
            index = self._jobs.pop(job)
            try:
                out.append((index, job.result()))
            except Exception as exc:  # noqa: BLE001 -- FailedJobError, UncompletedJobError (timeout, preempted)
                out.append((index, exc))
        return out

    def cancel(self) -> None:
        for job in self._jobs:
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001,S110 -- already finished
                pass

    def close(self) -> None:
        self._jobs.clear()
