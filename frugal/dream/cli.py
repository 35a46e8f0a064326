"""`frugal dream RUN --data mnist --n 64`: a grid of test images and their dreams under a trained net."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from frugal.cli import register_command


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--data", default=None, help="task whose test images are dreamed (default: the run's)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--layer", default=None, help="module to amplify (default: the deepest spatial layer)")
    p.add_argument("--objective", default="layer", help="layer | class | channel")
    p.add_argument("--target", type=int, default=0, help="class or channel for those objectives")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--step", type=float, default=0.05)
    p.add_argument("--octaves", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG path (default: RUN/dreams-TASK.png)")
    p.add_argument("--device", default="auto")


def _run(a: argparse.Namespace) -> int:
    from frugal.data import Split, load_task, task_slug
    from frugal.dream.generator import DreamConfig
    from frugal.dream.pictures import draw_dreams
    from frugal.dream.rounds import dream_split
    from frugal.train import load_run
    from frugal.utils import resolve_device

    if a.n < 1:
        raise ValueError(f"--n must be at least 1, got {a.n}")
    device = resolve_device(a.device)
    model, cfg, _ = load_run(a.run, device=device)
    data = load_task(a.data or cfg.task, data_dir=cfg.data_dir)
    dcfg = DreamConfig(layer=a.layer, objective=a.objective, target=a.target, steps=a.steps, step=a.step,
                       octaves=a.octaves, seed=a.seed)
    src = Split(data.test.x[:a.n], data.test.y[:a.n])
    dreams, drift = dream_split(model, src, data.mean, data.std, dcfg, device)
    out = Path(a.out or Path(a.run) / f"dreams-{task_slug(data.name)}.png")
    draw_dreams(src, dreams.x, out, title=f"{data.name}: test images and dreams ({dcfg.objective})")
    print(json.dumps({"dreams": str(out), "n": len(src), "mean_drift": float(drift.mean())}, indent=2))
    return 0


register_command("dream", "dream test images with a trained net (DeepDream) and draw them", _add, _run)
