"""After training: detect kernels that are nearly simple, snap them to the clean form, freeze them,
and fine-tune the rest of the net to recover.

For each k x k kernel and each class (the symmetries, rank 1, and `blur`: the lowest DCT
frequencies, u + v < 2) the score is the relative energy of the residual after projecting onto the
class, ||w - P w||^2 / ||w||^2. A kernel snaps to the class with the fewest free values among
those scoring at most the threshold (ties: the lower residual). Snapped kernels are held exactly
at their clean form during fine-tuning (`FreezeKernels`: gradients zeroed, values restored after
each step, so momentum and weight decay cannot move them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from frugal.kernels.constrained import SYMMETRIES, dct_basis, symmetry_basis
from frugal.kernels.penalty import conv_kernels
from frugal.train import Hook, TrainState

BLUR_FREQS = 2  # `blur` keeps DCT frequencies with u + v < 2: the mean and the two first gradients
CLASSES = (*SYMMETRIES, "rank1", "blur")


def class_free_values(k: int, cls: str) -> int:
    if cls in SYMMETRIES:
        return symmetry_basis(k, cls).shape[1]
    if cls == "rank1":
        return 2 * k
    if cls == "blur":
        return sum(1 for u in range(k) for v in range(k) if u + v < BLUR_FREQS)
    if cls == "free":
        return k * k
    raise ValueError(f"unknown kernel class {cls!r}; known: {', '.join(CLASSES)}, free")


def project(w: torch.Tensor, cls: str) -> torch.Tensor:
    """Kernels (..., k, k) projected onto the class."""
    k = w.shape[-1]
    flat = w.reshape(-1, k * k).double()
    if cls in SYMMETRIES or cls == "blur":
        b = symmetry_basis(k, cls) if cls in SYMMETRIES else dct_basis(k, class_free_values(k, "blur"))
        out = (flat @ b) @ b.T
    elif cls == "rank1":
        U, S, Vh = torch.linalg.svd(flat.reshape(-1, k, k))
        out = (U[..., :, :1] * S[..., None, :1]) @ Vh[..., :1, :]
    else:
        raise ValueError(f"unknown kernel class {cls!r}; known: {', '.join(CLASSES)}")
    return out.reshape(w.shape).to(w.dtype)


def residuals(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per class, the relative residual energy of each kernel of a conv weight (O, I, k, k) -> (O, I)."""
    energy = w.double().pow(2).sum((-2, -1)).clamp_min(1e-30)
    return {c: ((w.double() - project(w, c).double()).pow(2).sum((-2, -1)) / energy) for c in CLASSES}


@dataclass
class SnapResult:
    classes: dict[str, np.ndarray] = field(default_factory=dict)  # conv name -> (O, I) class names
    counts: dict[str, int] = field(default_factory=dict)  # class -> kernels snapped to it ("free": not)
    kernels: int = 0
    skipped: list[str] = field(default_factory=list)  # constrained convs: computed kernels, left as they are
    free_before: int = 0
    free_after: int = 0

    @property
    def snapped_fraction(self) -> float:
        return 1 - self.counts.get("free", 0) / max(1, self.kernels)


