"""Is dreaming one image per training image cheaper than one training epoch?

On the same `--n` training images, in one process and in turn (`--repeats` times each): one epoch
of training (forward, cross-entropy, backward, Adam step, batches of 128), and dreaming every image
once with the given DreamConfig (`frugal.dream.rounds.dream_split`, batches of `--batch`). Both
costs grow linearly with the number of images, so their ratio holds for the whole training set.
The model is the registered one at its initial weights: the cost of either does not depend on them.
Prints JSON.

    python -m frugal.benchmarks.dream_speed --task mnist --model lenet5 --steps 2 --octaves 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from frugal.benchmarks import add_out_arg, add_where_args, publish, where
from frugal.data import load_task
from frugal.dream.generator import DreamConfig
from frugal.dream.rounds import dream_split
from frugal.train import TrainConfig, build_model, model_spec, normalize
from frugal.utils import seed_everything, versions


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, split, mean: float, std: float, device,
                batch: int = 128) -> None:
    model.train()
    for i in range(0, len(split), batch):
        x = normalize(split.x[i:i + batch].to(device), mean, std)
        loss = F.cross_entropy(model(x), split.y[i:i + batch].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="mnist")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--n", type=int, default=4096, help="training images timed (both costs are linear in it)")
    p.add_argument("--steps", type=int, default=DreamConfig.steps, help="dream steps per octave")
    p.add_argument("--octaves", type=int, default=DreamConfig.octaves)
    p.add_argument("--layer", default=None, help="layer to dream with (default: the last spatial one)")
    p.add_argument("--batch", type=int, default=256, help="images dreamed at once")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--onednn", choices=("on", "off"), default="on",
                   help="off: PyTorch's own CPU convolutions in place of oneDNN's, for both costs")
    add_where_args(p)
    add_out_arg(p)
    a = p.parse_args(argv)
    device = where(a)
    data = load_task(a.task, data_dir=a.data_dir)
    split = data.train.subset(a.n)
    seed_everything(0)
    model = build_model(model_spec(TrainConfig(task=a.task, model=a.model), data)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = DreamConfig(layer=a.layer, steps=a.steps, octaves=a.octaves)
    train_s, dream_s = [], []
    was = torch.backends.mkldnn.enabled
    # note: set directly; torch.backends.mkldnn.flags() also sets oneDNN's TF32 switch, which warns on CPU builds
    torch.backends.mkldnn.enabled = was and a.onednn == "on"
    try:
        for _ in range(a.repeats):  # in turn, so a change of load hits both
            t0 = time.perf_counter()
            train_epoch(model, opt, split, data.mean, data.std, device)
            train_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dream_split(model, split, data.mean, data.std, cfg, device, batch=a.batch)
            dream_s.append(time.perf_counter() - t0)
    finally:
        torch.backends.mkldnn.enabled = was
    t_train, t_dream = statistics.median(train_s), statistics.median(dream_s)
    out = {"benchmark": "dream_speed", "task": a.task, "model": a.model, "n": len(split), "device": str(device),
           "threads": torch.get_num_threads(), "dream": {"steps": a.steps, "octaves": a.octaves, "layer": a.layer,
                                                          "batch": a.batch, "onednn": a.onednn},
           "train_epoch_seconds": t_train, "dream_seconds": t_dream, "dream_over_epoch": t_dream / t_train,
           "dream_ms_per_image": 1e3 * t_dream / len(split), "versions": versions()}
    return publish(out, "frugal.benchmarks.dream_speed", argv, a.out)


if __name__ == "__main__":
    main()
