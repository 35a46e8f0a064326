"""Kernel grids: each kernel drawn as a small image, titled with its class, so a person can see the
clean forms that snapping or constraints leave."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch.nn as nn

from frugal.kernels.penalty import conv_kernels
from frugal.kernels.snapping import SnapResult
from frugal.utils import save_figure

COLOURS = {"free": "#888888", "lr": "#1f77b4", "ud": "#17becf", "lrud": "#2ca02c", "c4": "#9467bd",
           "d4": "#d62728", "radial": "#ff7f0e", "rank1": "#8c564b", "blur": "#e377c2"}


def draw_kernels(model: nn.Module, path: str | Path, result: SnapResult | None = None, layer: int = 0,
                 max_kernels: int = 64, title: str = "") -> Path:
    """The first `max_kernels` kernels of the `layer`-th conv (input channel 0 of each output
    unit, then further input channels), each titled with its class; PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    convs = conv_kernels(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no conv kernels to draw")
    if not 0 <= layer < len(convs):
        raise ValueError(f"layer {layer} out of range: the model has {len(convs)} conv layers with kernels")
    name, conv = convs[layer]
    w = conv.weight.detach().cpu().numpy()  # (O, I, k, k)
    o, i = w.shape[:2]
    picks = [(a, b) for b in range(i) for a in range(o)][:max_kernels]
    classes = result.classes.get(name) if result else None
    cols = min(16, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.95), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (a, b) in zip(axes.flat, picks):
        kern = w[a, b]
        lim = float(np.abs(kern).max()) or 1.0
        ax.imshow(kern, cmap="RdBu_r", vmin=-lim, vmax=lim)
        cls = str(classes[a, b]) if classes is not None else "free"
        ax.set_title(cls, fontsize=6, color=COLOURS.get(cls, "black"))
    fig.suptitle(title or f"{name}: {len(picks)} of {o * i} kernels", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
