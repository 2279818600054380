"""``--executor ray``: each group of cells is one Ray task declaring the CPUs (and GPU) it uses.

The driver connects to ``--ray-address`` (or starts a local Ray instance, or reuses one this
process already started), checks that some node can take a task at all (a task no node fits would
wait forever), and sends every group off. Tasks write their cells into the run directory, which
must therefore be on a filesystem every node sees; a task retried after its worker died skips the
cells it finished before.
"""

from __future__ import annotations

import logging
from typing import Any

from eebench.errors import EebenchError
from eebench.worker import GroupOutcome, GroupTask, run_group

RETRIES = 1  # a worker lost to a node failure is retried once; what it finished is not redone


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise EebenchError("Ray is not installed; expected it for --executor ray: pip install 'eebench[ray]'",
                           where="command line", key="--executor") from exc
    return ray


class RayTasks:
    """Groups as Ray tasks of ``threads`` CPUs and ``gpus`` GPUs each, at most ``jobs`` in flight."""

    def __init__(self, address: str | None, threads: int | None, gpus: int, jobs: int | None) -> None:
        self.ray = import_ray()
        self.address, self.threads, self.gpus, self.jobs = address, threads or 1, gpus, jobs
        self._owns = False
        self._queue: list[GroupTask] = []
        self._refs: dict[Any, int] = {}
        self._remote: Any = None

    def describe(self, groups: int) -> str:
        where = f"the Ray cluster at {self.address}" if self.address else "Ray"
        gpu = f" and {self.gpus} GPU" if self.gpus else ""
        return f"{where}, one task per group with {self.threads} CPU(s){gpu} ({self.threads} torch thread(s))"

    def start(self, tasks: list[GroupTask]) -> None:
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise EebenchError(f"cannot reach Ray ({' '.join(str(exc).split())[:200]}); expected a running "
                                   "cluster's address (ray start --head prints it), or no --ray-address for a "
                                   "local instance", where="command line", key="--ray-address") from exc
            self._owns = True
        self._check_fits()
        self._remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus, max_retries=RETRIES)(run_group)
        # a task's device is "cuda": Ray shows it only the GPU it was given
        self._queue = [_on_assigned_gpu(task) for task in tasks]
        self._submit()

    def _check_fits(self) -> None:
        nodes = [node.get("Resources", {}) for node in self.ray.nodes() if node.get("Alive")]
        cpus = max((node.get("CPU", 0) for node in nodes), default=0)
        gpus = max((node.get("GPU", 0) for node in nodes), default=0)
        if cpus < self.threads:
            raise EebenchError(f"no Ray node has {self.threads} CPUs for a group (the largest has {cpus:g}); "
                               f"expected --threads {max(1, int(cpus))} or less", where="command line",
                               key="--threads")
        if gpus < self.gpus:
            raise EebenchError("no Ray node has a GPU; expected --device cpu, or a cluster with GPUs",
                               where="command line", key="--device")

    def _submit(self) -> None:
        while self._queue and (self.jobs is None or len(self._refs) < self.jobs):
            task = self._queue.pop(0)
            self._refs[self._remote.remote(task)] = task.group.index

    def poll(self, timeout: float) -> list[tuple[int, GroupOutcome | BaseException]]:
        if not self._refs:
            return []
        ray = self.ray
        ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
        out: list[tuple[int, GroupOutcome | BaseException]] = []
        for ref in ready:
            index = self._refs.pop(ref)
            try:
                out.append((index, ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 -- RayTaskError, a worker or node lost
                out.append((index, exc))
        self._submit()
        return out

    def cancel(self) -> None:
        self._queue.clear()
        for ref in list(self._refs):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001,S110 -- already finished
                pass

    def close(self) -> None:
        if self._owns:
            self.ray.shutdown()


def _on_assigned_gpu(task: GroupTask) -> GroupTask:
    if task.device.startswith("cuda"):
        task.device = "cuda"
    return task
