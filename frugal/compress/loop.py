"""Compression in the training loop: every few epochs each weight tensor is replaced by the
decoded output of the lossy code that scores best on (loss increase) + lambda x (its bytes), and
training goes on from there. The last epoch always ends with a round, so the trained model *is*
its compressed file: `frugal compress RUN` writes exactly those weights. By default that last round
does not search again: it re-applies the codes of the last search (same families and parameters),
so the epochs after the last search repair its damage instead of leaving the final search's loss
increase unrepaired.

The score of a candidate code for a tensor is measured, not estimated: the tensor is replaced by
decode(encode(w)), the loss is measured on `score_examples` validation images (carved from the
training set, never trained on), and the size is len(encode(w)). Tensors are chosen one after
another, each against the loss left by the choices before it (a greedy pass in layer order).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from frugal.coding.codecs import (DCT, Codec, KMeans, Prune, Structured, Uniform, Units, codec_from_spec, dct2,
                                   from_blocks, idct2, to_blocks, unit_masks)
from frugal.coding.learned import Learned
from frugal.coding.tied import tied
from frugal.data import TaskData
from frugal.measure import weight_tensors
from frugal.train import Hook, TrainState, normalize
from frugal.utils import atomic_write_json

CHOSEN = "compression.json"  # written into the run folder after every round
FAMILIES = ("uniform", "prune", "structured", "kmeans", "dct", "learned")
MASKS = ("fixed", "reopen")
FINALS = ("requantise", "search")


@dataclass(frozen=True)
class LoopConfig:
    every: int = 2  # epochs between rounds; the last epoch always ends with one
    lam: float = 0.01  # score = loss increase (nats per example) + lam x kilobytes of the tensor's code
    # families tried per weight tensor ("learned": the integers of each step under densities fitted to them)
    codecs: tuple[str, ...] = ("uniform", "prune", "structured", "kmeans", "dct")
    steps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)  # quantisation steps, in units of the tensor's std
    prune_fractions: tuple[float, ...] = (0.5, 0.75, 0.9, 0.97, 0.99)  # for `prune`, each at every step
    structured_fractions: tuple[tuple[float, float], ...] = (
        (0.25, 0.0), (0.5, 0.25), (0.75, 0.5), (0.9, 0.75))  # (rows, inputs) dropped, for `structured`
    kmeans_k: tuple[int, ...] = (4, 8, 16, 32)  # shared values for `kmeans`
    dct_cutoffs: tuple[int, ...] = (0, 2, 3, 4)  # for `dct`: keep u + v < cutoff (0 keeps all), at every step
    bias_steps: tuple[float, ...] = (0.05, 0.2, 0.8)  # biases and other 1-D tensors: uniform at these steps (stds)
    score_examples: int = 2000  # validation images the loss is measured on
    prefilter: bool = True  # measure the loss only of codes no other code beats on both bytes and weight error
    final: str = "requantise"  # last epoch: "requantise" (the last search's codes again) or "search"
    masks: str = "fixed"  # fixed: what a round zeroed (weights, or DCT frequencies) stays zero; reopen: may regrow
    # weights a k-means code made share a value keep sharing it until the next round: after each
    # step, each takes its cluster's mean (trained quantisation, Han et al. 2016), so the final
    # requantisation finds the values already shared and costs nothing. The zero cluster stays at 0
    # with fixed masks
    tie: bool = True
    # group lasso between rounds: after every step, each output unit's weights (rows, dim 0) and each
    # input unit's weights (dim 1, with its kernel) shrink towards 0 by lr x group x sqrt(group
    # size) in L2 norm, and groups smaller than that become exactly 0 (the proximal step of
    # group x sum_g sqrt(|g|) ||w_g||). Whole units then die, and `structured` or `units` code them for the
    # price of one bit each instead of one symbol per weight. The last weight layer keeps its rows
    # (the classes); tensors with a single input unit keep it. 0 = off
    group: float = 0.0
    group_epochs: int = 0  # group lasso only in the first this many epochs (0: in all); masks keep what died
    # after each round, the batch-norm statistics are estimated again on this many training images
    # (a forward pass in training mode, no gradients): the codes move every layer's output, and the
    # running means and variances of the weights before would no longer fit. They are stored raw, so
    # this costs no bytes. 0 = off
    recalibrate: int = 10000

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"every must be >= 1 epoch, got {self.every}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not (self.group >= 0 and math.isfinite(self.group)):
            raise ValueError(f"group must be a finite number >= 0, got {self.group}")
        if self.group_epochs < 0:
            raise ValueError(f"group_epochs must be >= 0 (0: every epoch), got {self.group_epochs}")
        if self.recalibrate < 0:
            raise ValueError(f"recalibrate must be >= 0 training images (0: off), got {self.recalibrate}")
        if self.final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {self.final!r}")
        if self.masks not in MASKS:
            raise ValueError(f"masks must be one of {MASKS}, got {self.masks!r}")
        unknown = set(self.codecs) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown codec families {sorted(unknown)}; known: {', '.join(FAMILIES)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown compression setting(s) {sorted(unknown)}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: tup(v) for k, v in d.items()})


def candidates(w: torch.Tensor, cfg: LoopConfig) -> list[Codec]:
    """The grid of codes tried on one weight tensor; steps scale with the tensor's spread."""
    std = float(w.detach().float().std()) or 1e-3
    dead = dead_units(w) if "structured" in cfg.codecs else None
    out: list[Codec] = []
    for q in cfg.steps:
        step = q * std
        if "uniform" in cfg.codecs:
            out.append(Uniform(step))
        if "prune" in cfg.codecs:
            out += [Prune(f, step) for f in cfg.prune_fractions]
        if "structured" in cfg.codecs:
            out += [Structured(r, i, step) for r, i in cfg.structured_fractions]
            if dead is not None:
                out.append(Structured(*dead, step))
        if "dct" in cfg.codecs:
            out += [DCT(step, c) for c in cfg.dct_cutoffs]
        if "learned" in cfg.codecs:  # the step's integers under densities fitted to them (in the DCT for kernels)
            kind = "dct" if w.dim() >= 3 else "none"
            out.append(Learned.fitted(w, step, kind, "frequency" if kind == "dct" else "tensor"))
    if "kmeans" in cfg.codecs:
        out += [KMeans(k) for k in cfg.kmeans_k]
    return out


