"""How much faster is a tree's node training on a process pool than serially?

Builds the same tree (`frugal.specialists.build_tree`) on top of a finished base run, in turn on
the serial runner and on the process pool with `--workers` workers (`--repeats` times each, in one
process, each build in a fresh folder), and prints the wall-clock of the node trainings (the
clustering is the same work in both and is not counted), their ratio, and whether the two runners
wrote identical specialists. Every node trains with one thread in either runner, so the ratio is
the gain of running nodes side by side; it needs as many idle cores as workers. Prints JSON.

    python -m frugal.benchmarks.tree_parallel --base RUN --k 4 --epochs 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from frugal.benchmarks import add_out_arg, publish
from frugal.specialists.build import build_tree, same_nodes
from frugal.specialists.tree import TreeConfig
from frugal.utils import versions


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="a finished run folder (frugal train) to build the tree on")
    p.add_argument("--k", type=int, default=4, help="clusters per node")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1, help="training epochs per node")
    p.add_argument("--min-cluster", type=int, default=200)
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    add_out_arg(p)
    a = p.parse_args(argv)
    base = Path(a.base)
    if not (base / "config.json").exists():
        raise SystemExit(f"{base} is not a run folder (no config.json): give a finished `frugal train` run")
    cfg = TreeConfig(k=a.k, depth=a.depth, epochs=a.epochs, min_cluster=a.min_cluster, widths=tuple(a.widths))
    seconds: dict[str, list[float]] = {"serial": [], "process": []}
    same = []
    with tempfile.TemporaryDirectory(prefix="tree-parallel-") as tmp:
        for r in range(a.repeats):  # in turn, so a change of load hits both
            dirs = {}
            for backend in ("serial", "process"):
                out = Path(tmp) / f"{backend}-{r}"
                _, record = build_tree(base, None, out, cfg, backend=backend, workers=a.workers, data_dir=a.data_dir,
                                       log=lambda s: None)
                seconds[backend].append(sum(lv["seconds"] for lv in record["levels"]))
                dirs[backend] = out
            same.append(same_nodes(dirs["serial"], dirs["process"]))
        jobs = [lv["jobs"] for lv in record["levels"]]
        sizes = {name: n["train_examples"] for name, n in record["nodes"].items() if "train_examples" in n}
    t_serial, t_pool = statistics.median(seconds["serial"]), statistics.median(seconds["process"])
    out = {"benchmark": "tree_parallel", "base": str(base), "tree": {"k": a.k, "depth": a.depth, "epochs": a.epochs,
                                                                      "widths": a.widths},
           "jobs_per_level": jobs, "node_train_sizes": sizes, "workers": a.workers,
           "serial_seconds": seconds["serial"], "process_seconds": seconds["process"],
           "speedup": t_serial / t_pool, "identical_nodes": all(same), "cpus": torch.multiprocessing.cpu_count(),
           "versions": versions()}
    return publish(out, "frugal.benchmarks.tree_parallel", argv, a.out)


if __name__ == "__main__":
    main()
