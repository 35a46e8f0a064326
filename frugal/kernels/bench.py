"""Bench method `kernels`: simple kernels before, during and after training, against the plain net
trained with the baseline's own plan (same task, model, optimiser, epochs, augmentation, seed).

Variants per task:
- `plain`: the baseline model as the `baseline` method trains it.
- `plain width <w>` (models with a width): the same plan at a narrower width, the control for a
  constrained kind with as few free conv parameters (width 8 of the resnet has a quarter of the
  width-16 net's, as many as p4; width 11 has 47%, as dct4 has 46%) but also fewer multiply-adds.
- `constrained <kind>`: every conv of 2x2 or more constrained from the start (`constrained` model).
- `penalty <kind> <weight>`: the plain model trained with a kernel information penalty; `gmm`
  kernels are then set to their mixture component's mean and fine-tuned with the values of each
  component tied (the row keeps the accuracy before and right after the sharing).
- `snap <threshold>`: post-hoc, from the plain run: rounds of snapping at rising thresholds, each
  followed by fine-tuning with the snapped kernels frozen; one row after each round.

Each row carries the conv kernels' free parameters, their bytes (range-coded; for snapped nets
class ids plus free values) and the share of kernels snapped. Kernel grids go into the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from frugal.bench import BenchContext, Part, Summary, plan_fields, register_method, train_and_measure
from frugal.data import load_task, task_slug
from frugal.kernels.constrained import conv_free_parameters
from frugal.kernels.penalty import KernelPenalty, PenaltyConfig, SharedValues, kernel_bytes
from frugal.kernels.pictures import draw_kernels
from frugal.kernels.snapping import FreezeKernels, snap, snapped_kernel_bytes
from frugal.measure import measure
from frugal.train import CHECKPOINT, train

@dataclass(frozen=True)
class KernelsPlan:
    """What the method trains on a task, over the task's baseline recipe: constrained kinds (those
    with fewer free values than the plain kernel; the group kinds p4 and p4m need conv widths that
    divide by 4 and 8, which lenet5's 50 channels do not), narrower plain controls (models with a
    `width`), penalties (kind, weight), snapping thresholds (relative residual energy, rising) and
    the fine-tuning epochs after weight sharing and after each snapping round, per budget."""

    kinds: tuple[str, ...]
    penalties: tuple[tuple[str, float], ...]
    thresholds: tuple[float, ...]
    widths: tuple[int, ...] = ()
    finetune: tuple[tuple[str, int], ...] = (("tiny", 1), ("quick", 1), ("full", 2))

    def finetune_epochs(self, budget: str) -> int:
        return dict(self.finetune)[budget]


PLANS: dict[str, KernelsPlan] = {
    "mnist": KernelsPlan(kinds=("lr", "d4", "radial", "dct6", "rank1", "lsep8"),
                         penalties=(("entropy", 0.01), ("gmm", 1e-3)), thresholds=(0.1, 0.2, 0.35, 0.5)),
    "fashion-mnist": KernelsPlan(kinds=("lr", "lrud", "d4", "dct4", "lsep8", "p4", "p4m"), widths=(8, 11),
                                 penalties=(("entropy", 0.01), ("gmm", 1e-3)), thresholds=(0.1, 0.2, 0.35, 0.5)),
    "digits": KernelsPlan(kinds=("lr", "d4", "p4"), widths=(8,), penalties=(("gmm", 1e-3),), thresholds=(0.2, 0.5)),
}
# Any other task, on the user's --model (whose options frugal does not know, so no narrower
# control): one symmetric kind, one penalty, two snapping rounds.
ANY_TASK = KernelsPlan(kinds=("d4",), penalties=(("entropy", 0.01),), thresholds=(0.2, 0.5))


def headline_plan(plan: KernelsPlan) -> KernelsPlan:
    """The front door: one constrained kind with few free values (a 6-term DCT basis where the plan
    has it) and snapping up to 0.35, against plain and the plan's narrower plain nets."""
    kind = "dct6" if "dct6" in plan.kinds else plan.kinds[0]
    return dataclasses.replace(plan, kinds=(kind,), penalties=(),
                               thresholds=tuple(t for t in plan.thresholds if t <= 0.35))


def _kernel_fields(model: torch.nn.Module, result=None) -> dict[str, Any]:
    if result is None:
        return {"conv_free_params": conv_free_parameters(model), "kernel_bytes": kernel_bytes(model),
                "snapped_fraction": 0.0}
    # a snapped kernel counts its class's free values (1x1 convs are never snapped and count in full)
    return {"conv_free_params": conv_free_parameters(model) - (result.free_before - result.free_after),
            "kernel_bytes": snapped_kernel_bytes(model, result), "snapped_fraction": result.snapped_fraction}


def kernels_parts(ctx: BenchContext, task: str) -> tuple[Part, ...]:
    """The jobs of a unit: the plain net and its snapping rounds; each narrow control, constrained
    kind and penalty apart."""
    plan = PLANS.get(task, ANY_TASK)
    return (Part("plain", ("plain", "snap *")), *(Part(f"width {w}", (f"plain width {w}",)) for w in plan.widths),
            *(Part(k, (f"constrained {k}",)) for k in plan.kinds),
            *(Part(f"{k} {w:g}", (f"penalty {k} {w:g}",)) for k, w in plan.penalties))