class CompressInTheLoop(Hook):
    """Compression rounds during training. In any loop: call `round(model, data)` between epochs
    (every `cfg.every` epochs, and with search=False after the last) and `hold(model, lr)` after each
    optimizer step (it keeps the zeros, kept frequencies and tied values a round chose);
    `frugal.train` does both as a hook. After a run, `rounds` holds per round: the epoch, each
    tensor's chosen code and bytes, and the validation accuracy after the swap."""

    def __init__(self, cfg: LoopConfig = LoopConfig()):
        self.cfg = cfg
        self.rounds: list[dict[str, Any]] = []
        self.chosen: dict[str, dict[str, Any]] = {}
        self._masks: dict[str, tuple[str, Any]] = {}  # tensor -> ("zeros", bool mask) or ("dct", cutoff)
        self._ties: dict[str, torch.Tensor] = {}  # tensor -> each weight's cluster, -1 = held at 0 (`tie`)

    # -- the hook points ------------------------------------------------------------------------

    def end_of_epoch(self, state: TrainState) -> None:
        done = state.epoch + 1
        if done == state.cfg.epochs:
            self.compress(state, search=not (self.cfg.final == "requantise" and self.chosen))
        elif done % self.cfg.every == 0:
            self.compress(state)

    def after_step(self, state: TrainState) -> None:
        self.hold(state.model, state.optimizer.param_groups[0]["lr"], state.epoch)

    @torch.no_grad()
    def hold(self, model: torch.nn.Module, lr: float, epoch: int = 0) -> None:
        """After an optimizer step: zeros and kept frequencies stay as the last round chose them,
        tied weights move together, and (with `cfg.group`) the group-lasso shrink of `lr` x group is
        applied, during the first `cfg.group_epochs` epochs (0-based `epoch`)."""
        masks = self.cfg.masks == "fixed" and self._masks
        group = self.cfg.group and (not self.cfg.group_epochs or epoch < self.cfg.group_epochs)
        if not masks and not self._ties and not group:
            return
        params = dict(model.named_parameters())
        if group:
            t = self.cfg.group * lr
            layers = [n for n, p in params.items() if p.dim() >= 2]
            for name in layers:
                p = params[name]
                group_shrink(p, t, rows=name != layers[-1], inputs=p.shape[1] > 1)
        if masks:
            self._apply_masks(params)
        for name, cluster in self._ties.items():
            p = params.get(name)
            if p is not None:
                p.copy_(tied(p, cluster.to(p.device)))

    def _apply_masks(self, params: dict[str, torch.nn.Parameter]) -> None:
        for name, (kind, arg) in self._masks.items():
            p = params.get(name)
            if p is None:
                continue
            if kind == "zeros":
                p.masked_fill_(arg.to(p.device), 0.0)
            else:  # keep only the frequencies the code kept: project onto them
                blocks = dct2(to_blocks(p.double()))
                blocks[:, ~DCT(1.0, arg)._keep(*blocks.shape[1:]).to(p.device)] = 0.0
                p.copy_(from_blocks(idct2(blocks), tuple(p.shape)).to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "chosen": self.chosen, "masks": self._masks, "ties": self._ties}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.rounds, self.chosen, self._masks = d["rounds"], d["chosen"], d["masks"]
        self._ties = d.get("ties", {})  # checkpoints from before `tie` have none

    # -- one round --------------------------------------------------------------------------------

    def compress(self, state: TrainState, search: bool = True) -> dict[str, Any]:
        """One round inside frugal.train (see `round`)."""
        return self.round(state.model, state.data, device=state.device, search=search, epoch=state.epoch + 1,
                          out=state.run_dir, log=state.log)

    @torch.no_grad()
    def round(self, model: torch.nn.Module, data: TaskData, *, device=None, search: bool = True, epoch: int = 0,
              out: str | Path | None = None, log: Any = print) -> dict[str, Any]:
        """One round on any model: each weight tensor gets the code that best trades validation loss
        (on `data.val`, normalised with the task's mean and std) against bytes. `search=False`
        re-applies the codes chosen last time to the current weights. `epoch` is recorded; with `out`,
        the choice is written to out/compression.json (what `frugal compress` reads)."""
        t0 = time.perf_counter()
        device = device or next(model.parameters()).device
        was_training = model.training
        model.eval()
        n = min(self.cfg.score_examples, len(data.val))
        dtype = next(model.parameters()).dtype
        x = normalize(data.val.x[:n].to(device), data.mean, data.std, dtype)
        y = data.val.y[:n].to(device)

        def loss() -> float:
            return sum(F.cross_entropy(model(xb), yb, reduction="sum").item()
                       for xb, yb in zip(x.split(500), y.split(500))) / n

        params = dict(model.named_parameters())
        before = loss()
        current = before
        chosen, sizes = {}, {}
        for name, w in weight_tensors(model).items():
            p = params.get(name)
            if p is None:
                continue  # buffers (e.g. batch-norm statistics) stay as they are
            original = p.detach().clone()
            if not search:
                options = [codec_from_spec(self.chosen[name])]
            elif p.dim() < 2:
                std = float(original.float().std()) if original.numel() > 1 else abs(float(original.float().mean()))
                options = [Uniform(max(q * std, 1e-6)) for q in self.cfg.bias_steps]
            else:
                options = candidates(original, self.cfg)
            coded = [(codec, *codec.roundtrip(original)) for codec in options]  # (codec, decoded, bytes)
            if search and p.dim() >= 2:
                coded += with_units(coded)
            if self.cfg.prefilter and len(coded) > 1:
                errors = [float((decoded.double() - original.double()).pow(2).sum()) for _, decoded, _ in coded]
                coded = [coded[i] for i in pareto_front([c[2] for c in coded], errors)]
            best = None
            for codec, decoded, nbytes in coded:
                p.copy_(decoded)
                after = loss() if len(coded) > 1 else current
                score = (after - current) + self.cfg.lam * nbytes / 1024
                if best is None or score < best[0]:
                    best = (score, codec, decoded, nbytes, after)
            _, codec, decoded, nbytes, after = best
            p.copy_(decoded)
            current = after
            chosen[name], sizes[name] = codec.spec(), nbytes
            if isinstance(codec, DCT) and codec.cutoff:
                self._masks[name] = ("dct", codec.cutoff)
            elif p.dim() >= 2:
                self._masks[name] = ("zeros", (decoded == 0).to(p.device))  # kept where the weight is: used every step
            self._ties.pop(name, None)
            if self.cfg.tie and isinstance(codec.inner if isinstance(codec, Units) else codec, KMeans):
                cluster = torch.unique(decoded, return_inverse=True)[1]
                if self.cfg.masks == "fixed":
                    cluster[decoded == 0] = -1  # zeros stay zero, as the masks say
                self._ties[name] = cluster.to(p.device)
        recalibrated = recalibrate_batchnorm(model, data, self.cfg.recalibrate, device, dtype)
        val_loss = loss()
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(500), y.split(500)))
        model.train(was_training)
        record = {"epoch": epoch, "search": search, "loss_before": before, "loss_after": val_loss,
                  "val_acc_after": correct / n,
                  "bytes": sum(sizes.values()), "tensor_bytes": sizes, "codecs": chosen, "recalibrated": recalibrated,
                  "seconds": time.perf_counter() - t0}
        self.rounds.append(record)
        self.chosen = chosen
        if out is not None:
            atomic_write_json(Path(out) / CHOSEN, {"codecs": chosen, "loop": asdict(self.cfg), "rounds": self.rounds})
        log(f"compression {'round' if search else 'requantisation'} at epoch {record['epoch']}: "
                  f"{record['bytes']:,} bytes of codes, "
                  f"val loss {before:.4f} -> {val_loss:.4f}, val acc {correct / n:.4f} ({record['seconds']:.1f}s)")
        return record


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, data, n: int, device, dtype=torch.float32,
                          batch: int = 256) -> bool:
    """Estimate every batch-norm layer's running mean and variance again, as plain averages over
    the first n training images (model in training mode, no gradients). Leaves the model in eval
    mode. False (and nothing touched) when the model has no batch norm or n is 0."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns or n <= 0:
        return False
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all the batches below
    model.train()
    try:
        x = data.train.x[:n]
        for i in range(0, len(x), batch):
            model(normalize(x[i:i + batch].to(device), data.mean, data.std, dtype))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return True


def with_units(coded: list[tuple[Codec, torch.Tensor, int]]) -> list[tuple[Codec, torch.Tensor, int]]:
    """For each (code, decoded, bytes) of a kind `Units` wraps whose decoded tensor has a whole output
    or input unit at zero: the same code with those units cut out, which decodes to the same tensor."""
    out = []
    for codec, decoded, _ in coded:
        if isinstance(codec, (Uniform, Prune, KMeans)):
            rows, inputs = unit_masks(decoded)
            if not (rows.all() and inputs.all()):
                units = Units(codec)
                out.append((units, decoded, len(units.pack(decoded))))
    return out


def dead_units(w: torch.Tensor) -> tuple[float, float] | None:
    """(rows, inputs) fractions for `Structured` that drop exactly the output units whose weights
    are all 0 and then the input units all 0 in the rows left; None when no unit is dead (or all
    are, or the tensor has fewer than 2 dimensions)."""
    if w.dim() < 2:
        return None
    rows, inputs = unit_masks(w.detach())
    n_rows, n_in = int((~rows).sum()), int((~inputs).sum())
    if n_rows == w.shape[0] or (n_rows == 0 and n_in == 0):
        return None
    # int(fraction x count) must give back the count: aim half a unit above it
    return (n_rows + 0.5) / w.shape[0] if n_rows else 0.0, (n_in + 0.5) / w.shape[1] if n_in else 0.0


@torch.no_grad()
def group_shrink(w: torch.Tensor, t: float, rows: bool = True, inputs: bool = True) -> None:
    """In place, the proximal step of t x sum_g sqrt(|g|) ||w_g||_2 over the output units (rows,
    dim 0) and then over the input units (dim 1): each group scaled by max(0, 1 - t sqrt(|g|) / ||w_g||)."""
    m = w.view(w.shape[0], w.shape[1], -1)
    if rows:
        norm = m.pow(2).sum((1, 2), keepdim=True).sqrt()
        m.mul_((1 - t * math.sqrt(m[0].numel()) / norm.clamp_min(1e-30)).clamp_min(0))
    if inputs:
        norm = m.pow(2).sum((0, 2), keepdim=True).sqrt()
        m.mul_((1 - t * math.sqrt(m[:, 0].numel()) / norm.clamp_min(1e-30)).clamp_min(0))



def pareto_front(sizes: list[float], errors: list[float]) -> list[int]:
    """Indices of the candidates no other candidate beats on both counts (no larger and no worse,
    one of them strictly), in their original order; of exact ties the first is kept."""
    keep = []
    for i, (si, ei) in enumerate(zip(sizes, errors)):
        dominated = any((sj <= si and ej <= ei) and ((sj, ej) != (si, ei) or j < i)
                        for j, (sj, ej) in enumerate(zip(sizes, errors)) if j != i)
        if not dominated:
            keep.append(i)
    return keep


__all__ = ["CHOSEN", "CompressInTheLoop", "LoopConfig", "candidates", "dead_units", "group_shrink", "pareto_front"]
