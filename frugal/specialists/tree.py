"""The feature-cluster tree: a trained base net decides the conditional structure of new nets.

Building (`build_tree`): embed the training set with the parent's penultimate features, cluster
them (k-means, seeded), and train one specialist per cluster on that cluster's examples only, its
layers reading the frozen parent's twin activations; recurse to `depth` with narrower specialists
(fewer new features deeper down, as data per node shrinks). Node trainings are independent jobs
(`frugal.specialists.runner`).

Inference (`Tree.forward`): the base runs on every input; each input goes to its nearest centroid
(hard routing) and only that cluster's specialist runs on it, with the parent's activations
handed over rather than computed again; an input farther from its centroid than `fallback` times
the cluster's mean training distance stays with the parent. Soft routing instead runs every
specialist and mixes their logits by a softmax over negative squared distances. The prediction
is the leaf's: a specialist outputs its parent's logits plus a learnt correction that starts at
zero (`combine="residual"`), or its own logits alone (`"specialist"`).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from frugal.data import Split, TaskData
from frugal.specialists.nets import Specialist, Tapped, probe, twin_taps
from frugal.train import AUGMENTS, normalize
from frugal.utils import atomic_write_json

ROUTINGS = ("hard", "soft")
COMBINES = ("residual", "specialist")
TREE_FILE = "tree.json"


@dataclass(frozen=True)
class TreeConfig:
    k: int = 4  # clusters per node
    depth: int = 1  # levels of specialists below the base
    widths: tuple[int, ...] = (16, 32)  # specialist stage widths at depth 1 (one per parent tap)
    shrink: float = 0.5  # width factor per level deeper: less data, fewer new features
    epochs: int = 3  # training epochs per node
    lr: float = 1e-3  # Adam, per batch of 128
    augment: str | None = None  # the nodes' training augmentation; None: the base run's own
    min_cluster: int = 200  # a cluster with fewer training examples gets no specialist
    routing: str = "hard"  # hard | soft
    temperature: float = 1.0  # soft routing: softmax(-d^2 / (temperature * mean d^2))
    combine: str = "residual"  # residual: specialists learn a correction to the parent's logits; specialist: alone
    fallback: float = 3.0  # stay with the parent beyond this many x the cluster's mean distance
    seed: int = 0

    def __post_init__(self):
        if self.k < 2 or self.depth < 1:
            raise ValueError(f"a tree needs k >= 2 clusters and depth >= 1, got k={self.k}, depth={self.depth}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if self.augment is not None and self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS} or None (the base run's), got {self.augment!r}")

    def widths_at(self, level: int) -> tuple[int, ...]:
        return tuple(max(4, round(w * self.shrink ** (level - 1))) for w in self.widths)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TreeConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class Node:
    """One node: the net at it (base or specialist), its clusters and its children by cluster."""

    name: str
    net: nn.Module
    tapped: Tapped
    centroids: torch.Tensor | None = None  # (k, D)
    radius: torch.Tensor | None = None  # (k,) mean training distance to each centroid
    children: dict[int, "Node"] = field(default_factory=dict)


def node_seed(seed: int, name: str) -> int:
    """A stable per-node seed: the same node trains the same way in any worker or order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31)


@torch.no_grad()
def embed(tapped: Tapped, split: Split, mean: float, std: float, device, batch: int = 512) -> torch.Tensor:
    """Penultimate features (N, D) of a split under a node's net (a specialist runs its ancestors)."""
    tapped.eval()
    feats = []
    for i in range(0, len(split), batch):
        x = normalize(split.x[i:i + batch].to(device), mean, std)
        feats.append(tapped(x)[2].float().cpu())
    return torch.cat(feats)


