"""The main job: run registered methods on their tasks, measure every trained model, write results.

A method is a function `run(ctx, task, seed) -> list[row]` registered with `@register_method`.
Rows are flat dicts of measured fields (see `frugal.measure.measure`) plus method, task, variant,
seed. The spine registers only `baseline`; ideas register their methods from their own modules,
which are found through the `frugal.ideas` entry-point group (the spine never imports an idea).

The plan is a graph of jobs: one per (method, task, seed) unit, or per part of one where the
method splits its plan (`Part`), run by an executor (`frugal.executors`: in this process, on local
worker processes, or on Ray). One driver per --out writes results.json: each job's rows and its
record as the job ends. Each training run keeps its checkpoints, so a killed bench started again
with the same --out runs only the jobs without a record, and those resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fnmatch
import functools
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .data import KNOWN, load_task, task_slug
from .data.sources import FOLDER_PREFIX
from .measure import measure
from .executors import Job
from .methods import (  # noqa: F401  (ideas import them here)
    Method, Part, Summary, get_method, list_methods, register_method)
from .train import CHECKPOINT, WEIGHTS, TrainConfig, copy_run, train, waiting_for_held_runs
from .report import check_rows
from .utils import LockHeld, atomic_write_json, file_lock, read_json, remove_stale_temp_files, resolve_device, versions

BUDGETS = ("tiny", "quick", "full")  # tiny: seconds, for tests; quick: < 10 min; full: the real figures


@dataclass(frozen=True)
class BenchContext:
    out_dir: Path  # bench output folder; training runs go under out_dir/runs/
    budget: str  # tiny | quick | full
    device: torch.device
    data_dir: str | None = None  # data cache override
    corrupted: bool = False  # also measure accuracy on the corrupted test suites
    process_id: str = ""  # rows measured in the same process share it: their times are comparable
    quiet: bool = True  # no per-epoch lines on stderr
    variants: tuple[str, ...] = ()  # glob patterns on variant labels; empty: every variant of the plan
    model: str | None = None  # the user's model (a registered name or an import path) for the methods that take one
    note: Callable[[str], None] = lambda s: None  # a line for the user: why a method skips a part of its plan
    headline: bool = False  # the front door: each method runs its headline comparison only, with its control
    part: tuple[str, ...] = ()  # the job's part of the unit's plan (frugal.methods.Part): variants it trains

    def base_config(self, task: str, seed: int, planned: tuple[str, ...] = ()) -> TrainConfig:
        """Where an idea's plan for a task starts (see idea_base_config); `planned`: the tasks the
        idea has plans of its own for."""
        return idea_base_config(task, self.budget, seed, planned, device=str(self.device), data_dir=self.data_dir,
                                model=self.model)

    def wants(self, variant: str) -> bool:
        """Whether the bench was asked for this variant (a method that registers `selectable=True`
        asks before it trains one), and is the job's part of the unit (`part`)."""
        return ((not self.variants or any(fnmatch.fnmatchcase(variant, p) for p in self.variants))
                and (not self.part or any(fnmatch.fnmatchcase(variant, p) for p in self.part)))

    @property
    def figures(self) -> Path:
        """Where methods put pictures for the report (explanations, kernels, ...)."""
        return self.out_dir / "figures"

    def run_dir(self, method: str, task: str, seed: int, variant: str = "") -> Path:
        name = f"{variant}-seed{seed}" if variant else f"seed{seed}"
        return self.out_dir / "runs" / method / task_slug(task) / name


# ---------------------------------------------------------------------------------------------------
# The baseline: a standard CNN per task, trained plainly. Every idea is compared with these rows.

@dataclass(frozen=True)
class Stage:
    """What one budget changes in a recipe: passes over the training split, and how much of it."""

    epochs: int
    train_limit: int | None = None  # the first N training examples; None: all
    augment: str | None = None  # None: the training loop's default


