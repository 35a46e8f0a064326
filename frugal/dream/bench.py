"""Bench method `dream`: iterated dream training against controls at the same training budget.

The budget is the optimiser steps of the task's baseline run. Per task: rounds 0..R of dream
training, each with those steps (round 0 is plain training on A, the plain control; round r draws
its epochs from A and the r dreamed sets); then, with the same steps, the standard augmentation
(random affine + pixel noise in place of the baseline's shifts) and adversarial training (PGD, a few
steps: it costs several times the compute per step). Every model is measured on the clean test
set, the corrupted suite (mean over corruptions and severities), a small PGD attack, the
shape-texture cue conflict, and dreams of the test images made by another network: a plainly
trained net of the same config and the next seed, which none of the rows has seen or dreamed with.
Example dreams go into the report.

fashion-mnist's plan is cut to fit a working day: under its baseline's plan (a residual net, 15
epochs) the 4 rounds, 3 control nets and their dreams take about 6.7 hours per seed on one core,
and the whole corrupted suite (70 splits of 10,000 images) about 17 minutes per model. Every
fashion-mnist row trains 5 epochs (so the comparison stays at one budget), each round dreams half
of A, and the corrupted suite is measured on the first 2,000 test images of every split, the same
for every row (`PLANS`). mnist runs its baseline's plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugal.bench import (BenchContext, Part, Summary, idea_base_config, plan_fields, register_method,
                          reuse_baseline)
from frugal.data import KNOWN, Split, load_task, task_slug
from frugal.data.sources import FOLDER_PREFIX
from frugal.dream.evaluate import AdversarialTraining, cue_conflict, generalisation, other_net_dreams
from frugal.dream.generator import DreamConfig
from frugal.dream.pictures import draw_cue_conflict, draw_dreams
from frugal.dream.rounds import DreamTrainConfig, dream_training
from frugal.measure import measure
from frugal.train import CHECKPOINT, train

@dataclass(frozen=True)
class DreamPlan:
    """What the method changes over the task's baseline recipe: rounds of dream training per budget,
    the epochs of every row (None: the recipe's; epochs are passes over A), the dreamed fraction of
    A per round, and the test images per corrupted split (None: all)."""

    rounds: int
    epochs: int | None = None
    mix: float = 1.0
    corrupted_n: int | None = None


ROUNDS = dict(tiny=1, quick=1, full=3)
ADV_STEPS = 2  # PGD steps per training batch of the adversarial control (the attack in evaluation takes 10)
DREAM = dict(steps=5, step=0.1, octaves=2)  # the bench's dreams: half the default steps at twice the step
EVAL_N = dict(tiny=100, quick=1000, full=2000)  # test images for PGD, other-net dreams and cue conflict
# (task, budget) -> the plan where it differs from the default for the budget
PLANS: dict[tuple[str, str], DreamPlan] = {
    ("fashion-mnist", "full"): DreamPlan(rounds=ROUNDS["full"], epochs=5, mix=0.5, corrupted_n=2000)}
TASKS = ("mnist", "fashion-mnist", "digits")
# The front door: one round dreaming a quarter of the first 10,000 training images, against plain
# training and augmentation at the same steps, on the first 500 images of each corrupted split.
HEADLINE = DreamPlan(rounds=1, mix=0.25, corrupted_n=500)
HEADLINE_TRAIN = 10_000  # planned; any other task runs the default plan on the user's --model


def dream_plan(task: str, budget: str, seed: int, device: str = "auto", data_dir: str | None = None,
               model: str | None = None):
    """The training config every row of the task shares, the rounds' config, and the test images per
    corrupted split (None: all). `model`: the user's, for a task without a plan."""
    base = idea_base_config(task, budget, seed, TASKS, device=device, data_dir=data_dir, model=model)
    plan = PLANS.get((task, budget), DreamPlan(rounds=ROUNDS[budget]))
    if plan.epochs is not None:
        base = dataclasses.replace(base, epochs=plan.epochs)
    rounds = DreamTrainConfig(rounds=plan.rounds, mix=plan.mix, dream=DreamConfig(seed=seed, **DREAM))
    return base, rounds, plan.corrupted_n


def has_corrupted_suite(ctx: BenchContext, task: str, n: int) -> bool:
    """Whether the task has a corrupted test suite: its own, or for a folder: task one built from
    its first n test images into frugal's cache on first use (never into the data folder)."""
    if f"{task}-c" in KNOWN:
        return True
    if not task.startswith(FOLDER_PREFIX):
        return False
    from frugal.data import DataError, build_corrupted_suite, load_corrupted
    from frugal.data.cache import data_root
    from frugal.data.corrupt import folder_suite_dir

    try:
        load_corrupted(task, data_dir=ctx.data_dir)
        return True
    except DataError:
        pass
    try:
        build_corrupted_suite(task, folder_suite_dir(Path(task.removeprefix(FOLDER_PREFIX)), data_root(ctx.data_dir)),
                              limit=n, data_dir=ctx.data_dir)
        return True
    except (DataError, ValueError, ImportError) as e:
        ctx.note(f"dream on {task}: no corrupted suite ({e}); the rows measure clean accuracy only")
        return False


OTHER = "other net*"  # the part that trains the other net, whose dreams test every row (no row of its own;
# a glob, so that --variants never leaves it out and two parts never train it at once)


def _round_label(r: int) -> str:
    return f"round {r}" + (" (plain)" if r == 0 else "")


def _controls(ctx: BenchContext) -> tuple[str, ...]:
    return ("augment",) if ctx.headline else ("augment", "adversarial")  # the front door: no adversarial training


def _settings(ctx: BenchContext, task: str, seed: int):
    base, dcfg, corrupted_n = dream_plan(task, ctx.budget, seed, device=str(ctx.device), data_dir=ctx.data_dir,
                                         model=ctx.model)
    if ctx.headline:
        base = dataclasses.replace(base, train_limit=min(base.train_limit or HEADLINE_TRAIN, HEADLINE_TRAIN))
        dcfg = dataclasses.replace(dcfg, rounds=HEADLINE.rounds, mix=HEADLINE.mix)
        corrupted_n = HEADLINE.corrupted_n
    return base, dcfg, corrupted_n


def dream_parts(ctx: BenchContext, task: str) -> tuple[Part, ...]:
    """The jobs of a unit: the other net first (its dreams test every row); round r after round
    r-1 (it dreams with round r-1's net); the controls beside the rounds once round 0 (the plain
    net, whose first epoch every row reports) has finished."""
    _, dcfg, _ = _settings(ctx, task, 0)
    other = () if ctx.headline else (Part("other net", (OTHER,)),)
    wait = tuple(p.name for p in other)
    rounds = [Part(f"round {r}", (_round_label(r),), after=(*((f"round {r - 1}",) if r else ()), *wait))
              for r in range(dcfg.rounds + 1)]
    controls = [Part(f"control {c}", (f"control {c}",), after=("round 0", *wait)) for c in _controls(ctx)]
    return (*other, *rounds, *controls)


@register_method("dream", tasks=(*TASKS, "*"), default_tasks=("mnist", "fashion-mnist"), after=("baseline",),
                 description="iterated DeepDream training vs plain, augmented and adversarial training",
                 fields=(("pgd_acc", "PGD acc (eps 0.1)", "{:.1%}"),
                         ("other_dream_acc", "acc on other net's dreams", "{:.1%}"),
                         ("shape_bias", "shape bias", "{:.2f}"), ("steps", "optimiser steps", "{:,.0f}"),
                         ("mean_drift", "dreams' mean drift (RMS, pixels 0-1)", "{:.3f}"),
                         ("dream_seconds", "dreaming s", "{:,.0f}"), ("epoch_seconds", "1 epoch on A s", "{:,.0f}")),
                 headline_tasks=("mnist",), selectable=True, parts=dream_parts,
                 summary=Summary(claim="training on the net's own dreams too: robust to corrupted inputs",
                                 idea="round [1-9]*", reference="round 0 (plain)", control="control augment",
                                 metric="corrupted_mean_acc", cost="train_seconds",
                                 published="results/dream"))
def run_dream(ctx: BenchContext, task: str, seed: int) -> list[dict[str, Any]]:
    base, dcfg, corrupted_n = _settings(ctx, task, seed)
    data = load_task(task, data_dir=ctx.data_dir, val_size=base.val_size)
    n_eval = EVAL_N[ctx.budget]
    rounds_dir = ctx.run_dir("dream", task, seed, "rounds")
    reuse_baseline(ctx, base, rounds_dir / "round-0")  # the baseline's finished run, when trained alike, is round 0
    wanted = [r for r in range(dcfg.rounds + 1) if ctx.wants(_round_label(r))]
    controls_wanted = [c for c in _controls(ctx) if ctx.wants(f"control {c}")]
    last = max(wanted, default=0 if controls_wanted else -1)  # the controls report round 0's first epoch
    rounds = []
    if last >= 0:  # round r trains (or reloads) the rounds before it: each dreams with the one before
        rounds = dream_training(base, rounds_dir, dataclasses.replace(dcfg, rounds=last), data, device=ctx.device,
                                quiet=ctx.quiet, log=lambda s: None)

    def fit(name: str, cfg, hooks=()):
        run_dir = ctx.run_dir("dream", task, seed, name)
        return train(cfg, run_dir, resume=(run_dir / CHECKPOINT).exists(), data=data, hooks=list(hooks),
                     quiet=ctx.quiet, progress=False), run_dir

    # the controls: the same config and steps as round 0 (which is the plain control)
    control_cfg = {"augment": (dataclasses.replace(base, augment="affine-noise"), ()),
                   "adversarial": (base, (AdversarialTraining(steps=ADV_STEPS),))}
    controls = {c: fit(f"control-{c}", *control_cfg[c]) for c in controls_wanted}
    other_dreams = other = None
    if not ctx.headline:  # the front door leaves out the other net's dreams
        other = fit("other", dataclasses.replace(base, seed=seed + 1))[0].model.eval()
        if wanted or controls_wanted:
            other_dreams = other_net_dreams(other, data, ctx.device, n=n_eval)  # the same dreams for every row

    corrupted = bool(wanted or controls_wanted) and ctx.budget != "tiny" and has_corrupted_suite(ctx, task, n_eval)
    epoch_seconds = rounds[0]["result"].history[0]["seconds"] if rounds else None
    models = [(_round_label(r), rounds[r]["result"], rounds[r], rounds_dir / f"round-{r}") for r in wanted]
    models += [(f"control {name}", res, {}, run_dir) for name, (res, run_dir) in controls.items()]
    rows = []
    for variant, res, info, run_dir in models:
        row = measure(res.model, data, ctx.device, corrupted=corrupted, data_dir=ctx.data_dir,
                      speed=ctx.budget != "tiny", corrupted_n=corrupted_n)
        if other_dreams is not None:
            row.update(generalisation(res.model, data, ctx.device, other_dreams=other_dreams, n=n_eval))
        # every row draws its epochs from A, of the base's size (a round's dreams come on top, as `dreams` says)
        row.update(variant=variant, **plan_fields(base, data), steps=res.steps, train_seconds=res.train_seconds,
                   model=base.model, run_dir=str(run_dir.relative_to(ctx.out_dir)), epoch_seconds=epoch_seconds,
                   dreams=info.get("dreams", 0), mix=dcfg.mix)
        if info.get("dream_seconds"):
            row["dream_seconds"] = info["dream_seconds"]
        if "mean_drift" in info:
            row["mean_drift"] = info["mean_drift"]
        rows.append(row)
    if seed == 0 and 1 in wanted:
        from frugal.dream.rounds import load_dreams

        dreams, _ = load_dreams(rounds_dir / "round-1" / "dreams.npz")
        draw_dreams(Split(data.train.x[:16], data.train.y[:16]), dreams.x[:16],
                    ctx.figures / f"dreams-{task_slug(task)}.png",
                    title=f"{task}: training images and their round-1 dreams")
    if seed == 0 and other is not None and ctx.wants("other net"):
        shown = other_net_dreams(other, data, ctx.device, n=16)
        draw_dreams(Split(data.test.x[:16], data.test.y[:16]), shown.x[:16],
                    ctx.figures / f"dreams-{task_slug(task)}-other-net.png",
                    title=f"{task}: test images and the other net's dreams of them (a test set for every row)")
        conflict, texture = cue_conflict(data.test, n_eval)
        draw_cue_conflict(conflict, texture, ctx.figures / f"cue-conflict-{task_slug(task)}.png",
                          title=f"{task}: cue conflict, one class's shape filled with another's texture")
    return rows

