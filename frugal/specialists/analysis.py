"""Where a tree gains on its base: the test inputs by the depth-1 cluster they were routed to, and
per cluster the confusion matrices of base and tree.

`routed_predictions` runs base and tree over a split once; `cluster_confusions` counts, per
cluster, (true class, predicted class) pairs for both; `draw_cluster_confusions` draws each
cluster's main classes side by side (base | tree) with the mistakes the tree removed or added
most written under them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from frugal.data import Split, class_names
from frugal.train import normalize


@dataclass
class RoutedPredictions:
    y: np.ndarray  # true labels
    base: np.ndarray  # the base's predictions
    tree: np.ndarray  # the tree's predictions
    route: np.ndarray  # the depth-1 cluster of each input (-1: it stayed with the base)


@torch.no_grad()
def routed_predictions(tree: nn.Module, base: nn.Module, split: Split, mean: float, std: float, device,
                       batch: int = 512) -> RoutedPredictions:
    tree.eval()
    base.eval()
    pt, pb, routes = [], [], []
    for i in range(0, len(split), batch):
        x = normalize(split.x[i:i + batch].to(device), mean, std)
        pt.append(tree(x).argmax(1).cpu())
        routes.append(tree.routes[:, 0].cpu())  # set by the forward pass just made
        pb.append(base(x).argmax(1).cpu())
    return RoutedPredictions(split.y.numpy(), torch.cat(pb).numpy(), torch.cat(pt).numpy(), torch.cat(routes).numpy())


def _confusion(y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def cluster_confusions(pred: RoutedPredictions, num_classes: int) -> dict[int, dict[str, np.ndarray]]:
    """Per depth-1 cluster (-1: inputs that stayed with the base): confusion matrices, rows = true
    class, columns = predicted class, of the base and the tree on the inputs routed there."""
    out = {}
    for c in np.unique(pred.route):
        sel = pred.route == c
        out[int(c)] = {"base": _confusion(pred.y[sel], pred.base[sel], num_classes),
                       "tree": _confusion(pred.y[sel], pred.tree[sel], num_classes)}
    return out


def main_classes(conf: np.ndarray, share: float = 0.05) -> list[int]:
    """The true classes that make up at least `share` of a cluster's inputs, commonest first."""
    per_class = conf.sum(1)
    order = np.argsort(-per_class, kind="stable")
    return [int(i) for i in order if per_class[i] >= share * max(1, per_class.sum())]


def biggest_changes(base: np.ndarray, tree: np.ndarray, n: int = 3) -> list[tuple[int, int, int, int]]:
    """The off-diagonal (true, predicted) pairs whose count changed most: (true, pred, base, tree)."""
    diff = (tree - base).astype(np.int64)
    np.fill_diagonal(diff, 0)
    flat = np.argsort(-np.abs(diff), axis=None, kind="stable")[:n]
    k = base.shape[0]
    return [(int(i // k), int(i % k), int(base.flat[i]), int(tree.flat[i])) for i in flat if diff.flat[i] != 0]


def draw_cluster_confusions(confs: dict[int, dict[str, np.ndarray]], task: str, num_classes: int, path: Path) -> None:
    """One row per cluster: base and tree confusion on the cluster's main classes (predictions of
    other classes pooled as "other"), counts written in the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from frugal.utils import save_figure

    names = class_names(task, num_classes)
    clusters = sorted(confs)
    fig, axes = plt.subplots(len(clusters), 2, figsize=(8, 3.2 * len(clusters)), squeeze=False)
    for row, c in enumerate(clusters):
        cls = main_classes(confs[c]["base"])
        for col, which in enumerate(("base", "tree")):
            m = confs[c][which]
            shown = np.concatenate([m[np.ix_(cls, cls)], (m[cls].sum(1) - m[np.ix_(cls, cls)].sum(1))[:, None]], 1)
            ax = axes[row, col]
            ax.imshow(np.log1p(shown), cmap="Blues")
            for (i, j), v in np.ndenumerate(shown):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(cls) + 1), [names[i] for i in cls] + ["other"], rotation=45, fontsize=7)
            ax.set_yticks(range(len(cls)), [names[i] for i in cls], fontsize=7)
            acc = np.trace(m) / max(1, m.sum())
            label = "stayed with base" if c < 0 else f"cluster {c}"
            ax.set_title(f"{label}: {which}, {m.sum()} inputs, acc {100 * acc:.2f}%", fontsize=8)
        changes = biggest_changes(confs[c]["base"], confs[c]["tree"])
        note = "; ".join(f"{names[t]}->{names[p]} {b}->{a}" for t, p, b, a in changes) or "no change"
        axes[row, 0].set_xlabel("predicted (rows: true)   biggest changes: " + note, fontsize=7, loc="left")
    fig.suptitle(f"{task}: depth-1 tree, confusion by cluster (base | tree)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title above the top row
    save_figure(fig, path, dpi=100)
