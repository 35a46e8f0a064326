"""Building a tree: cluster, then train the nodes of each level as independent jobs."""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from frugal.data import TaskData

from frugal.specialists.nets import Tapped
from frugal.specialists.runner import run_jobs
from frugal.specialists.tree import TREE_FILE, Node, Tree, TreeConfig, embed, kmeans, load_tree, make_specialist, \
    node_seed, save_net, save_tree, subset
from frugal.utils import atomic_write_bytes, atomic_write_json, read_json

BUILD_FILE = "build.json"  # the record of a finished build: what it was built from, with, and in how long


def _load_node(out: Path, name: str, parent: Tapped | None, shape, base, taps, widths, residual=True) -> Node:
    """A node of a tree folder being built, rebuilt with its saved weights. `base`: the base's spec,
    or the base net itself (a copy is loaded, the net is left as it is)."""
    from frugal.train import build_model, read_weights

    if parent is None:
        net = copy.deepcopy(base) if isinstance(base, nn.Module) else build_model(base, device="cpu")
    else:
        net = make_specialist(parent, shape, widths, "cpu", residual)
    net.load_state_dict(read_weights(out / f"{name}.safetensors"))
    return Node(name, net.eval(), Tapped(net, taps) if parent is None else Tapped(net))


def train_node(job: dict[str, Any]) -> dict[str, Any]:
    """Train one specialist (in any worker): rebuild its ancestors from the tree folder, train it
    on its cluster's examples (the job carries them), save its weights. Returns its name, sizes and time."""
    from frugal.train import CHECKPOINT, TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every backend and worker
    try:
        t0 = time.perf_counter()
        out, part = Path(job["tree_dir"]), job["data"]
        node = _load_node(out, "root", None, part, job["base"], job["taps"], None)
        for name, widths in job["ancestors"]:
            node = _load_node(out, name, node.tapped, part, None, None, widths, job["residual"])
        torch.manual_seed(job["seed"])  # the specialist's initial weights
        spec = make_specialist(node.tapped, part, job["widths"], "cpu", job["residual"])
        cfg = TrainConfig(task=part.name, model=f"specialist:{job['name']}", epochs=job["epochs"], lr=job["lr"],
                          optimizer="adam", seed=job["seed"], device="cpu", threads=1, augment=job["augment"])
        run = out / "runs" / job["name"]
        resumed = (run / CHECKPOINT).exists()  # a build that was stopped picks up where the node was
        res = train(cfg, run, resume=resumed, model=spec, data=part, quiet=True, progress=False)
        save_net(spec, out / f"{job['name']}.safetensors")
        return {"name": job["name"], "val_acc": res.val_acc, "train_examples": len(part.train),
                "seconds": time.perf_counter() - t0, "resumed": resumed}
    finally:
        torch.set_num_threads(threads)