@dataclass(frozen=True)
class Recipe:
    """How a model is trained on a task: the model and the settings every budget shares, then per
    budget (tiny: one short epoch, to test the plumbing). lr is the peak rate per step; an unset
    field keeps TrainConfig's default. Every idea's plans start from the task's recipe, so that
    the rows of one model on one task are trained alike."""

    model: str
    optimizer: str
    lr: float
    batch_size: int
    quick: Stage
    full: Stage
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    tiny: Stage = Stage(epochs=1, train_limit=256)

    def config(self, task: str, budget: str, seed: int, *, device: str = "auto", data_dir: str | None = None,
               model: str | None = None) -> TrainConfig:
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; known: {', '.join(BUDGETS)}")
        stage: Stage = getattr(self, budget)
        kw = {k: v for k, v in dict(weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs,
                                    train_limit=stage.train_limit, augment=stage.augment).items() if v is not None}
        return TrainConfig(task=task, model=model or self.model, seed=seed, device=device, data_dir=data_dir,
                           optimizer=self.optimizer, lr=self.lr, batch_size=self.batch_size, epochs=stage.epochs, **kw)


_LENET_ADAM = dict(optimizer="adam", lr=1e-3, batch_size=128)
_CONVNET_ADAM = dict(optimizer="adam", lr=2e-3, batch_size=128)
BASELINE_RECIPES: dict[str, Recipe] = {
    "mnist": Recipe("lenet5", **_LENET_ADAM, quick=Stage(3), full=Stage(12, augment="shift")),
    "fashion-mnist": Recipe("resnet", optimizer="sgd", lr=0.1, batch_size=128, weight_decay=5e-4, warmup_epochs=0.5,
                            quick=Stage(2), full=Stage(15, augment="shift-flip")),
    "translated-mnist-60": Recipe("convnet", **_CONVNET_ADAM, quick=Stage(2, 20000), full=Stage(10)),
    "cluttered-mnist-60": Recipe("convnet", **_CONVNET_ADAM, quick=Stage(2, 20000), full=Stage(10)),
    "cluttered-mnist-100": Recipe("convnet", **_CONVNET_ADAM, quick=Stage(2, 10000), full=Stage(10)),
    "digits": Recipe("convnet", optimizer="adam", lr=3e-3, batch_size=64, quick=Stage(10), full=Stage(30)),
}
# Any other task (a user's `folder:` data): the plain CNN, or the user's --model, at a rate Adam
# takes on every task above; quick caps the training set so that a run stays within minutes. On a
# small data set a few epochs are a few dozen steps, too few to learn anything: `sized` raises the
# epochs until a run takes at least MIN_STEPS optimiser steps (within MAX_EPOCHS).
DEFAULT_RECIPE = Recipe("convnet", **_CONVNET_ADAM, quick=Stage(2, 20000), full=Stage(10))
MIN_STEPS = dict(quick=300, full=2000)
MAX_EPOCHS = dict(quick=30, full=100)


def sized(recipe: Recipe, train_examples: int) -> Recipe:
    """The recipe with each budget's epochs raised so that a run takes at least MIN_STEPS steps."""
    def stage(budget: str) -> Stage:
        st: Stage = getattr(recipe, budget)
        n = min(train_examples, st.train_limit or train_examples)
        steps = max(1, math.ceil(n / recipe.batch_size))
        wanted = min(MAX_EPOCHS[budget], math.ceil(MIN_STEPS[budget] / steps))
        return dataclasses.replace(st, epochs=max(st.epochs, wanted))

    return dataclasses.replace(recipe, quick=stage("quick"), full=stage("full"))


@functools.lru_cache(maxsize=64)
def _train_size(task: str, data_dir: str | None) -> int:
    """The training split's size (read once per process: every method's plan asks for it)."""
    return len(load_task(task, data_dir=data_dir).train)


def recipe_for(task: str, data_dir: str | None = None) -> Recipe:
    """The task's recipe; a task without one gets DEFAULT_RECIPE sized to its training split."""
    if task in BASELINE_RECIPES:
        return BASELINE_RECIPES[task]
    return sized(DEFAULT_RECIPE, _train_size(task, data_dir))


def baseline_config(task: str, budget: str, seed: int, device: str = "auto",
                    data_dir: str | None = None, model: str | None = None) -> TrainConfig:
    """The baseline's training config: the task's recipe (DEFAULT_RECIPE sized to the data for a
    task without one), with `model` (the user's --model) in place of the recipe's model when given."""
    return recipe_for(task, data_dir).config(task, budget, seed, device=device, data_dir=data_dir, model=model)