def kmeans(features: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(features.double().numpy())
    return torch.from_numpy(km.cluster_centers_).float(), km.labels_


def subset(data: TaskData, train_idx: np.ndarray, val_idx: np.ndarray) -> TaskData:
    """The task restricted to one cluster (train and validation); normalisation stays the task's."""
    t, v = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return TaskData(data.name, Split(data.train.x[t], data.train.y[t]), Split(data.val.x[v], data.val.y[v]),
                    data.test, data.num_classes, data.mean, data.std)


class Tree(nn.Module):
    """A trained tree: the base and its specialists, routing every input down to one leaf."""

    def __init__(self, root: Node, cfg: TreeConfig):
        super().__init__()
        self.cfg = cfg
        self.root = root
        # register every net so .to(), .eval() and parameter counts see them
        self.nets = nn.ModuleDict({n.name.replace(".", "_"): n.net for n in self.nodes()})
        self.routes: torch.Tensor | None = None  # (B, depth) cluster per level of the last batch; -1 = parent

    def nodes(self) -> list[Node]:
        out, todo = [], [self.root]
        while todo:
            n = todo.pop(0)
            out.append(n)
            todo += [n.children[c] for c in sorted(n.children)]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        routes = torch.full((b, self.cfg.depth), -1, dtype=torch.long)
        out = self.root.tapped(x)
        logits = out[0].clone()
        self._descend(self.root, x, torch.arange(b, device=x.device), out, logits, routes, 0)
        self.routes = routes
        return logits

    def _descend(self, node: Node, x, idx, out, logits, routes, level) -> None:
        """Route the inputs `idx` (whose node outputs are `out`) to this node's children; write logits."""
        if node.centroids is None or not node.children or idx.numel() == 0:
            return
        pen = out[2]
        d2 = torch.cdist(pen.float(), node.centroids.to(pen.device)) ** 2  # (n, k)
        if self.cfg.routing == "soft":  # every child runs; one level: their logits mixed by distance
            w = torch.softmax(-d2 / (self.cfg.temperature * d2.mean().clamp_min(1e-12)), dim=1)  # (n, k)
            rest = 1 - sum(w[:, c] for c in node.children)  # (n,) weight of clusters without a specialist
            mix = rest[:, None] * out[0]
            for c, child in node.children.items():
                mix = mix + w[:, c:c + 1] * child.tapped(x, parent_out=out)[0]
            logits[idx] = mix
            routes[idx.cpu(), level] = d2.argmin(1).cpu()
            return
        nearest = d2.argmin(1)  # (n,)
        dist = d2.gather(1, nearest[:, None]).squeeze(1).sqrt()
        for c, child in node.children.items():
            sel = ((nearest == c) & (dist <= self.cfg.fallback * node.radius[c])).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            sub_out = tuple([out[0][sel], [a[sel] for a in out[1]], out[2][sel]])
            child_out = child.tapped(x[sel], parent_out=sub_out)
            logits[idx[sel]] = child_out[0]
            routes[idx[sel].cpu(), level] = c
            self._descend(child, x[sel], idx[sel], child_out, logits, routes, level + 1)


# ---------------------------------------------------------------------------------------------------
# building and saving


def make_specialist(parent: Tapped, shape: "TaskData | Sequence[int]", widths, device,
                    residual: bool = True) -> Specialist:
    """A specialist of `widths` on the frozen `parent` (whose ancestors run inside it when needed).
    `shape`: the task (its image shape and classes), or (channels, height, width, classes)."""
    c, h, w, classes = shape_of(shape)
    taps, pen, sizes = probe(parent, torch.zeros(2, c, h, w, device=device))  # shapes only
    spec = Specialist(parent, c, classes, widths, taps, pen, residual, reads=twin_taps(sizes, len(widths), h)).to(device)
    spec.widths = tuple(widths)
    return spec


def shape_of(shape: "TaskData | Sequence[int]") -> tuple[int, int, int, int]:
    """(channels, height, width, classes) of a task, or of such a 4-tuple, checked."""
    if isinstance(shape, TaskData):
        return (shape.in_channels, *shape.image_size, shape.num_classes)
    dims = tuple(shape)
    if len(dims) != 4 or not all(type(d) is int and 1 <= d <= 1 << 16 for d in dims):
        raise ValueError(f"a tree's input shape is (channels, height, width, classes), whole numbers from 1 to "
                         f"{1 << 16}; got {list(dims)[:8]}")
    return dims  # type: ignore[return-value]


def save_tree(tree: Tree, out: str | Path, base_spec: dict[str, Any] | None, task: str,
              shape: "TaskData | Sequence[int] | None" = None) -> Path:
    """tree.json (config, base spec, the base's taps, the input shape, per node: centroids, radii,
    children) and each net's weights. `base_spec` None: the base is a model object that only the
    caller can rebuild (load_tree(path, base=...))."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    nodes = {}
    for n in tree.nodes():
        save_net(n.net, out / f"{n.name}.safetensors")
        nodes[n.name] = {"centroids": None if n.centroids is None else n.centroids.tolist(),
                         "radius": None if n.radius is None else n.radius.tolist(),
                         "children": {str(c): ch.name for c, ch in n.children.items()},
                         "widths": list(getattr(n.net, "widths", ()))}
    record = {"config": asdict(tree.cfg), "base_spec": base_spec, "task": task, "taps": tree.root.tapped.taps,
              "nodes": nodes}
    if shape is not None:
        record["shape"] = list(shape_of(shape))
    return atomic_write_json(out / TREE_FILE, record)


def save_net(net: nn.Module, path: Path) -> None:
    """A net's state dict as safetensors, written atomically."""
    from safetensors.torch import save

    from frugal.utils import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}))


