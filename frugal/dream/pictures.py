"""Image grids of dreams: originals on one row, their dreams beneath."""

from __future__ import annotations

from pathlib import Path

import torch

from frugal.data import Split
from frugal.utils import save_figure


def draw_dreams(originals: Split, dreams: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """originals: uint8 images with labels; dreams: uint8 (n, C, H, W). Writes a PNG atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(originals), dreams.shape[0])
    if n == 0:
        raise ValueError("no images to draw")
    cols = min(n, 16)
    groups = (n + cols - 1) // cols
    fig, axes = plt.subplots(2 * groups, cols, figsize=(cols * 0.9, groups * 2 * 1.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        g, c = divmod(i, cols)
        for row, img in ((2 * g, originals.x[i]), (2 * g + 1, dreams[i])):
            a = img.permute(1, 2, 0).numpy()
            axes[row, c].imshow(a[..., 0] if a.shape[2] == 1 else a, cmap="gray", vmin=0, vmax=255)
        axes[2 * g, c].set_title(str(int(originals.y[i])), fontsize=7)
    fig.suptitle(title or "images (top) and dreams (below)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def draw_cue_conflict(images: Split, texture_labels: torch.Tensor, path: str | Path, title: str = "",
                      n: int = 16) -> Path:
    """Cue-conflict images (`frugal.dream.evaluate.cue_conflict`), each captioned with the class
    its shape says and the class its texture says. Writes a PNG atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(images))
    if n == 0:
        raise ValueError("no images to draw")
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.0, rows * 1.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        a = images.x[i].permute(1, 2, 0).numpy()
        ax = axes.flat[i]
        ax.imshow(a[..., 0] if a.shape[2] == 1 else a, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"shape {int(images.y[i])}\ntexture {int(texture_labels[i])}", fontsize=6)
    fig.suptitle(title or "cue conflict: one class's shape, another's texture", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