def idea_base_config(task: str, budget: str, seed: int, planned: tuple[str, ...] = (), *, device: str = "auto",
                     data_dir: str | None = None, model: str | None = None) -> TrainConfig:
    """The baseline's config on a task an idea plans for (`planned`; digits, for the tests, is the
    mnist recipe with the plain convnet), and on any other task the baseline's recipe with the
    user's `model`."""
    if task == "digits":
        return dataclasses.replace(baseline_config("mnist", budget, seed, device=device, data_dir=data_dir),
                                   task="digits", model="convnet")
    return baseline_config(task, budget, seed, device=device, data_dir=data_dir,
                           model=None if task in planned else model)


def plan_fields(cfg: TrainConfig, data) -> dict[str, Any]:
    """What a row was trained with, for the report's plan column: epochs and training examples."""
    n = len(data.train) if cfg.train_limit is None else min(len(data.train), cfg.train_limit)
    return {"epochs": cfg.epochs, "train_examples": n}


def reuse_baseline(ctx: BenchContext, cfg: TrainConfig, run_dir: Path) -> bool:
    """Copy the baseline's finished run of the same task and seed into `run_dir` when it was trained
    with exactly `cfg`; False (nothing copied) otherwise."""
    src = ctx.run_dir("baseline", cfg.task, cfg.seed)
    if run_dir.exists() or src.resolve() == run_dir.resolve() or not (src / WEIGHTS).exists():
        return False
    try:
        if TrainConfig.from_dict(read_json(src / "config.json", "")["config"]) != cfg:
            return False
    except (ValueError, KeyError, TypeError):  # not a run this bench wrote: train as usual
        return False
    copy_run(src, run_dir)
    return True


def train_and_measure(ctx: BenchContext, cfg: TrainConfig, run_dir: Path,
                      extra: Callable[[torch.nn.Module, Any], dict[str, Any]] | None = None,
                      **train_kw) -> dict[str, Any]:
    """Train (resuming a run a killed bench left behind) and measure: the row fields of one model.
    `extra(model, data)` may add a method's own measured fields (and write figures). A run that is
    exactly the baseline's (same config and seed, no hooks or model of its own) starts from a copy
    of the baseline's finished run instead of training again."""
    if not train_kw:
        reuse_baseline(ctx, cfg, run_dir)
    resume = (run_dir / CHECKPOINT).exists()
    data = load_task(cfg.task, data_dir=ctx.data_dir, val_size=cfg.val_size)
    res = train(cfg, run_dir, resume=resume, data=data, quiet=ctx.quiet, progress=False, **train_kw)
    has_suite = f"{cfg.task}-c" in KNOWN  # --corrupted covers the tasks that have a corrupted suite
    row = measure(res.model, data, ctx.device, corrupted=ctx.corrupted and has_suite, data_dir=ctx.data_dir,
                  speed=ctx.budget != "tiny")
    row.update(val_acc=res.val_acc, train_seconds=res.train_seconds, **plan_fields(cfg, data),
               model=cfg.model, run_dir=str(run_dir.relative_to(ctx.out_dir)))
    if extra is not None:
        row.update(extra(res.model, data))
    return row


@register_method("baseline", tasks=(*BASELINE_RECIPES, "*"), headline_tasks=("mnist",),
                 default_tasks=("mnist", "fashion-mnist", "cluttered-mnist-60"),
                 description="a standard CNN per task (or the user's --model), trained plainly: the control for "
                             "every idea")
def run_baseline(ctx: BenchContext, task: str, seed: int) -> list[dict[str, Any]]:
    cfg = baseline_config(task, ctx.budget, seed, device=str(ctx.device), data_dir=ctx.data_dir, model=ctx.model)
    row = train_and_measure(ctx, cfg, ctx.run_dir("baseline", task, seed))
    row["variant"] = cfg.model
    return [row]


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    out: str = "bench-out"  # output folder
    budget: str = "full"  # tiny | quick | full
    methods: tuple[str, ...] = ("baseline",)  # registered method names
    tasks: tuple[str, ...] = ()  # empty: each method's default tasks
    seeds: int = 3  # seeds per (method, task); seeds are 0..seeds-1
    device: str = "auto"
    data_dir: str | None = None
    corrupted: bool = False  # measure accuracy on the corrupted suites (mnist, fashion-mnist)
    threads: int | None = None  # torch intra-op threads; None = torch's default (one per job off the local executor)
    verbose: bool = False  # per-epoch lines on stderr
    variants: tuple[str, ...] = ()  # glob patterns on variant labels, e.g. ("plain", "snap *"); empty: all
    model: str | None = None  # the user's model (registered name or import path 'pkg.mod:fn') for the baseline
    headline: bool = False  # every method's headline comparison on its headline task (`frugal bench --quick`)
    executor: str = "local"  # local | process | ray (frugal.executors)
    jobs: int = 1  # workers of the process executor (and CPUs of a private Ray instance)
    address: str | None = None  # a Ray cluster's address ('auto', or HOST:PORT); None: a private one
    retries: int = 1  # a failed job is started again this many times before it is reported


