"""Run a graph of jobs: one after another in this process, on a local process pool, or as Ray tasks.

A job is a picklable `spec` for a top-level function `fn(spec)`, the names of the jobs it waits
for, and what it takes (CPU threads; a GPU when it trains on CUDA). `run_graph` is the driver and
the only one that acts on what a job returns: it starts a job once every job it waits for has
succeeded, starts a failed job again up to `retries` times, then reports it and the jobs that
waited for it, and on Ctrl-C cancels what runs and what waits. An executor only starts jobs and
collects their outcomes, so the three give the same results.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

EXECUTORS = ("local", "process", "ray")


@dataclass(frozen=True)
class Job:
    name: str  # unique within a graph
    spec: Any  # what fn is called with: picklable, since the process and Ray executors ship it
    after: tuple[str, ...] = ()  # jobs that must succeed first
    threads: int = 1  # CPU threads the job uses (Ray reserves as many CPUs)
    gpus: float = 0.0  # GPUs it takes (Ray reserves them; the other executors share the machine's)


@dataclass
class Outcome:
    done: dict[str, Any] = field(default_factory=dict)  # job name -> what fn returned
    failed: dict[str, str] = field(default_factory=dict)  # job name -> its last error, after every try
    blocked: dict[str, str] = field(default_factory=dict)  # job name -> the failed job it waited for
    errors: dict[str, BaseException] = field(default_factory=dict)  # job name -> its last exception


def check_graph(jobs: list[Job]) -> None:
    """Unique names, known dependencies and no cycle; ValueError naming the offender otherwise."""
    names = [j.name for j in jobs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"two jobs are named {dup!r}")
    known = set(names)
    for j in jobs:
        missing = [d for d in j.after if d not in known]
        if missing:
            raise ValueError(f"job {j.name!r} waits for {missing[0]!r}, which is not in the graph")
    after = {j.name: j.after for j in jobs}
    state: dict[str, int] = {}  # 1: on the current path, 2: checked

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ValueError(f"the jobs wait for each other in a cycle: {' -> '.join([*path, n])}")
        state[n] = 1
        for d in after[n]:
            visit(d, [*path, n])
        state[n] = 2

    for n in names:
        visit(n, [])


def run_graph(jobs: list[Job], fn: Callable[[Any], Any], executor: "Executor", *,
              on_done: Callable[[Job, Any], None] = lambda j, r: None,
              on_start: Callable[[Job], None] = lambda j: None, retries: int = 1,
              no_retry: tuple[type[BaseException], ...] = (), log: Callable[[str], None] = lambda s: None) -> Outcome:
    """Run every job whose dependencies succeed, in graph order (ties: list order). The driver
    calls `on_start(job)` as it starts a job and `on_done(job, result)` as one succeeds. A job that
    fails with one of `no_retry` (bad input: it would fail the same way again) is not started again.
    Ctrl-C (KeyboardInterrupt) cancels the running jobs, then propagates."""
    check_graph(jobs)
    out = Outcome()
    waiting = {j.name: j for j in jobs}
    running: dict[Any, Job] = {}
    tries: dict[str, int] = {}
    try:
        while waiting or running:
            _block(waiting, out, log)
            for j in [j for j in waiting.values() if all(d in out.done for d in j.after)]:
                if len(running) >= executor.slots:
                    break
                del waiting[j.name]
                tries[j.name] = tries.get(j.name, 0) + 1
                on_start(j)
                running[executor.submit(fn, j)] = j
            if not running:
                break
            for handle, result in executor.collect(list(running)):
                j = running.pop(handle)
                if not isinstance(result, BaseException):
                    out.done[j.name] = result
                    on_done(j, result)
                    continue
                if tries[j.name] <= retries and not isinstance(result, no_retry):
                    log(f"{j.name}: failed ({first_line(result)}); starting it again "
                        f"(try {tries[j.name] + 1} of {retries + 1})")
                    waiting[j.name] = j
                else:
                    out.failed[j.name] = _describe(result)
                    out.errors[j.name] = result
                    log(f"{j.name}: failed after {tries[j.name]} tr{'y' if tries[j.name] == 1 else 'ies'}: "
                        f"{out.failed[j.name]}")
        _block(waiting, out, log)
    except BaseException:  # Ctrl-C, or the driver's own error: nothing keeps running behind it
        executor.cancel()
        raise
    finally:
        executor.close()
    return out


def _block(waiting: dict[str, Job], out: Outcome, log: Callable[[str], None]) -> None:
    """Move the waiting jobs that depend on a failed or blocked job to `out.blocked`."""
    changed = True
    while changed:
        changed = False
        for name, j in list(waiting.items()):
            bad = next((d for d in j.after if d in out.failed or d in out.blocked), None)
            if bad is not None:
                root = out.blocked.get(bad, bad)
                out.blocked[name] = root
                del waiting[name]
                log(f"{name}: not run, as {root} failed")
                changed = True


def cause_of(e: BaseException) -> BaseException:
    """The job's own exception (Ray wraps it in a RayTaskError that keeps it as `cause`)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def first_line(e: BaseException) -> str:
    """The exception's type and the first line of its message."""
    e = cause_of(e)
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _describe(e: BaseException) -> str:
    """The exception and the last frames of its traceback (a Ray error already carries the remote one)."""
    tb = "".join(traceback.format_exception(e)[-4:]).strip()
    return tb[-2000:]


