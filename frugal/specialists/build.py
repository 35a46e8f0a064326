"""Building a tree: cluster, then train the nodes of each level as independent jobs."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugal.specialists.nets import Tapped
from frugal.specialists.runner import run_jobs
from frugal.specialists.tree import TREE_FILE, Node, Tree, TreeConfig, embed, kmeans, load_tree, make_specialist, \
    node_seed, save_net, save_tree, subset
from frugal.utils import atomic_write_json, read_json

BUILD_FILE = "build.json"  # the record of a finished build: what it was built from, with, and in how long


def _load_node(out: Path, name: str, parent: Tapped | None, data, base_spec, widths, residual=True) -> Node:
    from frugal.train import build_model, read_weights

    net = build_model(base_spec, device="cpu") if parent is None else \
        make_specialist(parent, data, widths, "cpu", residual)
    net.load_state_dict(read_weights(out / f"{name}.safetensors"))
    return Node(name, net.eval(), Tapped(net))


def train_node(job: dict[str, Any]) -> dict[str, Any]:
    """Train one specialist (in any worker): rebuild its ancestors from the tree folder, train it
    on its cluster's examples, save its weights. Returns its name, sizes and time."""
    from frugal.data import load_task
    from frugal.train import CHECKPOINT, TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every backend and worker
    try:
        t0 = time.perf_counter()
        out = Path(job["tree_dir"])
        data = load_task(job["task"], data_dir=job.get("data_dir"))
        node = _load_node(out, "root", None, data, job["base_spec"], None)
        for name, widths in job["ancestors"]:
            node = _load_node(out, name, node.tapped, data, job["base_spec"], widths, job["residual"])
        part = subset(data, np.asarray(job["train_idx"]), np.asarray(job["val_idx"]))
        torch.manual_seed(job["seed"])  # the specialist's initial weights
        spec = make_specialist(node.tapped, part, job["widths"], "cpu", job["residual"])
        cfg = TrainConfig(task=job["task"], model=f"specialist:{job['name']}", epochs=job["epochs"], lr=job["lr"],
                          optimizer="adam", seed=job["seed"], device="cpu", threads=1, data_dir=job.get("data_dir"),
                          augment=job["augment"])
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


def build_tree(base_run: str | Path, out: str | Path, cfg: TreeConfig = TreeConfig(), backend: str = "process",
               workers: int = 2, data_dir: str | None = None, log=print) -> tuple[Tree, dict[str, Any]]:
    """Cluster and train a tree on top of a finished base run. Returns the tree and a record of
    the build (per node: cluster sizes, validation accuracy, seconds; wall-clock per level).

    A folder that holds a finished build of the same base and config is loaded, not built again,
    and its record (with the original times) returned; a build that was stopped resumes each
    node's training from its checkpoint (its levels are then marked `resumed`, their times partial)."""
    from frugal.data import load_task
    from frugal.train import WEIGHTS, load_run

    out = Path(out)
    base_digest = hashlib.sha256((Path(base_run) / WEIGHTS).read_bytes()).hexdigest()
    finished = _finished_build(out, cfg, base_digest)
    if finished is not None:
        return load_tree(out), finished
    out.mkdir(parents=True, exist_ok=True)
    base, base_cfg, _ = load_run(base_run, device=torch.device("cpu"))
    base_spec = read_json(Path(base_run) / "config.json", "the base run folder is damaged")["model_spec"]  # load_run checked it
    data = load_task(base_cfg.task, data_dir=data_dir, val_size=base_cfg.val_size)
    save_net(base, out / "root.safetensors")
    root = Node("root", base.eval(), Tapped(base))
    record: dict[str, Any] = {"levels": [], "nodes": {}}
    # (node, its ancestors as (name, widths), its training and validation indices)
    frontier = [(root, [], np.arange(len(data.train)), np.arange(len(data.val)))]
    for level in range(1, cfg.depth + 1):
        widths = list(cfg.widths_at(level))
        jobs, placed = [], []
        for node, ancestors, tr_idx, va_idx in frontier:
            part = subset(data, tr_idx, va_idx)
            f_tr = embed(node.tapped, part.train, data.mean, data.std, "cpu")
            f_va = embed(node.tapped, part.val, data.mean, data.std, "cpu")
            centroids, labels = kmeans(f_tr, cfg.k, node_seed(cfg.seed, node.name))
            d_tr = torch.cdist(f_tr, centroids)  # (N, k)
            node.centroids = centroids
            node.radius = torch.stack([d_tr[torch.from_numpy(labels == c), c].mean() if (labels == c).any()
                                       else torch.tensor(0.0) for c in range(cfg.k)])
            va_labels = torch.cdist(f_va, centroids).argmin(1).numpy()
            record["nodes"].setdefault(node.name, {})["cluster_sizes"] = np.bincount(labels, minlength=cfg.k).tolist()
            for c in range(cfg.k):
                idx_tr, idx_va = tr_idx[labels == c], va_idx[va_labels == c]
                if len(idx_tr) < cfg.min_cluster or len(idx_va) == 0:
                    continue  # too few examples to learn from: these inputs stay with the parent
                name = f"{node.name}.{c}"
                jobs.append({"name": name, "tree_dir": str(out), "task": base_cfg.task, "data_dir": data_dir,
                             "base_spec": base_spec, "ancestors": ancestors, "widths": widths,
                             "train_idx": idx_tr.tolist(), "val_idx": idx_va.tolist(), "epochs": cfg.epochs,
                             "lr": cfg.lr, "seed": node_seed(cfg.seed, name),
                             "augment": base_cfg.augment if cfg.augment is None else cfg.augment,
                             "residual": cfg.combine == "residual"})
                placed.append((node, ancestors, c, idx_tr, idx_va))
        t0 = time.perf_counter()
        results = run_jobs(train_node, jobs, backend=backend, workers=workers,
                           costs=[len(j["train_idx"]) for j in jobs])
        record["levels"].append({"level": level, "jobs": len(jobs), "seconds": time.perf_counter() - t0,
                                 "backend": backend, "workers": workers,
                                 "resumed": any(r.get("resumed", False) for r in results)})
        frontier = []
        for (node, ancestors, c, idx_tr, idx_va), res in zip(placed, results):
            record["nodes"].setdefault(res["name"], {}).update(res)
            child = _load_node(out, res["name"], node.tapped, data, base_spec, widths, cfg.combine == "residual")
            node.children[c] = child
            frontier.append((child, ancestors + [(res["name"], widths)], idx_tr, idx_va))
        log(f"level {level}: {len(jobs)} specialists in {record['levels'][-1]['seconds']:.1f}s ({backend})")
    tree = Tree(root, cfg).eval()
    save_tree(tree, out, base_spec, base_cfg.task)
    record.update(config=asdict(cfg), base_sha256=base_digest)
    atomic_write_json(out / BUILD_FILE, record)  # last: its presence says the build finished
    return tree, record


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