class BenchIncomplete(RuntimeError):
    """The bench ended with runs of its plan missing from results.json (`frugal bench` exits 3)."""


BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError)  # a job's bad input: not retried; the bench exits 2


class BenchBusy(ValueError):
    """Another bench drives the same --out (`frugal bench` exits 2, naming the folder)."""


def _read_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"meta": {}, "rows": [], "jobs": []}
    fix = "move it away or choose another --out"
    res = read_json(path, f"it is not a frugal results file; {fix}")
    if not isinstance(res, dict) or not isinstance(res.get("rows"), list) or not isinstance(res.get("meta", {}), dict):
        raise ValueError(f"{path} is not a frugal results file (no list of rows); {fix}")
    if not isinstance(res.get("jobs", []), list) or not all(isinstance(j, dict) for j in res.get("jobs", [])):
        raise ValueError(f"{path} is not a frugal results file (its jobs are not a list of records); {fix}")
    check_rows(res["rows"], path)
    res.setdefault("meta", {})
    res.setdefault("jobs", [])
    return res


def _append_rows(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                 job: dict[str, Any] | None = None) -> None:
    """Add the new rows (and the record of the job that measured them) to results.json, written
    atomically. A new row replaces an older one of the same method, task, seed and variant (a
    selection run measured before the whole plan, say). Only the bench's driver writes it."""
    new = {(r["method"], r["task"], r["seed"], r["variant"]) for r in rows}
    res = _read_results(path)
    res["rows"] = [r for r in res["rows"]
                   if (r["method"], r["task"], r["seed"], r.get("variant", r["method"])) not in new] + rows
    if job is not None:
        res["jobs"] = [j for j in res["jobs"] if _job_key(j) != _job_key(job)] + [job]
    res["meta"] = {**meta, "updated": dt.datetime.now().isoformat(timespec="seconds")}
    atomic_write_json(path, res)


def _job_key(j: dict[str, Any]) -> tuple:
    return (j.get("method"), j.get("task"), j.get("seed"), j.get("part"), j.get("selection"))


@dataclass(frozen=True)
class JobSpec:
    """One job of the bench's graph, as a worker gets it: what it needs to build its BenchContext
    and run one part of one (method, task, seed) unit. Picklable; paths are absolute."""

    config: BenchConfig
    out: str
    driver_id: str
    method: str
    module: str  # where the method is registered (imported by a worker that does not know it yet)
    task: str
    seed: int
    part: str  # "" for a unit of one job
    patterns: tuple[str, ...]  # the part's variants; () for the whole unit
    others: tuple[tuple[str, ...], ...]  # the unit's other parts' patterns (see run_job)
    selection: str
    trusted: tuple[str, ...]  # modules the user trusts for model code (--trust-model)

    @property
    def name(self) -> str:
        return f"{self.method} {self.task} seed {self.seed}" + (f" [{self.part}]" if self.part else "")


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Run one job (in whichever process the executor chose): its rows, its notes for the user,
    and where and how long it ran. Rows are kept when their variant is the part's, or is one no
    other part of the unit trains under this selection (a reference that came along)."""
    import os
    import socket

    from .models import trust_model_source

    cfg = spec.config
    for module in spec.trusted:
        trust_model_source(module)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    method = _find_method(spec.method, spec.module)
    notes: list[str] = []
    ctx = BenchContext(Path(spec.out), cfg.budget, resolve_device(cfg.device), cfg.data_dir, cfg.corrupted,
                       process_id=f"{spec.driver_id}-{os.getpid()}", quiet=not cfg.verbose, variants=cfg.variants,
                       model=cfg.model, note=notes.append, headline=cfg.headline, part=spec.patterns)
    t0 = time.perf_counter()
    with waiting_for_held_runs():  # a run another job reloads at the same time: wait for it, then reload it too
        rows = method.run(ctx, spec.task, spec.seed)
    user = dataclasses.replace(ctx, part=())

    def kept(v: str) -> bool:
        if not spec.patterns or _matches(v, spec.patterns):
            return True
        return not any(_matches(v, p) and user.wants(v) for p in spec.others)

    rows = [r for r in rows if kept(r.get("variant", method.name))]
    for r in rows:
        r.update(method=method.name, task=spec.task, seed=spec.seed, process_id=ctx.process_id,
                 selection=spec.selection)
        r.setdefault("variant", method.name)
    return {"rows": rows, "notes": notes, "seconds": time.perf_counter() - t0, "host": socket.gethostname(),
            "pid": os.getpid(), "node": _ray_node()}


def _ray_node() -> str | None:
    """The Ray node a job ran on (None outside Ray): two nodes may share a host."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def _matches(variant: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(variant, p) for p in patterns)


