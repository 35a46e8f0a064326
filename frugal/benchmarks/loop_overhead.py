"""How much time does `frugal.train` add over a bare PyTorch loop doing the same work?

Both train the same model from the same initial weights on the same batches in the same order with
the same optimizer and learning-rate schedule, and both evaluate on the validation split after each
epoch and on the test split at the end; `train` also writes its run folder, checkpoint and log.
They run alternately in one process, `--repeats` times each; the ratio of the median wall-clocks is
printed as JSON.

    python -m frugal.benchmarks.loop_overhead --task mnist --model lenet5 --epochs 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from frugal.benchmarks import add_out_arg, publish
from frugal.data import load_task
from frugal.train import (TrainConfig, build_model, epoch_generator, evaluate, lr_factor, make_optimizer, model_spec,
                          normalize, train)
from frugal.utils import resolve_device, seed_everything, versions


def bare_loop(cfg: TrainConfig, data) -> float:
    """The same training as train(cfg), written as plainly as PyTorch allows. Returns test accuracy."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(model_spec(cfg, data)).to(device)
    opt = make_optimizer(cfg, model)
    xs, ys = data.train.x.to(device), data.train.y.to(device)
    n = len(xs)
    steps = math.ceil(n / cfg.batch_size)
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=epoch_generator(cfg.seed, epoch)).to(device)
        for b in range(steps):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = normalize(xs[idx], data.mean, data.std)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(cfg, step, steps)
            loss = F.cross_entropy(model(x), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        evaluate(model, data.val, data.mean, data.std, device, cfg.eval_batch_size)
    return evaluate(model, data.test, data.mean, data.std, device, cfg.eval_batch_size)[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="mnist")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    add_out_arg(p)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = TrainConfig(task=a.task, model=a.model, epochs=a.epochs, device=a.device)
    data = load_task(cfg.task)
    bare_s, frugal_s, accs = [], [], {}
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        accs["bare"] = bare_loop(cfg, data)
        bare_s.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            accs["frugal"] = train(cfg, d, data=data, quiet=True, progress=False).test_acc
            frugal_s.append(time.perf_counter() - t0)
    out = {
        "benchmark": "loop_overhead", "task": a.task, "model": a.model, "epochs": a.epochs, "repeats": a.repeats,
        "bare_seconds": bare_s, "frugal_seconds": frugal_s,
        "ratio_of_medians": statistics.median(frugal_s) / statistics.median(bare_s),
        "same_test_accuracy": accs["bare"] == accs["frugal"], "test_acc": accs,
        "threads": torch.get_num_threads(), "versions": versions(),
    }
    return publish(out, "frugal.benchmarks.loop_overhead", argv, a.out)


if __name__ == "__main__":
    main()
