"""Whole-model speed of a trained saccadic CNN against its trained dense twin, in one process.

Both models classify the same real test images: error on the test set, multiply-adds per image
counted from the ops that ran (so the saccadic count already reflects the blocks it skipped, and
includes its policy), the fraction of blocks attended, and the median wall-clock of one batch,
the two models timed alternately round after round so that drifts in machine load hit both.

The sparse run may be a saccadic model (`saccadic`, its block choice at once; `--fractions` adds
test-time shares of the blocks) or a glimpse trajectory (`trajectory`; `--halts` times it
stopping at each top class probability, with the glimpses it took, and `--caps` each halt again
with at most that many glimpses).

By default the timings run under a steady allocator (`--allocator steady`, see
`frugal.benchmarks.steady_allocator`): with glibc's own thresholds a model's time depends on what
the other models allocated and freed before it, and the dense twin, with the largest maps, gains
or loses the most.

    python -m frugal.benchmarks.saccade_model --sparse RUN_DIR --dense RUN_DIR --batch 64 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from frugal.benchmarks import add_allocator_arg, add_out_arg, add_where_args, publish, use_allocator, where
from frugal.measure import count_macs
from frugal.train import evaluate, load_run, normalize
from frugal.data import load_task
from frugal.saccade.temporal import TrajectoryCNN, glimpses_taken, stopping_rule
from frugal.utils import versions


@torch.no_grad()
def attended_fraction(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """Mean fraction of blocks the model computes over the images x (normalised), and for a
    trajectory the mean and largest number of glimpses."""
    n_blocks = x.shape[0] * model.grid[0] * model.grid[1]
    if isinstance(model, TrajectoryCNN):
        g, blocks = glimpses_taken(model, x, batch)
        return {"attended_fraction": float(blocks.sum()) / n_blocks, "mean_glimpses": float(g.float().mean()),
                "max_glimpses": int(g.max())}
    model.eval()
    attended = 0.0
    for xb in x.split(batch):
        model(xb)
        attended += float((model.attention.levels > 0).float().sum())
    return {"attended_fraction": attended / n_blocks}


@torch.no_grad()
def alternate_timing(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int,
                     inputs: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Median seconds of model(x) for each model, timed in turn within each round. `inputs` gives
    a model its own input instead of x."""
    inputs = inputs or {}
    for name, m in models.items():
        m.eval()
        m(inputs.get(name, x))  # warm-up: allocations, kernel selection
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            inp = inputs.get(name, x)
            t0 = time.perf_counter()
            m(inp)
            if x.device.type == "cuda":
                torch.cuda.synchronize()  # note: without it the call returns before the work is done
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sparse", required=True, help="run folder of a trained saccadic or trajectory model")
    p.add_argument("--dense", required=True, help="run folder of its trained dense twin (blockcnn)")
    p.add_argument("--batch", type=int, default=64, help="images per timed call")
    p.add_argument("--rounds", type=int, default=20)
    add_where_args(p, data_dir=False)
    p.add_argument("--fractions", type=float, nargs="*", default=[],
                   help="also time the saccadic model attending this share of each image's blocks (inference_fraction)")
    p.add_argument("--halts", type=float, nargs="*", default=[],
                   help="also time the trajectory model stopping at each of these top class probabilities")
    p.add_argument("--caps", type=int, nargs="*", default=[],
                   help="also time each of --halts stopping after at most this many glimpses")
    add_allocator_arg(p)
    add_out_arg(p)
    a = p.parse_args(argv)
    device = where(a)
    allocator = use_allocator(a.allocator)
    (sparse, s_cfg, _), (dense, d_cfg, _) = load_run(a.sparse, device), load_run(a.dense, device)
    if s_cfg.task != d_cfg.task:
        raise SystemExit(f"the two runs were trained on different tasks ({s_cfg.task} vs {d_cfg.task}); "
                         "compare a saccadic model with the dense twin of the same task")
    temporal = isinstance(sparse, TrajectoryCNN)
    if not temporal and (not hasattr(sparse, "attention") or getattr(sparse, "dense", True)):
        raise SystemExit(f"{a.sparse} is not a saccadic or trajectory model (model {s_cfg.model!r})")
    if (a.fractions and temporal) or ((a.halts or a.caps) and not temporal):
        raise SystemExit(f"--fractions is for a saccadic model, --halts and --caps for a trajectory; {a.sparse} "
                         f"is a {s_cfg.model!r} model")
    if any(not 0 < h <= 1 for h in a.halts):
        raise SystemExit(f"--halts are class probabilities in (0, 1], got {a.halts}")
    if a.caps and not a.halts:
        raise SystemExit("--caps limits the glimpses of each of --halts: give --halts too")
    if temporal and any(not 1 <= k <= sparse.glimpses for k in a.caps):
        raise SystemExit(f"--caps are numbers of glimpses in 1..{sparse.glimpses} (the model's most), got {a.caps}")
    data = load_task(s_cfg.task, data_dir=s_cfg.data_dir, val_size=s_cfg.val_size)
    dtype = next(sparse.parameters()).dtype
    x = normalize(data.test.x[: a.batch].to(device), data.mean, data.std, dtype)  # real test images
    out: dict = {"benchmark": "saccade_model", "task": s_cfg.task, "batch": a.batch, "device": str(device),
                 "threads": torch.get_num_threads(), "allocator": allocator, "models": {}}
    main_name = "trajectory" if temporal else "saccadic"
    models = {main_name: sparse, "dense": dense}
    for f in a.fractions:
        m = copy.deepcopy(sparse)
        m.inference_fraction = f
        models[f"saccadic top {f:.0%}"] = m
    for h in a.halts:
        for k in [None, *a.caps]:
            label, attrs = stopping_rule(h, k)
            m = copy.deepcopy(sparse)
            for name, value in attrs.items():
                setattr(m, name, value)
            models[f"trajectory {label}"] = m
    test_x = normalize(data.test.x.to(device), data.mean, data.std, dtype)  # for the attended share
    for name, model in models.items():
        acc = evaluate(model, data.test, data.mean, data.std, device)[0]
        cfg = d_cfg if name == "dense" else s_cfg
        out["models"][name] = {"run": a.dense if name == "dense" else a.sparse, "model": cfg.model,
                               "test_error": 1 - acc, "macs": count_macs(model, x)}
        if name != "dense":
            out["models"][name].update(attended_fraction(model, test_x))
    t = alternate_timing(models, x, a.rounds)
    for name, sec in t.items():
        out["models"][name]["ms_per_batch"] = 1e3 * sec
        if name != "dense":
            out["models"][name]["speedup"] = t["dense"] / sec
            out["models"][name]["macs_ratio"] = out["models"][name]["macs"] / out["models"]["dense"]["macs"]
    out["speedup"] = t["dense"] / t[main_name]
    out["macs_ratio"] = out["models"][main_name]["macs"] / out["models"]["dense"]["macs"]
    out["versions"] = versions()
    return publish(out, "frugal.benchmarks.saccade_model", argv, a.out)


if __name__ == "__main__":
    main()