def _find_method(name: str, module: str) -> Method:
    """The registered method; in a fresh worker, a method registered outside frugal's ideas is
    found by importing the module that registered it."""
    import importlib

    from .methods import _METHODS

    if name not in list_methods() and module:
        importlib.import_module(module)
    if name not in _METHODS:
        raise RuntimeError(f"bench method {name!r} is not registered in this worker (it was registered by "
                           f"{module or 'an unknown module'}, which did not register it on import)")
    return _METHODS[name]


def build_jobs(cfg: BenchConfig, plan: list[tuple[Method, str, int]], ctx: BenchContext, driver_id: str,
               selection: str, trusted: tuple[str, ...]) -> list[Job]:
    """The plan as a graph: one job per part of each (method, task, seed) unit, each waiting for
    the parts of its unit it names and for the whole unit of the same task and seed of every
    method it comes after."""
    jobs: list[Job] = []
    names: dict[tuple[str, str, int], list[str]] = {}
    threads = cfg.threads or (None if cfg.executor == "local" else 1)
    gpus = 1.0 if ctx.device.type == "cuda" and cfg.executor == "ray" else 0.0
    job_cfg = dataclasses.replace(cfg, threads=threads)
    for m, task, seed in plan:
        parts = tuple(m.parts(ctx, task)) if m.parts is not None else ()
        units = parts or (Part("", ()),)
        skipped = {p.name for p in units if _left_out(ctx, p)}
        key = (m.name, task, seed)
        names[key] = []
        for p in units:
            if p.name in skipped:
                continue
            spec = JobSpec(job_cfg, str(ctx.out_dir), driver_id, m.name, getattr(m.run, "__module__", ""), task,
                           seed, p.name, tuple(p.variants), tuple(tuple(q.variants) for q in units if q is not p),
                           selection, trusted)
            before = [names[(o, task, seed)] for o in m.after if (o, task, seed) in names]
            after = tuple(f"{m.name} {task} seed {seed} [{d}]" for d in p.after if d not in skipped)
            jobs.append(Job(spec.name, spec, after + tuple(n for ns in before for n in ns), threads or 1, gpus))
            names[key].append(spec.name)
    return jobs


def _left_out(ctx: BenchContext, part: Part) -> bool:
    """Whether --variants surely leaves the part out: each of its variants is a plain label (no
    glob) that no --variants pattern matches. (A part it may pick runs, and ends with no row if not.)"""
    plain = all(not any(c in p for c in "*?[") for p in part.variants)
    return bool(ctx.variants and part.variants) and plain and not any(ctx.wants(v) for v in part.variants)


def bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> Path:
    """Run the bench; return the path of results.json. Writes the report beside it."""
    import os

    from .executors import EXECUTORS

    if cfg.budget not in BUDGETS:
        raise ValueError(f"unknown budget {cfg.budget!r}; known: {', '.join(BUDGETS)}")
    if cfg.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1 (or left out: torch's default), got {cfg.threads}")
    if cfg.executor not in EXECUTORS:
        raise ValueError(f"unknown --executor {cfg.executor!r}; known: {', '.join(EXECUTORS)}")
    if cfg.jobs < 1 or cfg.retries < 0:
        raise ValueError(f"--jobs must be >= 1 and --retries >= 0, got {cfg.jobs} and {cfg.retries}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    unknown = [t for t in cfg.tasks if t not in KNOWN and not t.startswith(FOLDER_PREFIX)]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; known: {', '.join(KNOWN)}, or {FOLDER_PREFIX}/path/to/your/data")
    methods = [get_method(m) for m in cfg.methods]
    if cfg.variants:
        fixed = [m.name for m in methods if not m.selectable]
        if fixed:
            can = [m.name for m in list_methods().values() if m.selectable]
            raise ValueError(f"--variants picks variants out of a method's plan, but {', '.join(fixed)} trains its "
                             f"plan as a whole; leave out --variants, or use it with: {', '.join(can) or 'none'}")
    if cfg.model:
        for m in methods:
            if m.name != "baseline":
                log(f"note: --model {cfg.model} is used by {m.name!r} on tasks without a plan of its own "
                    f"(its plans for {', '.join(t for t in m.tasks if t != '*') or 'no task'} keep their models)")
    selection = ",".join(cfg.variants) or ("headline" if cfg.headline else "")  # rows of a part of the plan
    plan: list[tuple[Method, str, int]] = []
    for m in methods:
        tasks = cfg.tasks or (m.headline_tasks if cfg.headline else m.default_tasks)
        for t in tasks:
            if not m.knows(t):
                if cfg.tasks:  # asked for explicitly: say so; otherwise this method just has no plan for it
                    log(f"note: method {m.name!r} has no plan for task {t!r} (it knows {', '.join(m.tasks)}); skipped")
                continue
            plan += [(m, t, s) for s in range(cfg.seeds)]
    if not plan:
        raise ValueError("nothing to run: no method knows any of the tasks asked for")

    out = Path(cfg.out).resolve()  # workers elsewhere (processes, Ray nodes) get absolute paths
    out.mkdir(parents=True, exist_ok=True)
    # the data cache the driver uses, named for the workers (a Ray node does not inherit FRUGAL_DATA)
    cfg = dataclasses.replace(cfg, data_dir=cfg.data_dir or os.environ.get("FRUGAL_DATA") or None)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(out / ".bench.lock", wait=False))
        except LockHeld as e:
            raise BenchBusy(f"another frugal bench is running on {out} ({e}); wait for it to end, or give this one "
                            "another --out (to run jobs side by side, use one bench with --executor process "
                            "--jobs N, or --executor ray)") from None
        return _drive(cfg, plan, out, selection, log)