# ---------------------------------------------------------------------------------------------------


class Executor:
    """Starts jobs and collects their outcomes; `slots`: how many may run at once."""

    slots = 1

    def submit(self, fn: Callable[[Any], Any], job: Job) -> Any:
        raise NotImplementedError

    def collect(self, handles: list[Any]) -> list[tuple[Any, Any]]:
        """Block until at least one of `handles` ends; (handle, result or exception) for each that did."""
        raise NotImplementedError

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


class LocalExecutor(Executor):
    """Each job in this process, when it is collected: the plan's order, nothing in parallel."""

    def __init__(self) -> None:
        self._queued: dict[int, tuple[Callable, Job]] = {}
        self._n = 0

    def submit(self, fn, job):
        self._n += 1
        self._queued[self._n] = (fn, job)
        return self._n

    def collect(self, handles):
        h = handles[0]
        fn, job = self._queued.pop(h)
        try:
            return [(h, fn(job.spec))]
        except Exception as e:  # the job failed; Ctrl-C and exits are not a job's failure
            return [(h, e)]


class ProcessExecutor(Executor):
    """A pool of `workers` fresh processes (spawned: a forked torch would share thread pools and
    locks). A worker that dies (killed, out of memory) fails the jobs it ran; the pool is started
    again for the rest."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"--jobs must be >= 1, got {workers}")
        self.slots = workers
        self._pool = None

    def _ensure_pool(self):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.slots, mp_context=mp.get_context("spawn"))
        return self._pool

    def submit(self, fn, job):
        return self._ensure_pool().submit(fn, job.spec)

    def collect(self, handles):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        finished, _ = wait(handles, return_when=FIRST_COMPLETED)
        out = []
        for f in finished:
            e = f.exception()
            if isinstance(e, BrokenProcessPool):
                self._pool = None  # every job it held fails; the next submit starts a new pool
            out.append((f, e if e is not None else f.result()))
        return out

    def cancel(self):
        if self._pool is not None:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.terminate()  # a worker mid-epoch stops now; its run resumes from its last checkpoint
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class RayExecutor(Executor):
    """Each job a Ray task that reserves its threads as CPUs (and its GPUs), on the cluster at
    `address` ('auto': the one started on this machine by `ray start`; None: a private one of
    `workers` CPUs, started here and stopped at the end). Ray's own retries are off: the driver
    retries, so that a failed job is counted once."""

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError("--executor ray needs Ray: pip install -e '.[ray]'") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # its workers at normal priority: Ray's default (niceness 15) starves them beside other work
                ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                         _system_config={"worker_niceness": 0})
                self._started = True
        self.slots = 1 << 30  # Ray queues what its nodes cannot hold yet
        self._remote: dict[Callable, Any] = {}
        self._live: set = set()

    def submit(self, fn, job):
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(max_retries=0)(fn)
        ref = self._remote[fn].options(num_cpus=job.threads, num_gpus=job.gpus).remote(job.spec)
        self._live.add(ref)
        return ref

    def collect(self, handles):
        ready, _ = self._ray.wait(handles, num_returns=1)
        out = []
        for ref in ready:
            self._live.discard(ref)
            try:
                out.append((ref, self._ray.get(ref)))
            except Exception as e:  # the task's error (RayTaskError), or its worker died
                out.append((ref, e))
        return out

    def cancel(self):
        for ref in self._live:  # queued ones are dropped, running ones stopped
            self._ray.cancel(ref, force=True)
        self._live.clear()

    def close(self):
        if self._started:
            self._ray.shutdown()  # a private cluster: its workers (and their jobs) stop with it
        self._started = False


def make_executor(kind: str, jobs: int = 1, address: str | None = None) -> Executor:
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; known: {', '.join(EXECUTORS)}")
    if kind == "local":
        return LocalExecutor()
    if kind == "process":
        return ProcessExecutor(jobs)
    return RayExecutor(address, jobs)
