"""Pictures of what the attention models looked at: every prediction with its explanation.

For the saccadic CNN, each block is tinted by the level it got (none = skipped, blue = 3x3,
orange = 5x5); for the glimpse model, each glimpse's squares (one per scale) and the path between
them, numbered in order; for the trajectory model, the blocks of each glimpse in order with the
confidence after it. Titles give the true label and the prediction.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from frugal.utils import save_figure

LEVEL_COLOURS = [None, "tab:blue", "tab:orange", "tab:green", "tab:purple"]  # skip draws nothing
# a trajectory's glimpses in order: bright on a dark canvas, and told apart by their numbers too
GLIMPSE_COLOURS = ["tab:orange", "cyan", "lime", "magenta", "yellow", "tab:red", "white", "tab:pink"]


def eval_predictions(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`net`'s predicted classes for x in eval mode; the net is left in the mode it was in."""
    was_training = net.training
    net.eval()
    try:
        return net(x).argmax(1)
    finally:
        net.train(was_training)


def _grid(n: int, cols: int = 8):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(cols, n)
    rows = math.ceil(n / cols)
    # constrained layout keeps each title clear of the image above it (tight_layout did not, with a suptitle)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8 + 0.3), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat, plt


def _show(ax, img: torch.Tensor, label: int, pred: int) -> None:
    im = img.permute(1, 2, 0).numpy()  # (H, W, C)
    ax.imshow(im[..., 0] if im.shape[2] == 1 else im, cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"{label} -> {pred}", fontsize=8, color="black" if label == pred else "red")


def _save(fig, path: str | Path, title: str) -> Path:
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def draw_block_attention(images: torch.Tensor, levels: torch.Tensor, block_size: int, labels: torch.Tensor,
                         preds: torch.Tensor, path: str | Path, kernel_sizes=(3, 5)) -> Path:
    """images: (N, C, H, W) uint8; levels: (N, gh, gw). Writes a PNG grid and returns its path."""
    from matplotlib.patches import Rectangle

    fig, axes, plt = _grid(len(images))
    for ax, img, lv, y, p in zip(axes, images, levels, labels.tolist(), preds.tolist()):
        _show(ax, img, y, p)
        for (r, c), level in zip(torch.cartesian_prod(torch.arange(lv.shape[0]), torch.arange(lv.shape[1])).tolist(),
                                 lv.flatten().tolist()):
            if level:
                ax.add_patch(Rectangle((c * block_size - 0.5, r * block_size - 0.5), block_size, block_size,
                                       facecolor=LEVEL_COLOURS[level], alpha=0.35, edgecolor=LEVEL_COLOURS[level]))
        ax.set_xlim(-0.5, img.shape[2] - 0.5)  # blocks of the padding beyond the image are cut off
        ax.set_ylim(img.shape[1] - 0.5, -0.5)
    legend = ", ".join(f"{LEVEL_COLOURS[i + 1].removeprefix('tab:')} = {k}x{k}" for i, k in enumerate(kernel_sizes))
    frac = (levels > 0).float().mean().item()
    return _save(fig, path, f"attended blocks ({legend}; untinted = skipped); {100 * frac:.0f}% attended")


def draw_glimpses(images: torch.Tensor, boxes: list[list[list[tuple[int, int, int]]]], labels: torch.Tensor,
                  preds: torch.Tensor, path: str | Path) -> Path:
    """images: (N, C, H, W) uint8; boxes[i][t] = the squares (x0, y0, side) of glimpse t of image i."""
    from matplotlib.patches import Rectangle

    fig, axes, plt = _grid(len(images))
    for ax, img, path_boxes, y, p in zip(axes, images, boxes, labels.tolist(), preds.tolist()):
        _show(ax, img, y, p)
        centres = []
        for t, squares in enumerate(path_boxes):
            for k, (x0, y0, side) in enumerate(squares):
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), side, side, fill=False, lw=0.8,
                                       edgecolor="tab:orange" if k == 0 else "tab:cyan", alpha=1.0 if k == 0 else 0.4))
            x0, y0, side = squares[0]
            centres.append((x0 + side / 2, y0 + side / 2))
            ax.text(x0 + side / 2, y0 + side / 2, str(t + 1), color="yellow", fontsize=6, ha="center", va="center")
        xs, ys = zip(*centres)
        ax.plot(xs, ys, color="yellow", lw=0.7)
        ax.set_xlim(-0.5, img.shape[2] - 0.5)
        ax.set_ylim(img.shape[1] - 0.5, -0.5)
    return _save(fig, path, "glimpse paths (orange: finest patch; cyan: coarser ones; numbers: order)")


def draw_trajectories(images: torch.Tensor, order: torch.Tensor, confidence: torch.Tensor, block_size: int,
                      labels: torch.Tensor, preds: torch.Tensor, path: str | Path) -> Path:
    """images: (N, C, H, W) uint8; order (N, gh, gw): the glimpse (from 1) that computed each block, 0
    where none did; confidence (N, T): the top class probability after each glimpse. Each glimpse's
    blocks are tinted in its colour and labelled, at the first of them, with its number and confidence."""
    from matplotlib.patches import Rectangle

    fig, axes, plt = _grid(len(images))
    for ax, img, when, conf, y, p in zip(axes, images, order.tolist(), confidence.tolist(), labels.tolist(),
                                         preds.tolist()):
        _show(ax, img, y, p)
        first: dict[int, tuple[int, int]] = {}  # each glimpse's first block, in reading order
        for r, row in enumerate(when):
            for c, t in enumerate(row):
                if not t:
                    continue
                colour = GLIMPSE_COLOURS[(t - 1) % len(GLIMPSE_COLOURS)]
                ax.add_patch(Rectangle((c * block_size - 0.5, r * block_size - 0.5), block_size, block_size,
                                       facecolor=colour, alpha=0.25, edgecolor=colour, lw=0.8))
                first.setdefault(t, (r, c))
        for t, (r, c) in first.items():
            colour = GLIMPSE_COLOURS[(t - 1) % len(GLIMPSE_COLOURS)]
            ax.text(c * block_size + 1, r * block_size + 1, f"{t}:{conf[t - 1]:.2f}", color=colour, fontsize=5,
                    ha="left", va="top")
        ax.set_title(f"{y} -> {p} ({len(first)} glimpse{'s' if len(first) != 1 else ''})", fontsize=7,
                     color="black" if y == p else "red")
        ax.set_xlim(-0.5, img.shape[2] - 0.5)
        ax.set_ylim(img.shape[1] - 0.5, -0.5)
    return _save(fig, path, "blocks by the glimpse that computed them (t: top class probability after glimpse t)")
