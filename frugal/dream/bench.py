"""Bench method `dream`: iterated dream training against controls at the same training budget.

Per task: rounds 0..R of dream training (round 0 is plain training on A); then, each with as
many optimiser steps as the last round (its data is A plus R dreamed sets), plain training, the
standard augmentation (random affine + pixel noise) and adversarial training (PGD). Every model is
measured on the clean test set, the corrupted suite (mean over corruptions and severities),
dreams of the test images made by the plain control, a small PGD attack, and the shape-texture
cue conflict. Example dreams go into the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from frugal.bench import BenchContext, baseline_config, register_method
from frugal.data import KNOWN, Split, load_task
from frugal.dream.evaluate import AdversarialTraining, generalisation
from frugal.dream.generator import DreamConfig
from frugal.dream.pictures import draw_dreams
from frugal.dream.rounds import DreamTrainConfig, dream_training
from frugal.measure import measure
from frugal.train import CHECKPOINT, train

ROUNDS = dict(tiny=1, quick=1, full=3)
EVAL_N = dict(tiny=100, quick=1000, full=2000)  # test images for PGD, other-net dreams and cue conflict


def _base(ctx: BenchContext, task: str, seed: int):
    if task == "digits":  # tiny tests
        return dataclasses.replace(baseline_config("mnist", ctx.budget, seed, device=str(ctx.device),
                                                   data_dir=ctx.data_dir), task="digits", model="convnet")
    return baseline_config(task, ctx.budget, seed, device=str(ctx.device), data_dir=ctx.data_dir)


@register_method("dream", tasks=("mnist", "fashion-mnist", "digits"), default_tasks=("mnist", "fashion-mnist"),
                 description="iterated DeepDream training vs plain, augmented and adversarial training",
                 fields=(("pgd_acc", "PGD acc (eps 0.1)", "{:.1%}"), ("other_dream_acc", "acc on other net's dreams", "{:.1%}"),
                         ("shape_bias", "shape bias", "{:.2f}"), ("dream_seconds", "dreaming s", "{:,.0f}"),
                         ("epoch_seconds", "1 epoch on A s", "{:,.0f}")))
def run_dream(ctx: BenchContext, task: str, seed: int) -> list[dict[str, Any]]:
    base = _base(ctx, task, seed)
    data = load_task(task, data_dir=ctx.data_dir, val_size=base.val_size)
    R = ROUNDS[ctx.budget]
    n_eval = EVAL_N[ctx.budget]
    corrupted = f"{task}-c" in KNOWN and ctx.budget != "tiny"
    dcfg = DreamTrainConfig(rounds=R, dream=DreamConfig(seed=seed))
    rounds = dream_training(base, ctx.run_dir("dream", task, seed, "rounds"), dcfg, data, device=ctx.device,
                            quiet=ctx.quiet, log=lambda s: None)
    epoch_seconds = rounds[0]["result"].history[0]["seconds"]

    # the controls: as many optimiser steps as the last round had
    scale = len(data.train) + sum(r["dreams"] for r in rounds)
    epochs = max(1, round(base.epochs * scale / len(data.train)))
    controls = {}
    for name, cfg, hooks in (
            ("plain", dataclasses.replace(base, epochs=epochs), []),
            ("augment", dataclasses.replace(base, epochs=epochs, augment="affine-noise"), []),
            ("adversarial", dataclasses.replace(base, epochs=epochs), [AdversarialTraining()])):
        run_dir = ctx.run_dir("dream", task, seed, f"control-{name}")
        controls[name] = (train(cfg, run_dir, resume=(run_dir / CHECKPOINT).exists(), data=data, hooks=hooks,
                                quiet=ctx.quiet, progress=False), run_dir)
    other = controls["plain"][0].model.eval()

    rows = []
    models = [(f"round {r['round']}", r["result"], r, ctx.run_dir("dream", task, seed, "rounds") / f"round-{r['round']}")
              for r in rounds]
    models += [(f"control {name}", res, {}, run_dir) for name, (res, run_dir) in controls.items()]
    for variant, res, info, run_dir in models:
        row = measure(res.model, data, ctx.device, corrupted=corrupted, data_dir=ctx.data_dir,
                      speed=ctx.budget != "tiny")
        row.update(generalisation(res.model, data, ctx.device, other=other, n=n_eval))
        row.update(variant=variant, epochs=res.config.epochs, train_seconds=res.train_seconds, model=base.model,
                   run_dir=str(run_dir.relative_to(ctx.out_dir)), epoch_seconds=epoch_seconds,
                   dreams=info.get("dreams", 0))
        if info.get("dream_seconds"):
            row["dream_seconds"] = info["dream_seconds"]
        rows.append(row)
    if seed == 0 and len(rounds) > 1:
        from frugal.dream.rounds import load_dreams

        dreams, _ = load_dreams(ctx.run_dir("dream", task, seed, "rounds") / "round-1" / "dreams.npz")
        draw_dreams(Split(data.train.x[:16], data.train.y[:16]), dreams.x[:16], ctx.figures / f"dreams-{task}.png",
                    title=f"{task}: training images and their round-1 dreams")
    return rows

