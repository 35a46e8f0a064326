"""What a specialist is made of: taps into a frozen parent net, and the specialist net that reads them.

A specialist has its own conv stages; stage j > 0 reads its own previous output concatenated with
the parent's twin activation (the parent's output of stage j - 1, resized to the specialist's map),
and its classifier reads its own pooled features concatenated with the parent's penultimate
features. The parent is frozen and runs first; the specialist only adds features, so it can be
small and learn what tells apart the inputs of its cluster.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.models import conv_bn


def default_taps(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are a net's stage activations."""
    names = dict(model.named_modules())
    if "features" in names and isinstance(names["features"], nn.Sequential):  # ConvNet: after each pool
        return [f"features.{i}" for i, m in enumerate(names["features"]) if isinstance(m, nn.MaxPool2d)]
    if "stem" in names and "layers" in names:  # ResNet: the stem and each block
        return ["stem"] + [f"layers.{i}" for i in range(len(names["layers"]))]
    if "conv1" in names and "conv2" in names:  # LeNet-5
        return ["conv1", "conv2"]
    if "stages" in names:  # a Specialist: its own stages
        return [f"stages.{i}" for i in range(len(names["stages"]))]
    # any other net (a user's): its top-level children that hold a convolution, in order
    stages = [n for n, m in model.named_children() if any(isinstance(c, nn.Conv2d) for c in m.modules())]
    if not stages:
        raise ValueError(f"no stages found in {type(model).__name__}: none of its top-level modules holds a "
                         "Conv2d; give Tapped(net, taps=[module names]) the modules whose outputs are its stages")
    return stages


class Tapped(nn.Module):
    """Runs a frozen net and returns (logits, [tap activations], penultimate features)."""

    def __init__(self, net: nn.Module, taps: Sequence[str] | None = None):
        super().__init__()
        self.net = net
        self.taps = list(taps or default_taps(net))
        modules = dict(net.named_modules())
        missing = [t for t in self.taps if t not in modules]
        if missing:
            raise ValueError(f"taps {missing} are not modules of {type(net).__name__}")
        self.head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]  # the classifier
        self._acts: dict[str, torch.Tensor] = {}
        for t in self.taps:
            modules[t].register_forward_hook(lambda mod, inp, out, t=t: self._acts.__setitem__(t, out))
        self.head.register_forward_pre_hook(lambda mod, inp: self._acts.__setitem__("_penultimate", inp[0]))

    def forward(self, x: torch.Tensor, **kw) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """`kw` go to the net (a specialist takes its own parent's outputs as `parent_out`)."""
        self._acts.clear()
        logits = self.net(x, **kw)
        acts = [self._acts[t] for t in self.taps]
        return logits, acts, self._acts["_penultimate"]


def _fit(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A parent activation resized to the specialist's map."""
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    if a.shape[-2] >= size[0]:
        return F.adaptive_avg_pool2d(a, size)
    return F.interpolate(a, size=size, mode="nearest")


def twin_taps(tap_sizes: Sequence[int], stages: int, image_size: int) -> list[int]:
    """Which parent tap each specialist stage j > 0 reads: the deepest one whose map is at least
    as large as that stage's input (image_size // 2**j; each stage halves the map). A parent with
    one tap per stage (LeNet-5, the ConvNet, a specialist) gives taps 0, 1, ...; the ResNet (stem
    and three blocks at 28, 28, 14, 7) gives its 14x14 block to the second stage."""
    reads = []
    for j in range(1, stages):
        size = image_size // 2 ** j
        fits = [i for i, s in enumerate(tap_sizes) if s >= size]
        reads.append(max(fits[-1] if fits else 0, reads[-1] if reads else 0))
    return reads


class Specialist(nn.Module):
    """Conv stages of `widths` (conv-BN-ReLU, 2x2 max-pool), stage j > 0 also reading the parent's
    tap `reads[j - 1]` (by default tap j - 1); a classifier on [own pooled features, parent's
    penultimate features].

    `parent` is a `Tapped` frozen net; it is kept outside this module's parameters and state."""

    def __init__(self, parent: Tapped, in_channels: int, num_classes: int, widths: Sequence[int],
                 tap_channels: Sequence[int], penultimate: int, residual: bool = True,
                 reads: Sequence[int] | None = None):
        super().__init__()
        # residual: the output is the parent's logits plus a correction, and the correction starts at
        # zero, so an untrained specialist is exactly its parent and training can only refine it
        self.residual = residual
        if reads is None:
            if len(widths) != len(tap_channels):
                raise ValueError(f"one stage per parent tap: {len(tap_channels)} taps, {len(widths)} widths; "
                                 "or say which tap each stage reads (reads=, see twin_taps)")
            reads = range(len(widths) - 1)
        self.reads = [int(i) for i in reads]
        if len(self.reads) != len(widths) - 1 or not all(0 <= i < len(tap_channels) for i in self.reads):
            raise ValueError(f"reads must name one of the parent's {len(tap_channels)} taps for each of the "
                             f"{len(widths) - 1} stages after the first, got {list(reads)}")
        object.__setattr__(self, "parent", parent)  # frozen, shared, not saved with the node
        cins = [in_channels] + [w + tap_channels[i] for w, i in zip(widths[:-1], self.reads)]
        self.stages = nn.ModuleList(nn.Sequential(conv_bn(cin, w), nn.MaxPool2d(2)) for cin, w in zip(cins, widths))
        self.head = nn.Linear(widths[-1] + penultimate, num_classes)
        if residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, parent_out: tuple | None = None) -> torch.Tensor:
        """`parent_out`: the parent's (logits, taps, penultimate) on x when the caller has them (a
        tree that routed x has run the parent already); otherwise the parent runs here."""
        if parent_out is None:
            with torch.no_grad():
                self.parent.eval()
                parent_out = self.parent(x)
        parent_logits, acts, pen = parent_out
        h = x
        for j, stage in enumerate(self.stages):
            if j:
                h = torch.cat([h, _fit(acts[self.reads[j - 1]], h.shape[-2:])], dim=1)  # (B, own + tap, h, w)
            h = stage(h)
        own = self.head(torch.cat([h.mean(dim=(2, 3)), pen], dim=1))  # (B, classes)
        return parent_logits + own if self.residual else own


@torch.no_grad()
def probe(parent: Tapped, example: torch.Tensor) -> tuple[list[int], int, list[int]]:
    """Channels of each tap, of the penultimate features, and each tap's map height, from one
    forward pass."""
    parent.eval()
    _, acts, pen = parent(example)
    return [a.shape[1] for a in acts], pen.shape[1], [a.shape[-2] for a in acts]