@register_method("kernels", tasks=(*PLANS, "*"), default_tasks=("mnist", "fashion-mnist"),
                 description="constrained, penalised and snapped kernels against the plain net",
                 fields=(("conv_free_params", "conv free params", "{:,.0f}"),
                         ("kernel_bytes", "kernel bytes", "{:,.0f}"),
                         ("snapped_fraction", "kernels snapped", "{:.1%}"),
                         ("acc_after_sharing", "acc right after weight sharing", "{:.2%}")),
                 plots=(("conv_free_params", "conv free parameters"),
                        ("kernel_bytes", "conv kernel bytes (range-coded)")),
                 selectable=True, headline_tasks=("mnist",), parts=kernels_parts, after=("baseline",),
                 summary=Summary(claim="kernels with fewer free values: constrained, or snapped after training",
                                 idea="constrained *|snap *|penalty *", reference="plain", control="plain width *",
                                 cost="conv_free_params", pick="cheapest",
                                 published="results/kernels-fashion"))
def run_kernels(ctx: BenchContext, task: str, seed: int) -> list[dict[str, Any]]:
    plan = PLANS.get(task, ANY_TASK)
    if ctx.headline:
        plan = headline_plan(plan)
    base = ctx.base_config(task, seed, planned=tuple(PLANS))
    rows = []

    plain_dir = ctx.run_dir("kernels", task, seed, "plain")
    holder: dict[str, Any] = {}

    def plain_extra(m, d):
        holder["model"] = m
        return _kernel_fields(m)

    snaps = [t for t in plan.thresholds if ctx.wants(f"snap {t:g}")]
    if ctx.wants("plain") or snaps:  # snapping starts from the plain net
        row = train_and_measure(ctx, base, plain_dir, extra=plain_extra)
        if ctx.wants("plain"):
            rows.append({**row, "variant": "plain"})

    # (variant, run folder, config): the narrow plain controls, then each constrained kind
    trained = [(f"plain width {w}", f"plain-width{w}",
                dataclasses.replace(base, model_kw={**base.model_kw, "width": w})) for w in plan.widths]
    trained += [(f"constrained {kind}", f"constrained-{kind}",
                 dataclasses.replace(base, model="constrained", model_kw={"base": base.model, "kind": kind,
                                                                          **base.model_kw}))
                for kind in plan.kinds]
    for variant, name, cfg in trained:
        if not ctx.wants(variant):
            continue
        row = train_and_measure(ctx, cfg, ctx.run_dir("kernels", task, seed, name),
                                extra=lambda m, d: _kernel_fields(m))
        rows.append({**row, "variant": variant})

    epochs = plan.finetune_epochs(ctx.budget)  # fine-tuning after weight sharing and after each snapping round
    finetune_cfg = dataclasses.replace(base, epochs=epochs, lr=base.lr / 10, warmup_epochs=0.0)
    for kind, weight in plan.penalties:
        if not ctx.wants(f"penalty {kind} {weight:g}"):
            continue
        hook = KernelPenalty(PenaltyConfig(kind=kind, weight=weight))
        run_dir = ctx.run_dir("kernels", task, seed, f"penalty-{kind}-{weight:g}")

        def penalty_extra(m, d, hook=hook, run_dir=run_dir):
            if hook.cfg.kind != "gmm":
                return _kernel_fields(m)
            # soft weight sharing ends by setting each value to its component's mean, then fine-tunes
            # with the values of each component tied (as the snapping rounds do): measure that net
            before = measure(m, d, ctx.device, speed=False)["test_acc"]
            components = hook.quantize_to_mixture(m)
            after = measure(m, d, ctx.device, speed=False)["test_acc"]
            tune_dir = run_dir.with_name(run_dir.name.replace("-seed", "-tuned-seed"))
            res = train(finetune_cfg, tune_dir, resume=(tune_dir / CHECKPOINT).exists(), model=m, data=d,
                        hooks=[SharedValues(components)], quiet=ctx.quiet, progress=False)
            tuned = measure(res.model, d, ctx.device, data_dir=ctx.data_dir, speed=ctx.budget != "tiny")
            return {**tuned, "acc_before_sharing": before, "acc_after_sharing": after,
                    "tune_seconds": res.train_seconds, **_kernel_fields(res.model)}

        row = train_and_measure(ctx, base, run_dir, extra=penalty_extra, hooks=[hook])
        rows.append({**row, "variant": f"penalty {kind} {weight:g}"})

    # post-hoc snapping, in rounds, from the plain net (each round builds on the one before, so a
    # selected threshold also runs the lower ones, without rows)
    if not snaps:
        return rows
    data = load_task(task, data_dir=ctx.data_dir, val_size=base.val_size)
    model = holder["model"]
    if seed == 0:
        draw_kernels(model, ctx.figures / f"kernels-{task_slug(task)}-plain.png", title=f"{task}: plain, first conv")
    result = None
    for t in plan.thresholds:
        if t > max(snaps):
            break
        result = snap(model, t, earlier=result)
        before = measure(model, data, ctx.device, data_dir=ctx.data_dir, speed=False)["test_acc"]
        run_dir = ctx.run_dir("kernels", task, seed, f"snap-{t:g}")
        res = train(finetune_cfg, run_dir, resume=(run_dir / CHECKPOINT).exists(), model=model, data=data,
                    hooks=[FreezeKernels(model, result)], quiet=ctx.quiet, progress=False)
        model = res.model
        row = measure(model, data, ctx.device, data_dir=ctx.data_dir, speed=ctx.budget != "tiny")
        row.update(_kernel_fields(model, result), acc_before_finetune=before, threshold=t,
                   **plan_fields(finetune_cfg, data),
                   model=base.model, run_dir=str(run_dir.relative_to(ctx.out_dir)), train_seconds=res.train_seconds,
                   snapped_counts=dict(result.counts))
        if t in snaps:
            rows.append({**row, "variant": f"snap {t:g}"})
    if seed == 0 and result is not None:
        draw_kernels(model, ctx.figures / f"kernels-{task_slug(task)}-snapped.png", result,
                     title=f"{task}: after snapping rounds up to {max(snaps):g}, first conv")
    return rows
