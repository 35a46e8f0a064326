"""Bench method `specialists`: conditional specialists against their base and the controls a
sceptic asks for, each measured on the same test images (multiply-adds counted from the ops that
ran, so a tree's count is the average over where its inputs were routed).

Variants per task (base = the baseline method's model and plan):
- `base`; `tree d1` and `tree d2` (k clusters per node, residual specialists);
- `spatial`: features computed only where the base's strongest last-stage features fire;
- `unsupervised tree`: the tree on a conv autoencoder trained without labels;
- controls: `equal-MACs CNN` (the base family, widened until its multiply-adds match the depth-1
  tree's), and `ensemble` (copies of the base, as many as the tree has parameters for).
On the first seed the depth-1 tree is built twice, on the process pool and serially, to time
parallel training (the two give identical nodes, which the tests check). A per-cluster table and
per-cluster confusion matrices of base and tree (seed 0) show where the tree gains or loses.
`--variants` picks a part of the plan; the base, and the depth-1 tree the controls are sized by,
are trained or reloaded whenever a picked variant needs them.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from frugal.bench import BenchContext, Part, Summary, plan_fields, register_method, train_and_measure
from frugal.data import load_task, task_slug
from frugal.measure import count_macs, measure
from frugal.models import create_model
from frugal.specialists.analysis import cluster_confusions, draw_cluster_confusions, routed_predictions
from frugal.specialists.build import build_tree
from frugal.specialists.nets import Tapped, probe
from frugal.specialists.spatial import SpatialSpecialist, choose_features
from frugal.specialists.tree import TreeConfig
from frugal.train import TrainConfig, load_run, normalize, train

# The trees per budget (depth and seed are set per variant and seed)
TREES: dict[str, TreeConfig] = {"tiny": TreeConfig(k=2, epochs=1, min_cluster=30, widths=(8, 16)),
                                "quick": TreeConfig(k=4, epochs=2, min_cluster=500, widths=(16, 32)),
                                "full": TreeConfig(k=4, epochs=6, min_cluster=500, widths=(16, 32))}
TASKS = ("mnist", "fashion-mnist", "digits")


class WithBase(nn.Module):
    """A specialist together with the frozen base it reads, so parameters and bytes count both."""

    def __init__(self, base: nn.Module, specialist: nn.Module):
        super().__init__()
        self.base, self.specialist = base, specialist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.specialist(x)  # runs the base inside, once


class Ensemble(nn.Module):
    """Mean of the members' logits."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def _base_config(ctx: BenchContext, task: str, seed: int) -> TrainConfig:
    return ctx.base_config(task, seed, planned=TASKS)


MAX_ENSEMBLE = 8  # members of the equal-parameter ensemble at most (a tree on a small base may have 50x its parameters)