@torch.no_grad()
def snap(model: nn.Module, threshold: float, earlier: SnapResult | None = None) -> SnapResult:
    """Snap, in place, every kernel within `threshold` of a class to the simplest such class.
    Kernels an `earlier` round snapped keep their class and values; only free ones are considered."""
    res = SnapResult()
    plain = [(n, c) for n, c in conv_kernels(model) if not parametrize.is_parametrized(c, "weight")]
    res.skipped = [n for n, c in conv_kernels(model) if parametrize.is_parametrized(c, "weight")]
    if not plain:
        raise ValueError(f"every conv of {type(model).__name__} is already constrained ({', '.join(res.skipped)}): "
                         "its kernels are computed from coefficients, so there is nothing to snap; snap the "
                         "plain model instead")
    for name, conv in plain:
        w = conv.weight
        k = w.shape[-1]
        r = residuals(w)
        o, i = w.shape[:2]
        chosen = np.full((o, i), "free", dtype=object)
        best_cost = torch.full((o, i), float(k * k))
        best_res = torch.full((o, i), float("inf"))
        held = torch.zeros(o, i, dtype=torch.bool)
        if earlier is not None and name in earlier.classes:
            chosen = earlier.classes[name].copy()
            held = torch.from_numpy(chosen != "free")
            for cls in CLASSES:
                best_cost[torch.from_numpy(chosen == cls)] = class_free_values(k, cls)
        for cls in sorted(CLASSES, key=lambda c: class_free_values(k, c)):
            cost = class_free_values(k, cls)
            ok = (r[cls] <= threshold) & ((cost < best_cost) | ((cost == best_cost) & (r[cls] < best_res))) & ~held
            chosen[ok.numpy()] = cls
            best_cost[ok], best_res[ok] = cost, r[cls][ok].float()
        new = w.clone()
        for cls in CLASSES:
            mask = torch.from_numpy(chosen == cls) & ~held  # held kernels are already clean
            if mask.any():
                new[mask] = project(w[mask], cls)
        w.copy_(new)
        res.classes[name] = chosen
        for cls, n in zip(*np.unique(chosen, return_counts=True)):
            res.counts[str(cls)] = res.counts.get(str(cls), 0) + int(n)
        res.kernels += o * i
        res.free_before += o * i * k * k
        res.free_after += int(best_cost.sum())
    return res


class FreezeKernels(Hook):
    """Holds snapped kernels at their values while the rest of the net fine-tunes. In any loop:
    `zero_grads(model)` between backward and the optimizer's step, `restore(model)` after it (weight
    decay or momentum would move a kernel even with no gradient); `frugal.train` calls both."""

    def __init__(self, model: nn.Module, result: SnapResult):
        self.frozen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        convs = dict(conv_kernels(model))
        for name, classes in result.classes.items():
            mask = torch.from_numpy(classes != "free")
            w = convs[name].weight
            self.frozen[name] = (mask.to(w.device), w.detach().clone())

    def zero_grads(self, model: nn.Module) -> None:
        for name, conv in conv_kernels(model):
            if name in self.frozen and conv.weight.grad is not None:
                conv.weight.grad[self.frozen[name][0]] = 0.0

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        for name, conv in conv_kernels(model):
            if name in self.frozen:
                mask, values = self.frozen[name]
                conv.weight[mask] = values[mask]

    def after_backward(self, state: TrainState) -> None:
        self.zero_grads(state.model)

    def after_step(self, state: TrainState) -> None:
        self.restore(state.model)

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.frozen = d["frozen"]


def snapped_kernel_bytes(model: nn.Module, result: SnapResult | None = None) -> int:
    """Bytes of the conv kernels as each kernel's class (range-coded ids) plus only its free values
    (range-coded shared values, the code of `kernel_bytes`): what a snapped net needs to store."""
    from frugal.coding.codecs import KMeans
    from frugal.coding.entropy import encode_symbols

    total = 0
    for name, conv in conv_kernels(model):
        w = conv.weight.detach()
        k = w.shape[-1]
        classes = result.classes[name] if result else np.full(w.shape[:2], "free", dtype=object)
        ids = np.vectorize(lambda c: (*CLASSES, "free").index(c))(classes).astype(np.int64)
        free = []
        for cls in (*CLASSES, "free"):
            mask = torch.from_numpy(classes == cls)
            if not mask.any():
                continue
            flat = w[mask].reshape(-1, k * k).double()
            if cls == "free":
                free.append(flat.reshape(-1))
            elif cls == "rank1":
                U, S, Vh = torch.linalg.svd(flat.reshape(-1, k, k))
                s = S[:, :1].sqrt()
                free.append(torch.cat([(U[:, :, 0] * s), (Vh[:, 0, :] * s)], 1).reshape(-1))
            else:
                b = symmetry_basis(k, cls) if cls in SYMMETRIES else dct_basis(k, class_free_values(k, cls))
                free.append((flat @ b).reshape(-1))
        total += len(encode_symbols(ids.reshape(-1))) + len(KMeans(256).encode(torch.cat(free).float()))
    return total