def _drive(cfg: BenchConfig, plan: list[tuple[Method, str, int]], out: Path, selection: str,
           log: Callable[[str], None]) -> Path:
    """The driver, alone on `out`: the plan's jobs that have no record yet, run on the executor;
    each job's rows and record are written to results.json as it ends."""
    from .executors import Outcome, cause_of, make_executor, run_graph
    from .models import _trusted_modules
    from .report import write_report, write_task_samples

    for folder in (out, out / "figures", out / "samples"):
        remove_stale_temp_files(folder)
    results_path = out / "results.json"
    driver_id = uuid.uuid4().hex[:12]
    ctx = BenchContext(out, cfg.budget, resolve_device(cfg.device), cfg.data_dir, cfg.corrupted,
                       process_id=driver_id, quiet=not cfg.verbose, variants=tuple(cfg.variants),
                       model=cfg.model, headline=cfg.headline)
    meta = {"config": dataclasses.asdict(cfg), "versions": versions(), "argv": sys.argv,
            "device": str(ctx.device)}
    old = _read_results(results_path)
    old_budget = old["meta"].get("config", {}).get("budget", cfg.budget)
    if old_budget != cfg.budget:
        raise ValueError(f"{out} holds a {old_budget!r} bench; use another --out for a {cfg.budget!r} one")
    for task in dict.fromkeys(t for _, t, _ in plan):
        write_task_samples(out, task, data_dir=cfg.data_dir)

    jobs = build_jobs(cfg, plan, ctx, driver_id, selection, tuple(_trusted_modules()))
    # a job's record says which variants its part planned: a part whose plan has grown since (a new
    # test-time point, say) is not done under it (records from before they said so are taken as done)
    records = {_job_key(j): j.get("patterns") for j in old["jobs"]}
    unit_rows = {(r["method"], r["task"], r["seed"], r.get("selection", "")) for r in old["rows"]}
    units_with_jobs = {k[:3] for k in records}

    def done_before(s: JobSpec) -> bool:
        for sel in ("", s.selection):
            key = (s.method, s.task, s.seed, s.part, sel)
            if key in records and records[key] in (None, list(s.patterns)):
                return True
        # a unit measured before the bench kept job records: its rows say it is done
        return (s.method, s.task, s.seed) not in units_with_jobs and any(
            (s.method, s.task, s.seed, sel) in unit_rows for sel in ("", s.selection))

    order = {j.name: i for i, j in enumerate(jobs)}
    finished = {j.name for j in jobs if done_before(j.spec)}
    for j in jobs:
        if j.name in finished:
            log(f"[{order[j.name] + 1}/{len(jobs)}] {j.name}: done before, kept")
    todo = [dataclasses.replace(j, after=tuple(d for d in j.after if d not in finished))
            for j in jobs if j.name not in finished]
    got_rows = {(k[0], k[1], k[2]) for k in unit_rows if k[3] in ("", selection)}

    def on_done(job, result) -> None:
        s: JobSpec = job.spec
        for note in result["notes"]:
            log(f"    note: {note}")
        record = {"method": s.method, "task": s.task, "seed": s.seed, "part": s.part, "selection": s.selection,
                  "patterns": list(s.patterns), "rows": len(result["rows"]), "seconds": round(result["seconds"], 1),
                  "host": result["host"], "pid": result["pid"], "node": result["node"],
                  "finished": dt.datetime.now().isoformat(timespec="seconds")}
        _append_rows(results_path, meta, result["rows"], record)
        if result["rows"]:
            got_rows.add((s.method, s.task, s.seed))
        rows = (f"{len(result['rows'])} row(s)" if result["rows"]
                else "no row" + (" under --variants" if cfg.variants else ""))
        log(f"[{order[job.name] + 1}/{len(jobs)}] {job.name}: done on {result['host']}, {rows} "
            f"({result['seconds']:.0f}s)")
        for r in result["rows"]:
            log(f"    {r['variant']}: test acc {r['test_acc']:.4f}, {r['params']:,} params, "
                f"{r['macs']:,.0f} MACs/image")

    if todo:
        where = {"local": "in this process", "process": f"on {cfg.jobs} worker processes",
                 "ray": f"on Ray ({cfg.address or 'a private instance'})"}[cfg.executor]
        log(f"{len(todo)} of {len(jobs)} job(s) to run, {where}")
        outcome = run_graph(todo, run_job, make_executor(cfg.executor, cfg.jobs, cfg.address), on_done=on_done,
                            on_start=lambda j: log(f"[{order[j.name] + 1}/{len(jobs)}] {j.name} ..."),
                            retries=cfg.retries, no_retry=BAD_INPUT, log=log)
    else:
        outcome = Outcome()
    if _read_results(results_path)["rows"]:
        write_report(out)
    bad_input = [(n, e) for n, e in outcome.errors.items() if isinstance(e, BAD_INPUT)]
    if bad_input:  # a file or folder the user handed frugal: the message names it and the fix (exit status 2)
        n, e = bad_input[0]
        raise ValueError(f"{n}: {cause_of(e)}" + (f" (and {len(bad_input) - 1} more job(s) failed on their input; "
                                                      "see the lines above)" if len(bad_input) > 1 else ""))
    bad = {**{n: "failed" for n in outcome.failed},
           **{n: f"not run, as {b} failed" for n, b in outcome.blocked.items()}}
    bad_units = {(j.spec.method, j.spec.task, j.spec.seed) for j in jobs if j.name in bad}
    missing = [f"{n}: {why}" for n, why in bad.items()]
    missing += [f"{m.name} {t} seed {s}" for m, t, s in plan if (m.name, t, s) not in got_rows | bad_units]
    if missing:
        raise BenchIncomplete(f"{len(missing)} run(s) of the plan have no row in {results_path}: {', '.join(missing)}; "
                              "see the lines above for why, and run the same command again to complete them")
    return results_path
