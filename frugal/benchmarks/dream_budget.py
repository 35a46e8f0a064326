"""Where does dream training's cost in clean accuracy come from: the budget, or the dreams?

One task and seed, under the dream bench's plan for it (`frugal.dream.bench.dream_plan`; `--epochs`
changes every row's epochs). From one round-0 net and its round-1 dreams (`dream_training`, kept in
OUT/rounds; `--round0 RUN` takes a finished run of the same config as round 0), each variant is a
fresh net of the same config:

    plain         round 0: A only
    dreams        round 1: A + the dreams; every epoch draws |A| examples from both (the bench's budget)
    noise         as dreams, each dream replaced by its source image plus Gaussian pixel noise of the
                  same RMS change: as many clean images displaced, changed as much, but not dreamed
    weighted      as dreams, each dream weighing exp(-drift / 0.05) in the loss
    dreams-added  A + the dreams, every epoch a pass over both: all of A in every epoch, and
                  (1 + mix) x round 0's optimiser steps
    copies-added  A + exact copies of the dreams' source images: the steps of dreams-added, no dream

If `noise` loses as much as `dreams`, the cost is that of displacing clean images at a fixed budget;
if it keeps `plain`'s accuracy, the dreams themselves cost it. `dreams-added` against `copies-added`
is the dreams' cost with no clean image displaced, at equal steps. Every net is measured on the clean
test set and on the corrupted suite (each split's first `--corrupted-n` images). Prints JSON, one row
per variant, and adds them to OUT/results.json (another run's rows of other variants are kept).

    python -m frugal.benchmarks.dream_budget --task fashion-mnist --seed 0 --out runs/dream-budget
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from frugal.benchmarks import add_where_args, where
from frugal.data import KNOWN, Split, TaskData, load_task
from frugal.dream.bench import dream_plan
from frugal.dream.rounds import DREAMS, dream_training, load_dreams, with_extra
from frugal.measure import measure
from frugal.train import CHECKPOINT, copy_run, train
from frugal.utils import atomic_write_json, file_lock, read_json, versions

VARIANTS = ("plain", "dreams", "noise", "weighted", "dreams-added", "copies-added")
DRIFT_SCALE = 0.05  # `weighted`: a dream of the bench's typical drift (about 0.1) weighs e^-2


def matched_noise(src: Split, drift: torch.Tensor, seed: int, iters: int = 4) -> tuple[Split, torch.Tensor]:
    """`src` plus Gaussian noise, rounded and clipped to uint8, scaled per image so that its RMS
    change (pixel units 0-1) matches `drift`. Returns the images and the change each really got."""
    x0 = src.x.float() / 255
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))

    def noisy(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (N, C, H, W) pixels 0-255, (N,) RMS
        u = ((x0 + scale.view(-1, 1, 1, 1) * z) * 255).round().clamp(0, 255)
        return u, (u / 255 - x0).pow(2).flatten(1).mean(1).sqrt()

    scale = drift.float()
    u, got = noisy(scale)
    for _ in range(iters):  # clipping at 0 and 1 takes some of the noise away: scale up to make up for it
        scale = scale * drift.float() / got.clamp_min(1e-6)
        u, got = noisy(scale)
    return Split(u.to(torch.uint8), src.y.clone()), got


def variant_data(name: str, data: TaskData, dreams: Split, drift: torch.Tensor, seed: int) -> tuple[TaskData, dict]:
    """The training data of a variant that is not one of the rounds (plain, dreams), and what
    describes its extra examples."""
    src = Split(data.train.x[:len(dreams)], data.train.y[:len(dreams)])  # the dreams' sources (dreams keep order)
    if name == "dreams-added":
        return with_extra(data, [dreams]), {"extra_rms_change": float(drift.mean())}
    if name == "noise":
        noisy, got = matched_noise(src, drift, seed)
        return with_extra(data, [noisy]), {"extra_rms_change": float(got.mean())}
    if name == "weighted":
        w = torch.exp(-drift.float() / DRIFT_SCALE)
        return with_extra(data, [Split(dreams.x, dreams.y, w)]), {"extra_rms_change": float(drift.mean()),
                                                                  "mean_weight": float(w.mean())}
    if name == "copies-added":
        return with_extra(data, [src]), {"extra_rms_change": 0.0}
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="fashion-mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="full", choices=("tiny", "quick", "full"), help="the dream bench's plan")
    p.add_argument("--epochs", type=int, default=None, help="every net's epochs (default: the plan's)")
    p.add_argument("--out", required=True, help="folder of the runs (reused when run again)")
    p.add_argument("--round0", default=None, help="a finished run of the same config to use as round 0")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--corrupted-n", type=int, default=500, help="test images per corrupted split (0: no suite)")
    add_where_args(p)
    a = p.parse_args(argv)
    device = where(a)
    out = Path(a.out)
    base, dcfg, _ = dream_plan(a.task, a.budget, a.seed, device=a.device, data_dir=a.data_dir)
    if a.epochs is not None:
        base = dataclasses.replace(base, epochs=a.epochs)
    dcfg = dataclasses.replace(dcfg, rounds=1)
    data = load_task(a.task, data_dir=a.data_dir, val_size=base.val_size)
    rounds_dir = out / "rounds"
    if a.round0 is not None:
        src = Path(a.round0)
        if not (src / CHECKPOINT).exists():
            raise SystemExit(f"--round0 {src} is not a finished run folder (no {CHECKPOINT}); give the folder "
                             "of a run trained under the same config")
        if not (rounds_dir / "round-0").exists():  # its config is checked when dream_training resumes it
            copy_run(src, rounds_dir / "round-0")
    rounds = dream_training(base, rounds_dir, dcfg, data, device=device, log=lambda s: None)
    dreams, drift = load_dreams(rounds_dir / "round-1" / DREAMS)
    a_train = data.train.subset(base.train_limit)
    data_a = dataclasses.replace(data, train=a_train)
    corrupted = a.corrupted_n > 0 and f"{a.task}-c" in KNOWN

    rows = []
    for name in a.variants:
        info: dict = {}
        if name in ("plain", "dreams"):
            res = rounds[0 if name == "plain" else 1]["result"]
            if name == "dreams":
                info["extra_rms_change"] = float(drift.mean())
        else:
            vdata, info = variant_data(name, data_a, dreams, drift, a.seed)
            added = name.endswith("-added")
            cfg = dataclasses.replace(base, train_limit=None, epoch_size=None if added else len(a_train))
            run_dir = out / name
            res = train(cfg, run_dir, resume=(run_dir / CHECKPOINT).exists(), data=vdata, quiet=True, progress=False)
        m = measure(res.model, data_a, device, corrupted=corrupted, data_dir=a.data_dir, speed=False,
                    corrupted_n=a.corrupted_n if corrupted else None)
        row = {"variant": name, "test_acc": m["test_acc"], "steps": res.steps, "train_seconds": res.train_seconds,
               "extra_examples": 0 if name == "plain" else len(dreams), **info}
        if corrupted:
            row["corrupted_mean_acc"] = m["corrupted_mean_acc"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"task": a.task, "seed": a.seed, "epochs": base.epochs, "mix": dcfg.mix, "train_size": len(a_train),
              "corrupted_n": a.corrupted_n if corrupted else None, "rows": rows, "versions": versions()}
    with file_lock(out / ".results.lock"):  # processes running other variants add theirs
        path = out / "results.json"
        old = read_json(path, "move it away or use another --out") if path.exists() else {}
        same = {k: v for k, v in result.items() if k not in ("rows", "versions")}
        if old and {k: old.get(k) for k in same} == same:
            mine = {r["variant"] for r in rows}
            result["rows"] = [r for r in old["rows"] if r["variant"] not in mine] + rows
        atomic_write_json(path, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