def _tree_settings(budget: str, task: str, train_examples: int, base: nn.Module, data) -> TreeConfig:
    """The budget's tree settings. On a task without a plan (a user's data set and net) a cluster
    needs a quarter of its even share of the training set, at most the plan's minimum, and the
    specialists' stages are half as wide as the base's first two taps (at least 4 channels)."""
    t = TREES[budget]
    if task not in TASKS:
        taps, _, _ = probe(Tapped(copy.deepcopy(base)), torch.zeros(2, data.in_channels, *data.image_size,
                                                               device=next(base.parameters()).device))
        t = dataclasses.replace(t, min_cluster=min(t.min_cluster, max(10, train_examples // (4 * t.k))),
                                widths=tuple(max(4, c // 2) for c in taps[:2]))
    return t


def _width_for_macs(name: str, data, target: float) -> tuple[str, dict]:
    """The widest `name` (or convnet, for a model without a width) whose MACs stay within target."""
    family = name if name in ("resnet", "convnet") else "convnet"
    x = torch.zeros(1, data.in_channels, *data.image_size)
    best = 4
    for w in range(4, 129, 2):
        m = create_model(family, in_channels=data.in_channels, image_size=data.image_size,
                         num_classes=data.num_classes, width=w)
        if count_macs(m, x) > target:
            break
        best = w
    return family, {"width": best}


def _cluster_figure(confs: dict[int, dict[str, np.ndarray]], data, path: Path) -> None:
    """Per depth-1 cluster: test inputs routed there, their commonest classes, base vs tree accuracy
    (all read off the cluster's confusion matrices)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from frugal.utils import save_figure

    rows = []
    for c in sorted(confs):
        base, tree = confs[c]["base"], confs[c]["tree"]
        per_class = base.sum(1)
        n = int(per_class.sum())
        top_k = np.argsort(-per_class, kind="stable")[:3]
        rows.append(["parent" if c < 0 else str(c), str(n),
                     ", ".join(f"{k}:{per_class[k]}" for k in top_k if per_class[k] > 0),
                     f"{100 * np.trace(base) / n:.2f}", f"{100 * np.trace(tree) / n:.2f}"])
    fig, ax = plt.subplots(figsize=(7, 0.4 + 0.3 * len(rows)))
    ax.axis("off")
    ax.table(cellText=rows, colLabels=["cluster", "test inputs", "top classes (class:count)", "base acc %",
                                       "tree acc %"], loc="center")
    ax.set_title(f"{data.name}: depth-1 tree by cluster", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def specialists_parts(ctx: BenchContext, task: str) -> tuple[Part, ...]:
    """The jobs of a unit: the base; then the trees, and the specialists of frugal's own tasks; the
    controls last (they are sized by the depth-1 tree)."""
    return (Part("base", ("base",)), Part("trees", ("tree d*",), after=("base",)),
            Part("own", ("spatial", "autoencoder (probe)", "unsupervised tree"), after=("base",)),
            Part("controls", ("equal-MACs CNN*", "ensemble*"), after=("trees",)))


@register_method("specialists", tasks=(*TASKS, "*"), default_tasks=("fashion-mnist", "mnist"),
                 description="feature-cluster trees and spatial specialists vs base, equal-MACs CNN and ensemble",
                 fields=(("train_seconds_serial", "tree train s (serial)", "{:,.0f}"),
                         ("train_seconds_parallel", "tree train s (2 workers)", "{:,.0f}"),
                         ("computed_fraction", "blocks computed", "{:.1%}")),
                 selectable=True, headline_tasks=("mnist",), parts=specialists_parts, after=("baseline",),
                 summary=Summary(claim="a specialist per cluster of the base's features, each input routed to one",
                                 idea="tree d*|spatial*", reference="base", control="equal-MACs CNN*",
                                 published="results/specialists"))
def run_specialists(ctx: BenchContext, task: str, seed: int) -> list[dict[str, Any]]:
    base_cfg = _base_config(ctx, task, seed)
    data = load_task(task, data_dir=ctx.data_dir, val_size=base_cfg.val_size)
    backend = "serial" if ctx.budget == "tiny" else "process"  # tiny (tests): no worker start-up
    speed = ctx.budget != "tiny"
    rows = []
    base_dir = ctx.run_dir("specialists", task, seed, "base")
    base_row = {**train_and_measure(ctx, base_cfg, base_dir), "variant": "base"}  # every variant builds on it
    if ctx.wants("base"):
        rows.append(base_row)
    base = load_run(base_dir, device=ctx.device)[0].eval()
    tcfg = _tree_settings(ctx.budget, task, plan_fields(base_cfg, data)["train_examples"], base, data)
    # the controls are sized by the depth-1 tree (its MACs and parameters), so they need it built
    # the front door (ctx.headline): base, the depth-1 tree and the equal-MACs control only
    want_wide = _wants_control(ctx, "equal-MACs CNN")
    want_ensemble = _wants_control(ctx, "ensemble") and not ctx.headline
    controls = want_wide or want_ensemble

    trees, tree_rows = {}, {}
    for depth in (1, 2):
        if not (ctx.wants(f"tree d{depth}") or (depth == 1 and controls)) or (ctx.headline and depth > 1):
            continue
        cfg = dataclasses.replace(tcfg, depth=depth, seed=seed)
        out = ctx.run_dir("specialists", task, seed, f"tree-d{depth}")
        tree, record = build_tree(base_dir, None, out, cfg, backend=backend, workers=2, data_dir=ctx.data_dir,
                                  log=lambda s: None)
        row = measure(tree.to(ctx.device), data, ctx.device, data_dir=ctx.data_dir, speed=speed)
        row.update(train_seconds_parallel=sum(lv["seconds"] for lv in record["levels"]),
                   nodes=len(tree.nodes()), model=base_cfg.model, run_dir=str(out.relative_to(ctx.out_dir)),
                   epochs=cfg.epochs, train_examples=len(data.train))  # each node: its cluster of the whole split
        if depth == 1 and seed == 0 and ctx.wants("tree d1") and not ctx.headline:
            # the same nodes trained one after another (bit for bit, which the tests check): only its time
            # is new, so it is measured on the first seed only
            serial_out = ctx.run_dir("specialists", task, seed, "tree-d1-serial")
            _, serial = build_tree(base_dir, None, serial_out, cfg, backend="serial", data_dir=ctx.data_dir,
                                   log=lambda s: None)
            row["train_seconds_serial"] = sum(lv["seconds"] for lv in serial["levels"])
        trees[depth], tree_rows[depth] = tree, {**row, "variant": f"tree d{depth}"}
        if ctx.wants(f"tree d{depth}"):
            rows.append(tree_rows[depth])
    if seed == 0 and ctx.wants("tree d1"):
        pred = routed_predictions(trees[1], base, data.test, data.mean, data.std, ctx.device)
        confs = cluster_confusions(pred, data.num_classes)
        _cluster_figure(confs, data, ctx.figures / f"specialists-{task_slug(task)}-clusters.png")
        draw_cluster_confusions(confs, task, data.num_classes, ctx.figures / f"specialists-{task_slug(task)}-confusion.png")

    if task not in TASKS and not ctx.headline and (ctx.wants("spatial") or ctx.wants("unsupervised tree")):
        ctx.note(f"specialists on {task}: the spatial specialist and the unsupervised tree are planned for frugal's "
                 f"own tasks ({', '.join(TASKS)}) and nets only; trained here: base, trees, and the controls")
    elif task in TASKS and not ctx.headline:
        if ctx.wants("spatial"):
            rows.append(_spatial(ctx, base, base_cfg, data, task, seed, tcfg, speed))
        if ctx.wants("autoencoder (probe)") or ctx.wants("unsupervised tree"):
            rows += _unsupervised(ctx, base_cfg, data, task, seed, tcfg, backend, speed)

    if controls:  # the same executed MACs in one plain CNN; the same parameters in an ensemble
        family, kw = _width_for_macs(base_cfg.model, data, tree_rows[1]["macs"])
        label = f"equal-MACs CNN ({family} width {kw['width']})"
        if want_wide and (ctx.wants(label) or ctx.wants("equal-MACs CNN")):
            ctrl_cfg = dataclasses.replace(base_cfg, model=family, model_kw=kw)
            rows.append({**train_and_measure(ctx, ctrl_cfg, ctx.run_dir("specialists", task, seed, "equal-macs")),
                         "variant": label})
        n = max(2, round(tree_rows[1]["params"] / base_row["params"]))
        if n > MAX_ENSEMBLE:
            ctx.note(f"specialists on {task}: the tree has {n}x the base's parameters; the ensemble control keeps "
                     f"{MAX_ENSEMBLE} members")
            n = MAX_ENSEMBLE
        if want_ensemble and (ctx.wants(f"ensemble of {n}") or ctx.wants("ensemble")):
            members = [base]
            for j in range(1, n):
                m_dir = ctx.run_dir("specialists", task, seed, f"ensemble-{j}")
                m_cfg = dataclasses.replace(base_cfg, seed=base_cfg.seed + 1000 * j)
                train(m_cfg, m_dir, resume=(m_dir / "checkpoint.pt").exists(), quiet=ctx.quiet, progress=False)
                members.append(load_run(m_dir, device=ctx.device)[0].eval())
            row = measure(Ensemble(members).eval(), data, ctx.device, data_dir=ctx.data_dir, speed=speed)
            rows.append({**row, "variant": f"ensemble of {n}"})
    return rows


def _wants_control(ctx: BenchContext, name: str) -> bool:
    """Whether --variants may ask for a control whose label starts with `name` (its full label, with
    the width or the member count, is known only once the depth-1 tree is measured)."""
    return ctx.wants(name) or any(p.startswith(name) for p in ctx.variants)


def _spatial(ctx: BenchContext, base: nn.Module, base_cfg: TrainConfig, data, task: str, seed: int,
             tcfg: TreeConfig, speed: bool) -> dict[str, Any]:
    """Features computed only where the base's strongest last-stage features fire."""
    parent = Tapped(base)
    xs = normalize(data.train.x[:512].to(ctx.device), data.mean, data.std)
    channels, thr = choose_features(parent, xs, tap=len(parent.taps) - 1, n=4, quantile=0.9)
    _, pen, _ = probe(parent, xs[:2])
    block = 4 if data.image_size[0] % 4 == 0 else 2
    spatial = SpatialSpecialist(parent, data.in_channels, data.image_size, data.num_classes, len(parent.taps) - 1,
                                channels, thr, pen, width=16, block=block).to(ctx.device)
    sp_dir = ctx.run_dir("specialists", task, seed, "spatial")
    sp_cfg = dataclasses.replace(base_cfg, model="spatial-specialist", epochs=tcfg.epochs, warmup_epochs=0.0,
                                 optimizer="adam", lr=1e-3, weight_decay=0.0)
    res = train(sp_cfg, sp_dir, resume=(sp_dir / "checkpoint.pt").exists(), model=spatial, data=data,
                quiet=ctx.quiet, progress=False)
    row = measure(WithBase(base, res.model).eval(), data, ctx.device, data_dir=ctx.data_dir, speed=speed)
    with torch.no_grad():
        res.model.eval()(normalize(data.test.x[:1000].to(ctx.device), data.mean, data.std))
    row.update(computed_fraction=res.model.computed_fraction, train_seconds=res.train_seconds,
               run_dir=str(sp_dir.relative_to(ctx.out_dir)), variant="spatial")
    return row


def _unsupervised(ctx: BenchContext, base_cfg: TrainConfig, data, task: str, seed: int, tcfg: TreeConfig,
                  backend: str, speed: bool) -> list[dict[str, Any]]:
    """An autoencoder base trained without labels (its row: a linear probe on its code), and a
    depth-1 tree on clusters of that code."""
    rows = []
    ae_cfg = dataclasses.replace(base_cfg, model="convae", model_kw={}, optimizer="adam", lr=1e-3,
                                 weight_decay=0.0, augment="none", warmup_epochs=0.0)
    ae_dir = ctx.run_dir("specialists", task, seed, "autoencoder")
    ae_row = {**train_and_measure(ctx, ae_cfg, ae_dir), "variant": "autoencoder (probe)"}
    if ctx.wants("autoencoder (probe)"):
        rows.append(ae_row)
    if ctx.wants("unsupervised tree"):
        out = ctx.run_dir("specialists", task, seed, "unsupervised-tree")
        utree, _ = build_tree(ae_dir, None, out, dataclasses.replace(tcfg, depth=1, seed=seed), backend=backend,
                              workers=2, data_dir=ctx.data_dir, log=lambda s: None)
        rows.append({**measure(utree.to(ctx.device), data, ctx.device, data_dir=ctx.data_dir, speed=speed),
                     "variant": "unsupervised tree", "run_dir": str(out.relative_to(ctx.out_dir))})
    return rows