def load_tree(path: str | Path, device=None, base: nn.Module | None = None) -> Tree:
    """A saved tree, rebuilt and loaded: it predicts exactly as when it was saved. `base`: a net of
    the base's architecture, for a tree whose base has no recorded source (a model object); a copy
    of it gets the saved base weights, the net itself is left as it is."""
    import copy

    from frugal.models import SizeLimits
    from frugal.train import build_model, check_spec, read_weights
    from frugal.utils import read_json

    path = Path(path)
    meta_path = path / TREE_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"no {TREE_FILE} in {path}; build a tree with frugal.specialists.build_tree")
    fix = "the tree folder is damaged; build the tree again"
    meta = read_json(meta_path, fix)
    try:
        cfg = TreeConfig.from_dict(meta["config"])
        task, taps = meta["task"], meta.get("taps")
        if not isinstance(task, str) or not isinstance(meta["nodes"], dict):
            raise TypeError("task must be a name and nodes an object")
        if taps is not None and not (isinstance(taps, list) and all(isinstance(t, str) for t in taps)):
            raise TypeError("taps must be a list of module names")
        if meta.get("base_spec") is not None:
            check_spec(meta["base_spec"])
        shape = shape_of(meta["shape"]) if "shape" in meta else None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path} is not a tree's record ({e}); {fix}") from None
    if meta.get("base_spec") is None and base is None:
        raise ValueError(f"{path} was built on a model object whose source was not recorded; rebuild that net and "
                         "pass it: load_tree(path, base=net)")
    if shape is None:  # a tree saved before shapes were recorded: its task says
        from frugal.data import load_task
        shape = load_task(task)
    device = device or torch.device("cpu")

    def build(name: str, parent: Tapped | None) -> Node:
        info = meta["nodes"][name]
        if parent is None:
            net = copy.deepcopy(base) if base is not None else \
                build_model(meta["base_spec"], device=device, limits=SizeLimits())
        else:
            net = make_specialist(parent, shape, info["widths"], device, cfg.combine == "residual")
        net.load_state_dict(read_weights(path / f"{name}.safetensors"))
        net.to(device)
        node = Node(name, net.eval(), Tapped(net, taps) if parent is None else Tapped(net))
        if info["centroids"] is not None:
            node.centroids, node.radius = torch.tensor(info["centroids"]), torch.tensor(info["radius"])
        for c, child in info["children"].items():
            node.children[int(c)] = build(child, node.tapped)
        return node

    try:
        return Tree(build("root", None), cfg).eval()
    except (KeyError, TypeError, ValueError, RuntimeError, RecursionError) as e:  # whatever the record gets wrong
        raise ValueError(f"{path} does not rebuild as a tree ({type(e).__name__}: {str(e)[:200]}); {fix}") from None
