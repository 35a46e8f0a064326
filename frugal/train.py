"""The training loop: `train(cfg) -> Result`.

One visible loop over epochs and batches. A model may add terms to the loss with a method
`extra_loss(x, logits, y) -> Tensor | None` (on the model or any of its modules); beyond that, a
few hook points the ideas use: `extra_loss` (add a term to the loss), `after_backward` (between backward and the optimizer step),
`end_of_epoch`, and `before_eval`. Every run writes a folder with the resolved config, metrics, the
weights (safetensors), a log, and a checkpoint per epoch from which `resume=True` continues. A
training split may weight its examples (`Split.w`): the loss is then their weighted mean.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import io
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .data import TaskData, load_task
from .data.types import Split
from .models import (SizeLimits, UntrustedModelSource, apply_transforms, create_model, import_path_of, is_import_path,
                     trust_model_source)
from .utils import (LockHeld, atomic_write_bytes, atomic_write_json, file_lock, read_json, remove_stale_temp_files,
                    resolve_device, seed_everything, versions)

CHECKPOINT = "checkpoint.pt"
TRAIN_LOCK = ".train.lock"  # held while a process trains the folder
WEIGHTS = "model.safetensors"
HISTORY_CSV = "metrics.csv"  # one row per epoch, rewritten with the checkpoint: it never runs ahead of it


AUGMENTS = ("none", "shift", "shift-flip", "affine-noise")


def _f(default: Any, help: str, **kw) -> Any:
    """A config field with its help text: the one place a setting is described (`frugal train
    --help` shows it)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    task: str = _f("mnist", "data set name (`frugal data list`), or folder:/path for your own")
    model: str = _f("lenet5", "a registered model (`frugal models`), or an import path 'package.module:Callable' of "
                              "a class or function that returns an nn.Module")
    model_kw: dict = _f(dict, "extra keyword arguments for the model, a JSON object, e.g. '{\"width\": 64}'")
    epochs: int = _f(5, "passes over the training split (see epoch_size)")
    epoch_size: int | None = _f(None, "examples per epoch: a fresh random subset of the training split each epoch, "
                                      "none twice; default all of it (fixes the optimiser steps when the set grows)")
    batch_size: int = _f(128, "examples per optimizer step")
    optimizer: str = _f("adam", "adam | adamw | sgd")
    lr: float = _f(1e-3, "peak learning rate")
    momentum: float = _f(0.9, "sgd momentum (nesterov)")
    weight_decay: float = _f(0.0, "L2 (sgd, adam) or decoupled (adamw) weight decay")
    schedule: str = _f("cosine", "cosine | constant | onecycle (linear warm-up then cosine)")
    warmup_epochs: float = _f(0.0, "linear warm-up length, in epochs (cosine and onecycle)")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    augment: str = _f("none", "none | shift (random translation, +-2 px) | shift-flip (plus left-right flips) | "
                              "affine-noise (rotation +-10 deg, scale 0.9-1.1, shift +-2 px, Gaussian pixel noise 0.1)")
    seed: int = _f(0, "seeds weights, batch order and augmentation")
    device: str = _f("auto", "auto | cpu | cuda[:N]")
    train_limit: int | None = _f(None, "use only the first n training examples (tests, quick runs)")
    val_size: int | None = _f(None, "examples held out of training for validation; default: the data set's")
    eval_batch_size: int = _f(256, "examples per evaluation batch (large ones page-fault big buffers on CPU)")
    data_dir: str | None = _f(None, "data cache; default FRUGAL_DATA or the user's cache folder")
    threads: int | None = _f(None, "torch intra-op threads, >= 1; default torch's")
    init_from: str | None = _f(None, "a finished run folder: its weights start every parameter and buffer of the "
                                     "same name and shape (fine-tuning, or a sparse model from its dense twin)")
    tensorboard: bool = _f(False, "also write the per-epoch metrics as TensorBoard events to RUN/tensorboard "
                                  "(pip install -e '.[tensorboard]')")

    def __post_init__(self) -> None:
        _check_field_types(self)
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.optimizer in ("adam", "adamw", "sgd"),
             f"unknown optimizer {self.optimizer!r}; known: adam, adamw, sgd"),
            (self.schedule in ("cosine", "constant", "onecycle"),
             f"unknown schedule {self.schedule!r}; known: cosine, constant, onecycle"),
            (self.augment in AUGMENTS, f"unknown augment {self.augment!r}; known: {', '.join(AUGMENTS)}"),
            (self.train_limit is None or self.train_limit >= 1, "train_limit must be >= 1 or None"),
            (self.epoch_size is None or self.epoch_size >= 1, "epoch_size must be >= 1 or None"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1 (or None: torch's default), got {self.threads}"),
            (math.isfinite(self.lr), f"lr must be finite, got {self.lr}"),
            (isinstance(self.model_kw, dict),
             f"model_kw must be a JSON object of model options like {{\"width\": 64}}, got {self.model_kw!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"bad TrainConfig: {msg}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a TrainConfig is a mapping of its fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,)}


def _check_field_types(cfg: Any) -> None:
    """Each field of a config dataclass holds a value of its annotated type (`int`, `float | None`,
    ...), so that a config read from a file fails here, naming the field, not deep in training."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if v is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in _FIELD_TYPES.get(k, ()))
        if allowed and (not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed)):
            raise ValueError(f"bad {type(cfg).__name__}: {f.name} must be {f.type}, got {v!r}")


@dataclass
class Result:
    run_dir: Path
    config: TrainConfig
    model: nn.Module
    history: list[dict[str, float]]  # one row per epoch: train_loss, train_acc, val_loss, val_acc, seconds
    test_acc: float
    test_loss: float
    train_seconds: float  # wall-clock of all epochs in this and earlier (resumed) processes
    steps: int = 0  # optimiser steps taken

    @property
    def val_acc(self) -> float:
        return self.history[-1]["val_acc"]


@dataclass
class TrainState:
    """What a hook sees. Hooks may change the model's weights or the optimizer in place."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: TaskData
    device: torch.device
    run_dir: Path
    epoch: int = 0  # 0-based index of the current epoch
    step: int = 0  # optimizer steps taken so far
    loss: torch.Tensor | None = None  # the last batch's loss (after backward: still attached)
    history: list[dict[str, float]] = field(default_factory=list)
    log: Any = print  # call state.log("...") to write to the run log


class Hook:
    """Base class for training hooks; override only what you need."""

    def extra_loss(self, state: TrainState, logits: torch.Tensor, x: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_backward(self, state: TrainState) -> None: ...

    def after_step(self, state: TrainState) -> None: ...

    def end_of_epoch(self, state: TrainState) -> None: ...

    def before_eval(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


class TrainingDiverged(RuntimeError):
    pass


# An epoch whose mean cross-entropy passes this many times that of a uniform guess (ln classes) has
# diverged even though every loss was finite (an lr of 1e6 ends near 1e12): stopped like a NaN.
DIVERGED_LOSS_FACTOR = 100.0


# ---------------------------------------------------------------------------------------------------


def normalize(x: torch.Tensor, mean: float, std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> standardised floats."""
    return (x.to(dtype) / 255.0 - mean) / std


def affine_noise(x: torch.Tensor, gen: torch.Generator, degrees: float = 10.0, scale: float = 0.1,
                 shift: float = 2.0, noise: float = 0.1) -> torch.Tensor:
    """Random affine (rotation, scale, translation in pixels; zero fill) and Gaussian noise of
    `noise` x 255 per pixel, on uint8-valued images; returns floats in [0, 255]."""
    b, _, h, w = x.shape
    ang = (torch.rand(b, generator=gen) * 2 - 1) * degrees * torch.pi / 180
    s = 1 + (torch.rand(b, generator=gen) * 2 - 1) * scale
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * shift * 2 / torch.tensor([w, h])  # in [-1, 1] units
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, align_corners=False, padding_mode="zeros")
    out = out + noise * 255 * torch.randn(out.shape, generator=gen).to(x.device)
    return out.clamp(0, 255)


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 px (zero fill) and, for shift-flip, left-right flips; or
    `affine_noise`. Random numbers come from `gen` (CPU) so that a resumed run draws the same ones."""
    if kind == "none":
        return x
    if kind == "affine-noise":
        return affine_noise(x, gen)
    b, _, h, w = x.shape
    pad = 2
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+4, W+4)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (B, H)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None]
    # gather a (H, W) window per example: index (B, 1, 1), (B, H, 1), (B, 1, W) -> (B, H, W, C)
    x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)
    if kind == "shift-flip":
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, mean: float, std: float, device: torch.device,
             batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on a split, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    dtype = next(model.parameters()).dtype
    for i in range(0, len(split), batch_size):
        x = normalize(split.x[i:i + batch_size].to(device), mean, std, dtype)
        y = split.y[i:i + batch_size].to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    n = max(len(split), 1)
    return correct / n, loss_sum / n


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and warm == 0:
        warm = max(1, total // 10)  # onecycle without an explicit warm-up: the first 10%
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    t = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Batch order and augmentation of an epoch depend only on (seed, epoch): a resumed run
    replays exactly the epochs an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class RunLog:
    """Appends lines to run_dir/log.txt and echoes them to stderr unless quiet."""

    def __init__(self, path: Path, quiet: bool = False):
        self.path, self.quiet = path, quiet

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


def model_spec(cfg: TrainConfig, data: TaskData) -> dict[str, Any]:
    """Everything create_model needs to rebuild the architecture of a run."""
    return {"name": cfg.model, "in_channels": data.in_channels, "image_size": list(data.image_size),
            "num_classes": data.num_classes, "kw": dict(cfg.model_kw)}


SHAPE_KEYS = ("in_channels", "image_size", "num_classes")


def check_spec(spec: Any) -> dict[str, Any]:
    """A model spec read from a file (a run folder's config.json, a model file's header), checked for
    its structure before anything is built from it: ValueError saying which field is wrong."""
    def fail(what: str):
        raise ValueError(f"the model spec {str(spec)[:120]} is malformed: {what}")

    if not isinstance(spec, dict):
        fail("it is not a JSON object")
    unknown = sorted(set(spec) - {"name", "kw", "transforms", *SHAPE_KEYS})
    if unknown:
        fail(f"unknown field(s) {unknown}")
    if not isinstance(spec.get("name"), str):
        fail("'name' must be a model name")
    # the task's shape; a model saved from an object may not know it (then its class's defaults hold)
    for key in ("in_channels", "num_classes"):
        v = spec.get(key, 1)
        if type(v) is not int or not 1 <= v <= 1 << 20:
            fail(f"{key!r} must be a whole number from 1 to {1 << 20}")
    size = spec.get("image_size", [1, 1])
    if not (isinstance(size, list) and len(size) == 2 and all(type(s) is int and 1 <= s <= 1 << 16 for s in size)):
        fail(f"'image_size' must be [height, width], each from 1 to {1 << 16}")
    kw = spec.get("kw", {})
    if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
        fail("'kw' must be a JSON object of model options")
    if not _plain_json(kw, depth=4):
        fail("'kw' holds values nested too deeply or too long (options are numbers, strings and short lists)")
    transforms = spec.get("transforms", [])
    if not (isinstance(transforms, list) and len(transforms) <= 8 and all(
            isinstance(t, dict) and set(t) <= {"name", "kw"} and isinstance(t.get("name"), str)
            and isinstance(t.get("kw", {}), dict) and _plain_json(t.get("kw", {}), depth=4) for t in transforms)):
        fail("'transforms' must be a short list of {\"name\": ..., \"kw\": {...}}")
    return spec


def _plain_json(v: Any, depth: int) -> bool:
    """Numbers, strings, booleans, null, and lists or objects of them nested at most `depth` deep,
    at most 1,000 items each: what model options are."""
    if v is None or isinstance(v, (bool, int, float)):
        return True
    if isinstance(v, str):
        return len(v) <= 1000
    if isinstance(v, (list, dict)):
        items = v.values() if isinstance(v, dict) else v
        return depth > 0 and len(v) <= 1000 and all(_plain_json(x, depth - 1) for x in items)
    return False


def build_model(spec: dict[str, Any], device=None, limits: SizeLimits | None = None) -> nn.Module:
    """The model a spec describes. `limits`: the spec was read from a file, so its structure is
    checked and its size bounded before anything is allocated (ModelTooLarge past a bound)."""
    if limits is not None:
        check_spec(spec)
    shape = {k: tuple(v) if k == "image_size" else v for k, v in spec.items() if k in SHAPE_KEYS}
    model = create_model(spec["name"], device=device, limits=limits, **shape, **spec.get("kw", {}))
    return apply_transforms(model, spec.get("transforms"))


# ---------------------------------------------------------------------------------------------------


_WAIT_FOR_HELD_RUNS = contextvars.ContextVar("frugal_wait_for_held_runs", default=False)


@contextlib.contextmanager
def waiting_for_held_runs():
    """Inside the block, resuming a run folder that another process holds waits for it, instead of
    failing. The bench's jobs run so: two jobs may reload the same finished run (the base that
    both a tree and a control start from), and the graph has already made sure it is finished."""
    token = _WAIT_FOR_HELD_RUNS.set(True)
    try:
        yield
    finally:
        _WAIT_FOR_HELD_RUNS.reset(token)


def train(cfg: TrainConfig, run_dir: str | Path, *, hooks: Sequence[Hook] = (), resume: bool = False,
          model: nn.Module | None = None, data: TaskData | None = None, progress: bool | None = None,
          quiet: bool = False) -> Result:
    """Train cfg.model on cfg.task; write the run folder; return the trained model and its metrics.

    `model` replaces the registered model (an idea's own network); `data` skips loading the task.
    With resume=True, continues from run_dir/checkpoint.pt, which must come from the same config.
    One process at a time trains a run folder: another one gets a clear error, not a mixed run."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(run_dir / TRAIN_LOCK, wait=False))
        except LockHeld as e:
            if not (resume and _WAIT_FOR_HELD_RUNS.get()):
                raise RuntimeError(f"{run_dir} is being trained by another process ({e}); wait for it to finish "
                                   "(then resume or read the run), or train into another folder") from None
            held.enter_context(file_lock(run_dir / TRAIN_LOCK))
        return _train(cfg, run_dir, hooks, resume, model, data, progress, quiet)


def _train(cfg: TrainConfig, run_dir: Path, hooks: Sequence[Hook], resume: bool, model: nn.Module | None,
           data: TaskData | None, progress: bool | None, quiet: bool) -> Result:
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = RunLog(run_dir / "log.txt", quiet=quiet)
    for p in remove_stale_temp_files(run_dir):  # we hold the folder's lock: no one else writes here
        log(f"removed {p.name}, left by a killed write")

    if data is None:
        data = load_task(cfg.task, data_dir=cfg.data_dir, val_size=cfg.val_size)
    train_split = data.train.subset(cfg.train_limit)
    seed_everything(cfg.seed)
    spec = model_spec(cfg, data)
    if is_import_path(cfg.model):  # the caller named this code: files of this process may name it too
        trust_model_source(cfg.model)
    if model is None:
        model = build_model(spec)
    else:  # a model object: rebuildable from what built it (create_model records it), else from its
        # class's import path (options unknown); then any in-place change that recorded itself (sparsify)
        own = getattr(model, "frugal_spec", None)
        if isinstance(own, dict) and isinstance(own.get("name"), str):
            path = own["name"] if is_import_path(own["name"]) else None
            spec = {**spec, "name": own["name"], "kw": dict(own.get("kw", {}))}
        else:
            path = import_path_of(model)
            spec = None if path is None else {**spec, "name": path, "kw": {}}
        if spec is not None and getattr(model, "frugal_transforms", None):
            spec["transforms"] = list(model.frugal_transforms)
        if path is not None:
            trust_model_source(path)
    if cfg.init_from and not resume:
        loaded = init_weights_from(model, cfg.init_from)
        log(f"initialised {len(loaded)} tensors from {cfg.init_from}")
    model = model.to(device)
    optimizer = make_optimizer(cfg, model)
    state = TrainState(cfg, model, optimizer, data, device, run_dir, log=log)

    ckpt_path = run_dir / CHECKPOINT
    start_epoch, train_seconds = 0, 0.0
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {run_dir}; start the run without --resume")
        start_epoch, train_seconds = _load_checkpoint(ckpt_path, cfg, state, hooks)
        log(f"resumed from epoch {start_epoch} in {run_dir}")
    else:
        if ckpt_path.exists():
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, "
                                  "or choose another --out folder")
        atomic_write_json(run_dir / "config.json", {
            "config": cfg.to_dict(), "model_spec": spec,
            "task": repr(data), "device": str(device), "versions": versions()})
        log(f"start {cfg.model} on {data!r}, {sum(p.numel() for p in model.parameters())} params, device {device}")

    board = tensorboard_writer(run_dir, start_epoch) if cfg.tensorboard else None
    # the whole training split lives on the device as uint8; batches are index slices of it
    xs, ys = train_split.x.to(device), train_split.y.to(device)
    ws = None if train_split.w is None else train_split.w.to(device, torch.float32)  # per-example loss weights
    n = min(len(train_split), cfg.epoch_size or len(train_split))  # examples per epoch
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    dtype = next(model.parameters()).dtype
    # a bar where someone watches: a terminal, or a notebook (whose stderr is no tty)
    show_bar = (sys.stderr.isatty() or "ipykernel" in sys.modules) if progress is None else progress
    # the model's own terms and schedules: on the model or any of its modules (a saccade gate inside a user's net)
    model_losses = [m.extra_loss for m in model.modules() if callable(getattr(m, "extra_loss", None))]
    for m in model.modules():
        if callable(getattr(m, "begin_run", None)):  # a schedule given as a share of the run (saccadic)
            m.begin_run(cfg.epochs * steps_per_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        state.epoch = epoch
        t0 = time.perf_counter()
        model.train()
        gen = epoch_generator(cfg.seed, epoch)
        order = torch.randperm(len(train_split), generator=gen)[:n].to(device)
        loss_sum = torch.zeros((), device=device)  # summed on device: no sync point per step
        ce_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        batches = range(steps_per_epoch)
        if show_bar:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for b in batches:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = normalize(augment_batch(xs[idx], cfg.augment, gen), data.mean, data.std, dtype)
            y = ys[idx]
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * lr_factor(cfg, state.step, steps_per_epoch)
            logits = model(x)
            if ws is None:
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            else:  # the weighted mean, as cross_entropy's class weights do: weights count relative to each other
                per = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing, reduction="none")
                w = ws[idx]
                loss = (w * per).sum() / w.sum().clamp_min(1e-12)
            ce_sum += loss.detach() * len(idx)
            for model_loss in model_losses:  # a model's own auxiliary terms (e.g. an attention policy's)
                extra = model_loss(x, logits, y)
                if extra is not None:
                    loss = loss + extra
            for h in hooks:
                extra = h.extra_loss(state, logits, x, y)
                if extra is not None:
                    loss = loss + extra
            if not torch.isfinite(loss):  # note: a sync point on GPU; a diverged run must stop here
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {state.step}; the last good "
                    f"checkpoint (epoch {epoch}) is kept in {run_dir}. Lower the learning rate "
                    f"(now {cfg.lr}) or check the input data.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.loss = loss
            for h in hooks:
                h.after_backward(state)
            optimizer.step()
            for h in hooks:
                h.after_step(state)
            state.step += 1
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()

        ce = ce_sum.item() / n
        if ce > DIVERGED_LOSS_FACTOR * math.log(max(data.num_classes, 2)):
            raise TrainingDiverged(
                f"the mean training loss of epoch {epoch + 1} is {ce:.3g}, over {DIVERGED_LOSS_FACTOR:g}x that of a "
                f"uniform guess over {data.num_classes} classes: training diverged. The last good checkpoint (epoch "
                f"{epoch}) is kept in {run_dir}. Lower the learning rate (now {cfg.lr}) or check the input data.")
        for h in hooks:
            h.before_eval(state)
        val_acc, val_loss = evaluate(model, data.val, data.mean, data.std, device, cfg.eval_batch_size)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / n, "train_acc": correct.item() / n,
               "val_loss": val_loss, "val_acc": val_acc, "seconds": seconds,
               "lr": optimizer.param_groups[0]["lr"]}
        state.history.append(row)
        for h in hooks:
            h.end_of_epoch(state)
        _save_checkpoint(ckpt_path, cfg, state, hooks, epoch + 1, train_seconds)
        write_history_csv(run_dir / HISTORY_CSV, state.history)
        if board is not None:
            for k, v in row.items():
                if k != "epoch":
                    board.add_scalar(k, v, epoch + 1)
            board.flush()
        log(f"epoch {epoch + 1}/{cfg.epochs} train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f} "
            f"val_loss {val_loss:.4f} val_acc {val_acc:.4f} ({seconds:.1f}s)")

    for m in model.modules():
        ended = m.end_run() if callable(getattr(m, "end_run", None)) else None
        if ended:  # the model's own word that the run was too short for what it was asked
            log(f"warning: {ended}")
            warnings.warn(ended, stacklevel=2)
    for h in hooks:
        h.before_eval(state)
    test_acc, test_loss = evaluate(model, data.test, data.mean, data.std, device, cfg.eval_batch_size)
    atomic_write_bytes(run_dir / WEIGHTS, st_save({k: v.detach().cpu().contiguous() for k, v in
                                                   model.state_dict().items()},
                                                  metadata={"config": json.dumps(cfg.to_dict())}))
    atomic_write_json(run_dir / "metrics.json", {
        "test_acc": test_acc, "test_loss": test_loss, "val_acc": state.history[-1]["val_acc"],
        "train_seconds": train_seconds, "steps": state.step, "epochs": state.history, "versions": versions()})
    if board is not None:
        board.add_scalar("test_acc", test_acc, cfg.epochs)
        board.close()
    log(f"done: test_acc {test_acc:.4f} val_acc {state.history[-1]['val_acc']:.4f} train {train_seconds:.1f}s")
    return Result(run_dir, cfg, model, state.history, test_acc, test_loss, train_seconds, state.step)


def _save_checkpoint(path: Path, cfg: TrainConfig, state: TrainState, hooks: Sequence[Hook],
                     epochs_done: int, train_seconds: float) -> None:
    payload = {
        "config": cfg.to_dict(), "epochs_done": epochs_done, "step": state.step,
        "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "history": state.history, "train_seconds": train_seconds,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "hooks": [h.state_dict() for h in hooks], "versions": versions(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


TENSORBOARD_DIR = "tensorboard"


def tensorboard_writer(run_dir: Path, start_epoch: int):
    """A TensorBoard writer for RUN/tensorboard; a resumed run drops events past its checkpoint
    (a killed epoch's), as metrics.csv does."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("tensorboard=True needs TensorBoard: pip install -e '.[tensorboard]' (or leave out "
                           "--tensorboard; metrics.csv has the same figures)") from None
    return SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start_epoch + 1)


def write_history_csv(path: Path, history: list[dict[str, float]]) -> None:
    """The per-epoch metrics as CSV (epoch, train_loss, train_acc, val_loss, val_acc, seconds, lr),
    for a spreadsheet or pandas; written whole and atomically, so a resumed run's file has each
    epoch once."""
    import csv

    buf = io.StringIO()
    if history:
        w = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def read_checkpoint(path: str | Path, map_location=None) -> dict[str, Any]:
    """A checkpoint's contents, read without unpickling code: tensors, numbers, strings and
    containers only (`weights_only=True`). Anything else in the file, which only a pickle load
    could rebuild, is refused with a ValueError naming the file; nothing in it runs."""
    import pickle

    from torch.torch_version import TorchVersion

    try:
        # checkpoints written before versions() stored a plain str hold torch's version string type
        with torch.serialization.safe_globals([TorchVersion]):
            ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names a refused object in a line with GLOBAL ("unsupported GLOBAL posix.system ..."); any
        # other failure is bytes that do not parse
        why = [ln.split("error:", 1)[-1].strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        if not why:
            raise RuntimeError(f"cannot read checkpoint {path}: it does not parse as one; the file is damaged. "
                               "Delete the run folder and train again") from None
        first = why[0][:200]
        raise ValueError(f"{path} holds objects that only an unsafe (pickle) load could read ({first}); frugal "
                         "never runs code from a file. If you did not write it yourself, do not trust it: delete the "
                         "run folder and train again") from None
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {e}; the file is damaged. Delete the run folder and "
                           "train again") from None
    missing = [k for k in ("config", "epochs_done", "step", "model", "optimizer", "history", "train_seconds",
                           "torch_rng", "hooks") if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"{path} is not a frugal checkpoint (it lacks {missing}); delete the run folder and "
                         "train again")
    return ck


def _load_checkpoint(path: Path, cfg: TrainConfig, state: TrainState, hooks: Sequence[Hook]) -> tuple[int, float]:
    ck = read_checkpoint(path, map_location=state.device)
    saved = TrainConfig.from_dict(ck["config"])
    # where things are and run, not what is trained; `init_from` only set the weights at epoch 0,
    # which the checkpoint has replaced (a run and its twin may move together)
    diff = {k: (v, getattr(cfg, k)) for k, v in saved.to_dict().items()
            if k not in ("device", "threads", "data_dir", "init_from", "tensorboard") and v != getattr(cfg, k)}
    if diff:
        raise ValueError(f"cannot resume {path.parent}: the config differs from the saved run in "
                         f"{ {k: f'{a!r} -> {b!r}' for k, (a, b) in diff.items()} }; resume with the same settings")
    if len(ck["hooks"]) != len(hooks):
        raise ValueError(f"cannot resume: the run was saved with {len(ck['hooks'])} hook(s), now {len(hooks)}")
    state.model.load_state_dict(ck["model"])
    state.optimizer.load_state_dict(ck["optimizer"])
    state.step = ck["step"]
    state.history = list(ck["history"])
    torch.set_rng_state(ck["torch_rng"].cpu())
    if ck["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
    for h, d in zip(hooks, ck["hooks"]):
        h.load_state_dict(d)
    was = str((ck.get("versions") or {}).get("torch_threads"))
    if was != str(torch.get_num_threads()):  # float sums are ordered by the thread split
        msg = (f"resuming {path.parent} with {torch.get_num_threads()} torch threads; its earlier epochs ran with "
               f"{was}: the run will not be bit-identical to an uninterrupted one (resume with --threads {was} "
               "to keep that)")
        state.log(f"warning: {msg}")
        warnings.warn(msg, stacklevel=3)
    return ck["epochs_done"], ck["train_seconds"]


def init_weights_from(model: nn.Module, run_dir: str | Path) -> list[str]:
    """Copy a finished run's weights into `model` wherever name and shape agree; the rest keep their
    initialisation. Returns the names copied. A run that shares no tensor with the model is an error
    (the wrong folder, most likely), not a silent fresh start."""
    w_path = Path(run_dir) / WEIGHTS
    if not w_path.exists():
        raise FileNotFoundError(f"init_from: {run_dir} is not a finished run ({WEIGHTS} is missing); "
                                "train it first, or give the folder of a finished run")
    source = read_weights(w_path)
    own = model.state_dict()
    loaded = sorted(k for k, v in source.items() if k in own and own[k].shape == v.shape)
    if not loaded:
        raise ValueError(f"init_from: no tensor of {run_dir} matches the model by name and shape; "
                         f"it has {sorted(source)[:5]}..., the model {sorted(own)[:5]}...")
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(source[k])
    return loaded


def load_run(run_dir: str | Path, device=None) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild a finished run's model from its folder: (model, config, metrics). The folder may come
    from someone else: its files are read as data only, the model's size is bounded by what its
    weights file holds before anything is built, and every fault is a ValueError naming the file."""
    run_dir = Path(run_dir)
    cfg_path, w_path = run_dir / "config.json", run_dir / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {p.name} is missing "
                                    "(train it with `frugal train`, or resume it with --resume)")
    fix = "the run folder is damaged; train the run again"
    meta = read_json(cfg_path, fix)
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{cfg_path} is not a run's config (no 'config' object); {fix}")
    if meta.get("model_spec") is None:
        raise ValueError(f"{run_dir} was trained with a model object whose class cannot be imported (defined in a "
                         f"script or a function); rebuild it in Python and load {WEIGHTS} with "
                         "frugal.train.read_weights, or define the class in an importable module")
    try:
        cfg = TrainConfig.from_dict(meta["config"])
        check_spec(meta["model_spec"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}; {fix}") from None
    weights = read_weights(w_path)
    entries = sum(t.numel() for t in weights.values())
    # what the file holds bounds the model: room for parameters re-registered by a parametrization and
    # for buffers not saved (a fixed basis), but not for a model that the weights could never fill
    limits = SizeLimits(entries=min(SizeLimits.entries, 2 * entries + (1 << 20)),
                        tensors=min(SizeLimits.tensors, 2 * len(weights) + 1000))
    try:
        model = build_model(meta["model_spec"], device=device, limits=limits)
    except UntrustedModelSource as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    except Exception as e:  # a spec that does not build is the file's fault, whatever the error
        raise ValueError(f"{cfg_path}: cannot rebuild the model from its model_spec ({e}); {fix}") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{w_path} does not fit the model {meta['model_spec']['name']!r} of {cfg_path} "
                         f"({str(e).strip().splitlines()[0][:300]}); {fix}") from None
    metrics_path = run_dir / "metrics.json"
    metrics = read_json(metrics_path, fix) if metrics_path.exists() else {}
    return model, cfg, metrics


RUN_FILES = ("config.json", CHECKPOINT, "metrics.json", HISTORY_CSV, WEIGHTS, "log.txt")  # what a run folder holds


def copy_run(src: str | Path, dest: str | Path) -> Path:
    """Copy a run folder's own files (RUN_FILES) into a new folder `dest`: nothing else, and only
    regular files, so a folder from someone else cannot make us copy a device, a link's target or
    anything of theirs."""
    src, dest = Path(src), Path(dest)
    odd = [p.name for p in (src / n for n in RUN_FILES) if p.is_symlink() or (p.exists() and not p.is_file())]
    if odd:
        raise ValueError(f"{src} holds {odd} that are not regular files; a run folder holds only files frugal wrote")
    dest.mkdir(parents=True, exist_ok=False)
    for name in RUN_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    return dest


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (no code runs: the format holds only tensors), or a
    ValueError naming the file when it is damaged."""
    path = Path(path)
    try:
        return st_load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error type for a damaged header or truncated data
        raise ValueError(f"{path} is not a readable safetensors file ({str(e)[:200]}): it is damaged; train "
                         "the run again") from None
