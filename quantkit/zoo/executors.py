"""Where entries are built: the executor seam.

An executor takes a picklable function and a list of tasks and yields `(task, result)`
pairs as entries finish, in any order. The function (`quantkit.zoo.entry.run_task`)
never raises: a failed entry comes back as a result with `status: error`.

- `local`: one entry after another in this process.
- `process` (`--jobs N`): a pool of N spawned processes on this machine; each worker
  gets cpu_count // N torch threads so the pool does not oversubscribe the cores.
- `ray` (`--executor ray`, optional extra `quantkit[ray]`): each entry is a Ray task
  (`num_gpus` per entry, default 1 when the cluster has GPUs) scheduled anywhere on the
  cluster. The zoo folder must be on storage every node sees (NFS, a mounted bucket):
  workers write `DIR/.build/<name>` and rename it into `DIR/<name>` exactly as locally,
  so resuming, idempotence and the manifests work the same. The driver (the machine
  running `quantkit zoo build`) plans the build, then writes the index and checks the gates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from typing import Any, Protocol

from quantkit.errors import QuantkitError
from quantkit.zoo.entry import Task

log = logging.getLogger(__name__)

EXECUTORS = ("local", "process", "ray")
Result = dict[str, Any]


class Executor(Protocol):
    def run(self, fn: Callable[[Task], Result], tasks: list[Task]) -> Iterator[tuple[Task, Result]]: ...


class LocalExecutor:
    """Sequential, in this process."""

    def run(self, fn: Callable[[Task], Result], tasks: list[Task]) -> Iterator[tuple[Task, Result]]:
        for task in tasks:
            yield task, fn(task)


class ProcessExecutor:
    """A pool of `jobs` spawned worker processes (spawn: torch and fork do not mix)."""

    def __init__(self, jobs: int):
        self.jobs = jobs

    def run(self, fn: Callable[[Task], Result], tasks: list[Task]) -> Iterator[tuple[Task, Result]]:
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {pool.submit(fn, replace(t, threads=t.threads or threads)): t for t in tasks}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = pending.pop(fut)
                    try:
                        yield task, fut.result()
                    except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
                        yield task, {"name": task.name, "status": "error", "error": f"worker died: {type(exc).__name__}: {exc}"}


class RayExecutor:
    """Entries as Ray tasks on a cluster (`address` None: $RAY_ADDRESS, else a local Ray instance)."""

    def __init__(self, address: str | None = None, gpus_per_entry: float | None = None, cpus_per_entry: float = 1.0):
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # refuse before any planning work
            raise QuantkitError("--executor ray needs Ray: pip install 'quantkit[ray]'")
        self.address = address
        self.gpus = gpus_per_entry
        self.cpus = cpus_per_entry

    def run(self, fn: Callable[[Task], Result], tasks: list[Task]) -> Iterator[tuple[Task, Result]]:
        try:
            import ray
        except ImportError:
            raise QuantkitError("--executor ray needs Ray: pip install 'quantkit[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address or os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
                     log_to_driver=True)
        gpus = self.gpus if self.gpus is not None else (1.0 if ray.cluster_resources().get("GPU") else 0.0)
        remote = ray.remote(num_gpus=gpus, num_cpus=self.cpus, max_retries=1)(fn)
        pending = {remote.remote(t): t for t in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    yield task, ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - node lost, worker crashed: reported per entry
                    yield task, {"name": task.name, "status": "error", "error": f"ray task failed: {type(exc).__name__}: {exc}"}


def make_executor(name: str = "local", jobs: int = 1, ray_address: str | None = None,
                  gpus_per_entry: float | None = None) -> Executor:
    if name not in EXECUTORS:
        raise QuantkitError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise QuantkitError(f"--jobs must be at least 1, got {jobs}")
    if name == "ray":
        return RayExecutor(ray_address, gpus_per_entry)
    if name == "process" or jobs > 1:
        return ProcessExecutor(jobs)
    return LocalExecutor()
