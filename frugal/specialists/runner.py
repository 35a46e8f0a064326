"""Independent jobs (the tree's node trainings) run serially, on a local process pool, or on Ray.

Each job is a plain dict and `fn(job)` a top-level function, so any backend can ship it. Every
job sets one torch thread itself: results do not depend on the backend, the worker or the order
(the tests check that the pool and the serial runner train identical nodes).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

BACKENDS = ("serial", "process", "ray")


def run_jobs(fn: Callable[[dict[str, Any]], Any], jobs: list[dict[str, Any]], backend: str = "process",
             workers: int = 2, costs: Sequence[float] | None = None) -> list[Any]:
    """Results of fn(job) for each job, in job order. With `costs` (say each job's number of
    training examples), the pool starts the costliest jobs first, so that no worker is left with a
    long job at the end while the others idle."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not jobs:
        return []
    if costs is not None:
        if len(costs) != len(jobs):
            raise ValueError(f"{len(costs)} costs for {len(jobs)} jobs: give one cost per job")
        order = sorted(range(len(jobs)), key=lambda i: -costs[i])
        done = run_jobs(fn, [jobs[i] for i in order], backend, workers)
        results: list[Any] = [None] * len(jobs)
        for i, r in zip(order, done):
            results[i] = r
        return results
    if backend == "serial" or (backend == "process" and workers <= 1):
        return [fn(j) for j in jobs]
    if backend == "process":
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per worker (fork would copy torch's thread pools and locks)
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(fn, jobs))
    try:
        import ray
    except ImportError:
        raise RuntimeError("the ray backend needs Ray: pip install -e '.[ray]'") from None
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(fn)
    return ray.get([remote.remote(j) for j in jobs])
