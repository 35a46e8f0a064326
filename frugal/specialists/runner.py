"""Independent jobs (the tree's node trainings) run serially, on a local process pool, or on Ray.

Each job is a plain dict and `fn(job)` a top-level function, so any backend can ship it. Every
job sets one torch thread itself: results do not depend on the backend, the worker or the order
(the tests check that the pool and the serial runner train identical nodes).
"""

from __future__ import annotations

import ast
import sys
import warnings
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

        where = unguarded_script_call()
        if where:  # each spawned worker would import the script and run its top-level code again
            warnings.warn(f"the process pool is called from top-level code of {where} that is not under "
                          "`if __name__ == '__main__':`; every worker would run that script again, so the jobs run "
                          "serially here. Put the call under that guard to use the pool.", stacklevel=3)
            return [fn(j) for j in jobs]

        # spawn: a fresh interpreter per worker (fork would copy torch's thread pools and locks)
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(fn, jobs))
    from frugal.executors import Job, RayExecutor, run_graph

    out = run_graph([Job(str(i), j) for i, j in enumerate(jobs)], fn, RayExecutor(None, workers), retries=0)
    if out.failed:
        raise RuntimeError(f"a job failed on Ray: {next(iter(out.failed.values()))}")
    return [out.done[str(i)] for i in range(len(jobs))]


def unguarded_script_call() -> str | None:
    """'script.py, line N' when the current call comes from top-level code of the __main__ script
    outside an `if __name__ == "__main__":` block (where a spawned worker, which imports the
    script, would run it again); None otherwise (a function, a guarded block, an interactive shell,
    `python -m`, a notebook)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or getattr(main, "__spec__", None) is not None:  # -m runs import the module by name, guarded or not
        return None
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") != "__main__":
        frame = frame.f_back
    if frame is None or frame.f_code.co_name != "<module>":
        return None  # not called from the script, or from inside one of its functions
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError, ValueError):
        return None
    line = frame.f_lineno
    for node in tree.body:
        if isinstance(node, ast.If) and _is_main_guard(node.test) and node.lineno <= line <= node.end_lineno:
            return None
    return f"{path}, line {line}"


def _is_main_guard(test: ast.expr) -> bool:
    """`__name__ == "__main__"` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return (any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides)
            and any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides))
