"""Iterated dream training: train on A; dream a new set from A with that net; train a new net on A
and every dreamed set so far; repeat.

Round r (r >= 1) dreams `mix` x |A| images (A's first ones, in its shuffled order) with the net of
round r - 1, labels each with its source image's label, optionally drops the ones that drifted
most (`max_drift`: a quantile of the per-image change) or weights each in the loss by how little
it drifted (`drift_weight`), and trains a fresh net of the same config on A plus dreams 1..r.
With `budget="steps"` (the default) every round takes the optimiser steps of round 0: an epoch
is |A| examples drawn afresh from A and the dreams, so the comparison with round 0 is at a fixed
budget, not "more data and more steps". With `budget="epochs"` an epoch is a pass over all of it,
and round r takes (1 + r x mix) times round 0's steps. Each round keeps its run folder and its
dreams (`dreams.npz`) under the output folder; a killed run resumes: finished rounds and written
dreams are reused, under the config that made them (`dream.json`; more rounds may be added).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from frugal.data import Split, TaskData
from frugal.data.bounded import read_npz
from frugal.dream.generator import DreamConfig, dream
from frugal.train import CHECKPOINT, Result, TrainConfig, normalize, train
from frugal.utils import atomic_write_bytes, atomic_write_json, read_json

DREAMS = "dreams.npz"
DREAM_CONFIG = "dream.json"  # the DreamTrainConfig (but rounds) the folder's dreams were made under


@dataclass(frozen=True)
class DreamTrainConfig:
    rounds: int = 3  # dreamed sets after round 0
    mix: float = 1.0  # dreamed images per round, as a fraction of the training set
    max_drift: float | None = None  # keep dreams below this quantile of drift (None: keep all)
    # weight each dream exp(-drift / drift_weight) in the loss, A's images 1; drift is the RMS change in
    # pixel units (0-1; about 0.1 at the bench's dreams). None: every dream weighs 1
    drift_weight: float | None = None
    dream: DreamConfig = field(default_factory=DreamConfig)
    batch: int = 256  # images dreamed at once
    budget: str = "steps"  # steps: every round takes round 0's optimiser steps | epochs: passes over all data

    def __post_init__(self):
        if self.rounds < 0 or not 0 < self.mix <= 1:
            raise ValueError(f"rounds must be >= 0 and mix in (0, 1], got {self.rounds}, {self.mix}")
        if self.budget not in ("steps", "epochs"):
            raise ValueError(f"budget must be 'steps' or 'epochs', got {self.budget!r}")
        if self.max_drift is not None and not 0 < self.max_drift <= 1:
            raise ValueError(f"max_drift is a quantile in (0, 1], got {self.max_drift}")
        if self.drift_weight is not None and not self.drift_weight > 0:
            raise ValueError(f"drift_weight is a drift scale > 0 (pixel units), got {self.drift_weight}")


def pixel_range(mean: float, std: float) -> tuple[float, float]:
    """The normalised values of pixels 0 and 255."""
    return (0 - mean) / std, (1 - mean) / std


def to_uint8(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Normalised images back to uint8 pixels (as the data sets store them)."""
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def dream_split(model: torch.nn.Module, split: Split, mean: float, std: float, cfg: DreamConfig, device,
                batch: int = 256) -> tuple[Split, torch.Tensor]:
    """Every image of `split` dreamed (labels kept), and each one's drift: RMS change in pixel units."""
    lo, hi = pixel_range(mean, std)
    xs, drift = [], []
    for i in range(0, len(split), batch):
        x = normalize(split.x[i:i + batch].to(device), mean, std)
        d = dream(model, x, replace(cfg, seed=cfg.seed + i), lo, hi)
        u = to_uint8(d, mean, std).cpu()
        xs.append(u)
        drift.append(((u.float() - split.x[i:i + batch].float()) / 255).pow(2).flatten(1).mean(1).sqrt())
    return Split(torch.cat(xs), split.y.clone()), torch.cat(drift)


def save_dreams(path: Path, split: Split, drift: torch.Tensor, seconds: float = 0.0) -> None:
    """The dreams, each one's drift, and the seconds it took to make them."""
    buf = io.BytesIO()
    np.savez_compressed(buf, x=split.x.numpy(), y=split.y.numpy(), drift=drift.numpy(), seconds=np.float64(seconds))
    atomic_write_bytes(path, buf.getvalue())


FIX = "the dreams file is damaged; delete it to dream again"