def same_nodes(a: str | Path, b: str | Path) -> bool:
    """Whether two tree folders hold the same specialists (every node's weights equal, bit for bit;
    the base is not compared). False when either has none."""
    from safetensors.torch import load_file

    names = sorted(f.name for f in Path(a).glob("root.*.safetensors"))
    if not names or names != sorted(f.name for f in Path(b).glob("root.*.safetensors")):
        return False
    for n in names:
        x, y = load_file(str(Path(a) / n)), load_file(str(Path(b) / n))
        if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def build_tree(base: str | Path | nn.Module, data: TaskData | str | None, out: str | Path,
               config: TreeConfig = TreeConfig(), taps: Sequence[str] | None = None, *, backend: str = "process",
               workers: int = 2, data_dir: str | None = None, log=print) -> tuple[Tree, dict[str, Any]]:
    """Cluster and train a tree on top of a trained base. Returns the tree and a record of the build
    (per node: cluster sizes, validation accuracy, seconds; wall-clock per level).

    `base`: a finished run folder, or a trained net (any nn.Module whose last nn.Linear is its
    classifier). `data`: the task (a TaskData, or a task name); None: the run folder's own task.
    `taps`: the base's modules whose outputs are its stages (default: found by `default_taps`).
    A net whose source is not recorded (see frugal.models) loads back with load_tree(out, base=net).

    A folder that holds a finished build of the same base and config is loaded, not built again,
    and its record (with the original times) returned; a build that was stopped resumes each
    node's training from its checkpoint (its levels are then marked `resumed`, their times partial)."""
    from safetensors.torch import save

    from frugal.data import load_task
    from frugal.train import WEIGHTS, load_run

    out = Path(out)
    if isinstance(base, nn.Module):
        net, base_spec = base, getattr(base, "frugal_spec", None)
        if data is None:
            raise ValueError("build_tree on a net needs its data: a TaskData or a task name")
        weights = save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
        augment = "none"
    else:
        net, base_cfg, _ = load_run(base, device=torch.device("cpu"))
        base_spec = read_json(Path(base) / "config.json", "the base run folder is damaged")["model_spec"]  # checked
        if data is None:
            data = load_task(base_cfg.task, data_dir=data_dir, val_size=base_cfg.val_size)
        weights = (Path(base) / WEIGHTS).read_bytes()
        augment = base_cfg.augment
    if isinstance(data, str):
        data = load_task(data, data_dir=data_dir)
    base_digest = hashlib.sha256(weights).hexdigest()
    finished = _finished_build(out, config, base_digest)
    if finished is not None:
        return load_tree(out, base=None if base_spec is not None else net), finished
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "root.safetensors", weights if isinstance(base, nn.Module) else save(
        {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}))
    job_base: dict[str, Any] | nn.Module = copy.deepcopy(net).cpu()  # the workers rebuild the base from this
    if base_spec is not None:
        try:  # its recorded source, when that rebuilds it
            _load_node(out, "root", None, data, base_spec, taps, None)
            job_base = base_spec
        except Exception:  # noqa: BLE001  a net changed after it was built (say, its convs constrained)
            base_spec = None
    root = _load_node(out, "root", None, data, job_base, taps, None)
    taps = root.tapped.taps
    record: dict[str, Any] = {"levels": [], "nodes": {}}
    # (node, its ancestors as (name, widths), its training and validation indices)
    frontier = [(root, [], np.arange(len(data.train)), np.arange(len(data.val)))]
    for level in range(1, config.depth + 1):
        widths = list(config.widths_at(level))
        jobs, placed = [], []
        for node, ancestors, tr_idx, va_idx in frontier:
            part = subset(data, tr_idx, va_idx)
            f_tr = embed(node.tapped, part.train, data.mean, data.std, "cpu")
            f_va = embed(node.tapped, part.val, data.mean, data.std, "cpu")
            centroids, labels = kmeans(f_tr, config.k, node_seed(config.seed, node.name))
            d_tr = torch.cdist(f_tr, centroids)  # (N, k)
            node.centroids = centroids
            node.radius = torch.stack([d_tr[torch.from_numpy(labels == c), c].mean() if (labels == c).any()
                                       else torch.tensor(0.0) for c in range(config.k)])
            va_labels = torch.cdist(f_va, centroids).argmin(1).numpy()
            record["nodes"].setdefault(node.name, {})["cluster_sizes"] = np.bincount(labels, minlength=config.k).tolist()
            for c in range(config.k):
                idx_tr, idx_va = tr_idx[labels == c], va_idx[va_labels == c]
                if len(idx_tr) < config.min_cluster or len(idx_va) == 0:
                    continue  # too few examples to learn from: these inputs stay with the parent
                name = f"{node.name}.{c}"
                jobs.append({"name": name, "tree_dir": str(out), "base": job_base, "taps": taps,
                             "data": cluster_data(data, idx_tr, idx_va), "ancestors": ancestors, "widths": widths,
                             "epochs": config.epochs, "lr": config.lr, "seed": node_seed(config.seed, name),
                             "augment": config.augment or augment, "residual": config.combine == "residual"})
                placed.append((node, ancestors, c, idx_tr, idx_va))
        t0 = time.perf_counter()
        results = run_jobs(train_node, jobs, backend=backend, workers=workers,
                           costs=[len(j["data"].train) for j in jobs])
        record["levels"].append({"level": level, "jobs": len(jobs), "seconds": time.perf_counter() - t0,
                                 "backend": backend, "workers": workers,
                                 "resumed": any(r.get("resumed", False) for r in results)})
        frontier = []
        for (node, ancestors, c, idx_tr, idx_va), res in zip(placed, results):
            record["nodes"].setdefault(res["name"], {}).update(res)
            child = _load_node(out, res["name"], node.tapped, data, None, None, widths, config.combine == "residual")
            node.children[c] = child
            frontier.append((child, ancestors + [(res["name"], widths)], idx_tr, idx_va))
        log(f"level {level}: {len(jobs)} specialists in {record['levels'][-1]['seconds']:.1f}s ({backend})")
    tree = Tree(root, config).eval()
    save_tree(tree, out, base_spec, data.name, data)
    record.update(config=asdict(config), base_sha256=base_digest)
    atomic_write_json(out / BUILD_FILE, record)  # last: its presence says the build finished
    return tree, record


def cluster_data(data: TaskData, train_idx: np.ndarray, val_idx: np.ndarray) -> TaskData:
    """What a node's job carries: its cluster's training and validation examples (the validation
    examples stand in for the test split, which a node never sees)."""
    part = subset(data, train_idx, val_idx)
    return TaskData(part.name, part.train, part.val, part.val, part.num_classes, part.mean, part.std)


def _finished_build(out: Path, cfg: TreeConfig, base_digest: str) -> dict[str, Any] | None:
    """The record of a finished build in `out` of the same config on the same base weights; None if
    `out` holds no finished build. A finished build of anything else is not overwritten: an error."""
    path = out / BUILD_FILE
    if not (path.exists() and (out / TREE_FILE).exists()):
        return None
    record = read_json(path, "the tree folder is damaged; build into another folder")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError(f"{path} is not a tree build's record; build into another folder")
    saved = TreeConfig.from_dict(record["config"])
    diff = {k: f"{v!r} -> {getattr(cfg, k)!r}" for k, v in asdict(saved).items() if v != getattr(cfg, k)}
    if record.get("base_sha256") != base_digest:
        diff["base"] = "other weights"
    if diff:
        raise ValueError(f"{out} holds a finished tree built differently ({diff}); build into another folder, "
                         "or delete this one to build it again")
    return record
