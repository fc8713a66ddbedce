"""Run one function over many jobs on a ``dask.distributed`` cluster: a :class:`LocalCluster`
on this machine by default, or an existing cluster's scheduler (``tcp://HOST:PORT``), with
the same code.

Each worker of a local cluster is its own process running one job at a time (dask threads
per worker: 1); the jobs themselves are told how many torch threads to use, so workers ×
threads fill the machine's cores (:func:`local_layout`). A job that raises, or whose worker
dies (dask retries it on another worker first), is handed back as its exception; the other
jobs go on. ``distributed`` is imported only when a cluster is used.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from learnreg.core.errors import InputError

__all__ = ["ClusterInfo", "available_cores", "local_layout", "run_jobs"]


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def local_layout(
    n_jobs: int, workers: int | None = None, threads: int | None = None, cores: int | None = None
) -> tuple[int, int]:
    """``(workers, torch threads per worker)`` for ``n_jobs`` jobs on ``cores`` cores
    (default: this machine's): as many single-job workers as cores (never more than jobs),
    and the cores shared out among them as threads. Either may be given."""
    cores = cores or available_cores()
    for name, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if workers is None:
        workers = max(1, min(n_jobs, cores // (threads or 1)))
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads


@dataclass(frozen=True)
class ClusterInfo:
    """Where the jobs ran: the scheduler's address, workers, dask threads per worker."""

    address: str
    workers: int
    threads_per_worker: int
    local: bool


@contextmanager
def _client(scheduler: str | None, workers: int) -> Iterator[tuple[Any, ClusterInfo]]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError(
            "batch registration needs dask.distributed: pip install 'dask[distributed]'"
        ) from None
    if scheduler is None:
        with warnings.catch_warnings():  # its HTTP port taken by another cluster: any will do
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        with cluster, Client(cluster) as client:
            yield client, ClusterInfo(cluster.scheduler_address, workers, 1, True)
        return
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError, ValueError) as e:
        raise InputError(f"--scheduler {scheduler}: cannot connect ({e})") from None
    with client:
        info = client.scheduler_info()["workers"]
        if not info:
            raise InputError(f"--scheduler {scheduler}: the cluster has no workers")
        per = max(w.get("nthreads", 1) for w in info.values())
        yield client, ClusterInfo(scheduler, len(info), per, False)


def run_jobs(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    *,
    scheduler: str | None = None,
    workers: int = 1,
    names: Sequence[str] | None = None,
    started: Callable[[ClusterInfo], None] | None = None,
    done: Callable[[int, Any, BaseException | None], None] | None = None,
) -> list[Any]:
    """``fn(job)`` for every job on the cluster (``scheduler``'s, or a local one of
    ``workers`` processes), in whatever order they finish.

    ``started(info)`` is called once the cluster is up; ``done(index, result, error)`` as
    each job finishes (``error`` is the exception it raised, or that its worker died:
    ``distributed.KilledWorker``; ``result`` is then None). ``fn`` and the jobs must be
    picklable, and importable by the workers (a module-level function of learnreg).
    Returns the results in the jobs' order (None where a job failed).
    """
    from distributed import as_completed

    results: list[Any] = [None] * len(jobs)
    if not jobs:
        return results
    names = list(names) if names is not None else [str(i) for i in range(len(jobs))]
    with _client(scheduler, workers) as (client, info):
        if started is not None:
            started(info)
        token = os.urandom(4).hex()
        futures = {
            client.submit(fn, job, key=f"learnreg-{names[i]}-{token}", pure=False): i
            for i, job in enumerate(jobs)
        }
        try:
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i], error = future.result(), None
                except Exception as e:  # the job raised, or its worker died
                    error = e
                if done is not None:
                    done(i, results[i], error)
        finally:
            for future in futures:
                future.release()
    return results