def load_dreams(path: Path) -> tuple[Split, torch.Tensor]:
    f = read_npz(path, ("x", "y", "drift"), FIX)  # bounded: a dreams folder may come from someone else
    if set(f) != {"x", "y", "drift"}:
        raise ValueError(f"{path} lacks {sorted({'x', 'y', 'drift'} - set(f))}; {FIX}")
    return Split(torch.from_numpy(f["x"]), torch.from_numpy(f["y"])), torch.from_numpy(f["drift"])


def dreaming_seconds(path: Path) -> float:
    """The seconds spent making the dreams in `path` (0 if the file does not say)."""
    f = read_npz(path, ("seconds",), FIX)
    return float(f["seconds"]) if "seconds" in f else 0.0


def with_extra(data: TaskData, extra: list[Split]) -> TaskData:
    """The task with more training examples (validation and test untouched). Where any split
    weighs its examples, the unweighted ones weigh 1."""
    if not extra:
        return data
    splits = [data.train] + extra
    x = torch.cat([s.x for s in splits])
    y = torch.cat([s.y for s in splits])
    w = None
    if any(s.w is not None for s in splits):
        w = torch.cat([torch.ones(len(s)) if s.w is None else s.w.float() for s in splits])
    return replace(data, train=Split(x, y, w))


def _check_folder(out: Path, cfg: DreamTrainConfig) -> None:
    """Dreams and rounds in `out` are reused only under the config that made them; more rounds are
    an extension, anything else another experiment (kept in `DREAM_CONFIG`)."""
    made = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k != "rounds"}))  # as stored
    path = out / DREAM_CONFIG
    if path.exists():
        old = read_json(path, "the folder's dream config is damaged; use another folder")
        if old != made:
            diff = ", ".join(f"{k}: {old.get(k)!r} there, {v!r} here" for k, v in made.items() if old.get(k) != v)
            raise ValueError(f"{out} holds dream rounds made under another config ({diff}); "
                             "use another folder, or the config that made them")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, made)


def dream_training(base: TrainConfig, out: str | Path, cfg: DreamTrainConfig, data: TaskData,
                   device=None, quiet: bool = True, log=print,
                   model: Callable[[], torch.nn.Module] | None = None) -> list[dict[str, Any]]:
    """Rounds 0..cfg.rounds. Returns per round: the Result, the dreams' count and mean drift, and
    the seconds spent dreaming. Each round trains a fresh net: `base.model` (a registered name or an
    import path), or `model()` when a factory of your own is given."""
    out = Path(out)
    _check_folder(out, cfg)
    device = device or torch.device(base.device if base.device != "auto" else "cpu")
    dreamed: list[Split] = []
    rounds = []
    prev: torch.nn.Module | None = None
    a = data.train.subset(base.train_limit)  # A: what round 0 trains on
    data = replace(data, train=a)
    n = max(1, round(cfg.mix * len(a)))
    for r in range(cfg.rounds + 1):
        rdir = out / f"round-{r}"
        info: dict[str, Any] = {"round": r, "dreams": 0, "dream_seconds": 0.0}
        if r:
            path = rdir / DREAMS
            if path.exists():
                split, drift = load_dreams(path)
                info["dream_seconds"] = dreaming_seconds(path)
            else:
                t0 = time.perf_counter()
                src = Split(data.train.x[:n], data.train.y[:n])
                split, drift = dream_split(prev, src, data.mean, data.std, replace(cfg.dream, seed=cfg.dream.seed + r),
                                           device, cfg.batch)
                info["dream_seconds"] = time.perf_counter() - t0
                if cfg.max_drift is not None:
                    keep = drift <= torch.quantile(drift, cfg.max_drift)
                    split, drift = Split(split.x[keep], split.y[keep]), drift[keep]
                save_dreams(path, split, drift, info["dream_seconds"])
            if cfg.drift_weight is not None:
                split = Split(split.x, split.y, torch.exp(-drift.float() / cfg.drift_weight))
            dreamed.append(split)
            info.update(dreams=len(split), mean_drift=float(drift.mean()))
            if split.w is not None:
                info["mean_weight"] = float(split.w.mean())
        cfg_r = base
        if r:  # A is already cut to train_limit; the dreams come after it
            cfg_r = replace(base, train_limit=None, epoch_size=len(a) if cfg.budget == "steps" else None)
        res: Result = train(cfg_r, rdir, resume=(rdir / CHECKPOINT).exists(), data=with_extra(data, dreamed),
                            quiet=quiet, progress=False, model=None if model is None else model())
        prev = res.model
        info["result"] = res
        rounds.append(info)
        log(f"dream round {r}: {info['dreams']} dreams, test acc {res.test_acc:.4f}")
    return rounds
