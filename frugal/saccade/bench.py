"""Bench method `saccade`: the saccadic CNN and the glimpse model against the dense twin of the
same backbone (every block at 3x3, run as ordinary convolutions), on the same task and seed.

Rows carry, besides the common measured fields, the fraction of blocks the policy attended on the
test set; multiply-adds are counted from the ops that ran on real test images, so they already
reflect the skipped blocks. An explanation grid per task and model goes into the report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from frugal.bench import BenchContext, Part, Summary, register_method, train_and_measure
from frugal.data import load_task, task_slug
from frugal.measure import measure
from frugal.saccade.teacher import TwinTeacher
from frugal.saccade.temporal import GlimpseTeacher, TrajectoryCNN, glimpses_taken, stopping_rule
from frugal.train import TrainConfig, load_run, normalize

@dataclass(frozen=True)
class SaccadeStage:
    """One budget of a task's plan: the dense twin's epochs, the saccadic model's fine-tuning epochs
    (it starts from the trained twin), and the training examples (None: all)."""

    epochs: int
    finetune: int
    train_limit: int | None = None


@dataclass(frozen=True)
class SaccadePlan:
    """The method's plan on one of frugal's tasks (Adam at a peak rate of 2e-3 per batch of 128).

    - `budget`: the saccadic model's compute, as a share of its twin's stage compute. On mnist the
      digit fills most of the 7x7 grid of 4-pixel blocks: there is less to skip.
    - `more_budgets`: more points of the accuracy-vs-compute curve on the task the targets are set
      on (variant "saccadic-<budget>"), each fine-tuned from the same twin.
    - `block_size`: the block side in pixels, twin and saccadic model alike (None: `auto_block_size`).
      On cluttered-mnist-60 the 12-pixel blocks of the 5x5 grid were too coarse to cover a digit
      without its surroundings; 8-pixel blocks (an 8x8 grid on the image padded to 64x64) are not.
    - `kernel_sizes`: the levels where they differ from skip / 3x3 / 5x5. Gumbel training runs every
      level densely, and a 5x5 costs 2.8 3x3s: on cluttered-mnist-100 that is ~4x the twin's epoch
      time for a level that died under the compute term on cluttered-mnist-60 and mnist.
    - `teacher`: the weight of `TwinTeacher`'s term in the fine-tuning, where it is needed (the
      fine-tuning on cluttered-mnist-60 diverged on one seed of two without it).
    - `window`: the trajectory model's window side in blocks, about a digit's 20-28 pixels.
    - `shifted`: also the `SHIFTED` chain: a twin trained on images shifted at random by up to 2
      pixels, and the trajectory with free blocks fine-tuned from it on shifted images: on
      cluttered-mnist-60 the plain twin comes to fit every training image, and the trajectory's
      accuracy is bounded by its twin's."""

    quick: SaccadeStage
    full: SaccadeStage
    budget: float = 0.25
    more_budgets: tuple[float, ...] = ()
    block_size: int | None = None
    kernel_sizes: tuple[int, ...] | None = None
    teacher: float | None = None
    window: int = 2
    shifted: bool = False


TINY = SaccadeStage(epochs=1, finetune=1, train_limit=256)
TASKS: dict[str, SaccadePlan] = {
    "mnist": SaccadePlan(SaccadeStage(2, 1), SaccadeStage(8, 4), budget=0.5, window=6),
    "translated-mnist-60": SaccadePlan(SaccadeStage(2, 1, 20000), SaccadeStage(10, 5)),
    "cluttered-mnist-60": SaccadePlan(SaccadeStage(2, 1, 20000), SaccadeStage(12, 6), budget=0.2, more_budgets=(0.3,),
                                      block_size=8, kernel_sizes=(3,), teacher=1.0, window=3, shifted=True),
    "cluttered-mnist-100": SaccadePlan(SaccadeStage(2, 1, 10000), SaccadeStage(6, 3), kernel_sizes=(3,)),
    "digits": SaccadePlan(SaccadeStage(5, 3), SaccadeStage(30, 15), window=1),
}
# Shares of the blocks the trained saccadic model is also measured at, attending each image's most
# wanted blocks (`inference_fraction`): the accuracy-vs-compute curve of one trained policy. 0.24 is
# about the largest share within 30% of the twin's multiply-adds on cluttered-mnist-60, the bound
# its target sets.
INFERENCE_FRACTIONS = (0.22, 0.24, 0.28, 0.5)
TWIN = "blockcnn"  # the dense twin's variant: trained first, it starts the saccadic model
HEADLINE_TRAIN = 10_000  # training images of the front door's twin and saccadic model
HEADLINE_FINETUNE = 2  # epochs of the front door's saccadic fine-tuning
QUICK_WARMUP = 0.3  # the quick budget's warm-up of the compute budget, as a share of the fine-tuning
# Training overrides of the saccadic variants. This fine-tuning is seed-sensitive on
# cluttered-mnist-60: its first Adam steps at the full rate threw the twin's features off, and its
# policy did not learn where to look before the budget fell; a learning-rate warm-up with a slower
# budget did not save it, `TwinTeacher` (frugal.saccade.teacher, SaccadePlan.teacher) did.
FINETUNE = {"lr": 1e-3, "init_from": TWIN}
FREE = "trajectory-free"  # the trajectory variant whose glimpses are free blocks rather than a window
# (variant, model, model options, training overrides of the task plan). The saccadic model is
# fine-tuned from the twin (`init_from`): trained from scratch it fell behind the twin, at more
# training time than the twin and the fine-tuning together.
VARIANTS = [
    (TWIN, "blockcnn", {}, {}),
    ("saccadic", "saccadic", {"budget_warmup": 500}, FINETUNE),
    # a conv glimpse net and a context net (Ba et al. 2015) in place of the paper's linear glimpse
    # net with the first glimpse at the centre, which stayed far below the twin on cluttered canvases
    ("ram", "ram", {"glimpse_net": "conv", "context": True}, {"lr": 1e-3}),
    # saccades over time: windows of blocks one after another, fine-tuned from the twin, which also
    # teaches where to look (GlimpseTeacher)
    # (3 glimpses while training: the ones a halt mostly keeps, at two thirds of 8's training time)
    ("trajectory", "trajectory", {"train_glimpses": 3}, FINETUNE),
    # the same with glimpses of as many blocks as a window has, free to lie anywhere on the grid:
    # the control of the window's shape at the same compute per glimpse
    (FREE, "trajectory", {"train_glimpses": 3}, FINETUNE),
]
# The chain trained on randomly shifted images (`SaccadePlan.shifted`): its own twin, and the trajectory
# with free blocks fine-tuned from it and taught by it
SHIFTED = "shift-"  # the prefix of its variants
VARIANTS += [
    (f"{SHIFTED}{TWIN}", "blockcnn", {}, {"augment": "shift"}),
    (f"{SHIFTED}{FREE}", "trajectory", {"train_glimpses": 3}, {**FINETUNE, "init_from": f"{SHIFTED}{TWIN}",
                                                                "augment": "shift"}),
]
TRAJECTORIES = tuple(v[0] for v in VARIANTS if v[1] == "trajectory")


def plan_variants(plan: SaccadePlan) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """The VARIANTS a task's plan trains: the shifted chain only where the plan has it."""
    return [v for v in VARIANTS if plan.shifted or not v[0].startswith(SHIFTED)]
# The trajectory model is also measured stopping at each of HALTS (its top class probability), from
# the same weights: an anytime curve.
HALTS = (0.9, 0.99, 0.999)
# ... and stopping after a fixed number of glimpses, with no halt: the control of the halt, which
# must beat these at the same multiply-adds to show that stopping when confident is worth it
FIXED_GLIMPSES = (1, 2, 3)
# ... and stopping at a halt or after at most k glimpses, whichever comes first: (halt, k). The
# images never confident enough would otherwise take every glimpse, each a step of Python-level
# overhead for a few images, for little accuracy
CAPPED = ((0.99, 3), (0.999, 3))
TRAJECTORY_TEACHER = {"weight": 1.0, "distill": 1.0}


@torch.no_grad()
def attention_stats(model: torch.nn.Module, data, ctx: BenchContext, variant: str, seed: int,
                    n: int = 2000, draw: bool = True) -> dict[str, Any]:
    """Fraction of blocks attended on test images (saccadic), and an explanation grid (seed 0)."""
    model.eval()
    out: dict[str, Any] = {}
    x = normalize(data.test.x[:n].to(ctx.device), data.mean, data.std, next(model.parameters()).dtype)
    if hasattr(model, "attention") and not getattr(model, "dense", True):
        attended = []
        for xb in x.split(256):
            model(xb)  # the policy's choice is kept on model.attention
            attended.append((model.attention.levels > 0).float().mean().item())
        out["attended_fraction"] = sum(attended) / len(attended)
    if isinstance(model, TrajectoryCNN):  # the glimpses each image took, and the blocks they computed
        g, blocks = glimpses_taken(model, x)
        counts = torch.bincount(g, minlength=model.glimpses + 1)[1:]
        out.update(attended_fraction=float(blocks.float().mean()) / (model.grid[0] * model.grid[1]),
                   mean_glimpses=float(g.float().mean()), max_glimpses=int(g.max()),
                   glimpse_counts=json.dumps({str(i + 1): int(c) for i, c in enumerate(counts.tolist()) if c}))
    if draw and seed == 0 and callable(getattr(model, "explain", None)) and variant not in (TWIN, SHIFTED + TWIN):
        # a trajectory is drawn where it stops: every image's 8 windows would hide its path
        halt = getattr(model, "halt", None)
        if isinstance(model, TrajectoryCNN) and halt is None:
            model.halt = HALTS[1]
        try:
            model.explain(x[:16], data.test.x[:16], data.test.y[:16],
                          ctx.figures / f"explain-{task_slug(data.name)}-{variant}.png")
        finally:
            if isinstance(model, TrajectoryCNN):
                model.halt = halt
    return out


@dataclass(frozen=True)
class SparsifyPlan:
    """Saccades on a task without a plan of its own, through `sparsify`: the user's net (or the
    baseline's) trained as the baseline is (`dense`), then gated and fine-tuned from it at each
    budget (a share of the blocks), and the last one also measured attending a fixed share of each
    image's blocks. The block grid is about `grid` blocks across (a side the blocks divide)."""

    budgets: tuple[float, ...] = (0.5, 0.25)
    finetune: tuple[tuple[str, int], ...] = (("tiny", 1), ("quick", 1), ("full", 3))
    lr_factor: float = 0.5  # the fine-tuning rate, as a share of the recipe's
    warmup: float = 0.3  # the budget's warm-up, as a share of the fine-tuning run
    fractions: tuple[float, ...] = (0.5,)  # the last budget's model attending more: a point further up its curve
    grid: int = 6


ANY_TASK = SparsifyPlan()


def block_size_for(h: int, w: int, grid: int = 6) -> int | None:
    """A block side that divides both sides of the image, the grid nearest `grid` blocks across;
    None when no such side leaves at least 2 blocks each way."""
    g = math.gcd(h, w)
    sides = [d for d in range(2, g + 1) if g % d == 0 and min(h, w) // d >= 2]
    return min(sides, key=lambda d: (abs(max(h, w) // d - grid), d)) if sides else None


@torch.no_grad()
def gate_stats(model: torch.nn.Module, data, ctx: BenchContext, n: int = 2000) -> dict[str, Any]:
    """Share of blocks a sparsified net computes on test images."""
    from frugal.saccade.sparsify import gate_of

    gate = gate_of(model)
    model.eval()
    x = normalize(data.test.x[:n].to(ctx.device), data.mean, data.std, next(model.parameters()).dtype)
    shares = []
    for xb in x.split(256):
        model(xb)
        shares.append(gate.attended())
    return {"attended_fraction": sum(shares) / len(shares)}


def run_any_task(ctx: BenchContext, task: str, seed: int, plan: SparsifyPlan = ANY_TASK) -> list[dict[str, Any]]:
    from frugal.saccade.sparsify import gate_of, gateable, sparsify
    from frugal.train import build_model, model_spec

    base = ctx.base_config(task, seed)
    data = load_task(task, data_dir=ctx.data_dir, val_size=base.val_size)
    block = block_size_for(*data.image_size, grid=plan.grid)
    if block is None:
        ctx.note(f"saccade on {task}: no block size divides both sides of its {data.image_size} images; skipped")
        return []
    if not any(gateable(m) is None for m in build_model(model_spec(base, data)).modules()):
        ctx.note(f"saccade on {task}: model {base.model!r} has no stride-1 'same' conv to gate; skipped")
        return []
    dense_dir = ctx.run_dir("saccade", task, seed, "dense")
    dense = {**train_and_measure(ctx, base, dense_dir), "variant": "dense"}
    rows = [dense]
    # a recipe sized up for a small data set (many epochs of few steps) fine-tunes for a quarter of them
    epochs = max(dict(plan.finetune)[ctx.budget], math.ceil(base.epochs / 4) if ctx.budget != "tiny" else 1)
    tune = dataclasses.replace(base, epochs=epochs, lr=base.lr * plan.lr_factor, warmup_epochs=0.0)
    for budget in [b for b in plan.budgets if ctx.wants(f"sparsify {b:g}")
                   or any(ctx.wants(f"sparsify {b:g} top {f:.0%}") for f in plan.fractions)]:
        model = load_run(dense_dir, device=ctx.device)[0]
        sparsify(model, block_size=block, budget=budget, budget_warmup=plan.warmup)
        run_dir = ctx.run_dir("saccade", task, seed, f"sparsify-{budget:g}")
        row = train_and_measure(ctx, tune, run_dir, model=model, extra=lambda m, d: gate_stats(m, d, ctx))
        row.update(variant=f"sparsify {budget:g}", block_size=block,
                   train_seconds_total=row["train_seconds"] + dense["train_seconds"])
        rows.append(row)
    if rows[-1] is dense or rows[-1]["variant"] != f"sparsify {plan.budgets[-1]:g}":
        return rows  # the points further up the curve belong to the last budget's model
    trained = load_run(ctx.out_dir / rows[-1]["run_dir"], device=ctx.device)[0]
    for f in plan.fractions:
        gate_of(trained).inference_fraction = f
        r = measure(trained, data, ctx.device, data_dir=ctx.data_dir, speed=ctx.budget != "tiny")
        r.update({k: rows[-1][k] for k in ("val_acc", "train_seconds", "train_seconds_total", "epochs",
                                           "train_examples", "model", "run_dir", "block_size")},
                 variant=f"{rows[-1]['variant']} top {f:.0%}", inference_fraction=f,
                 **gate_stats(trained, data, ctx))
        rows.append(r)
    return rows


def saccade_parts(ctx: BenchContext, task: str) -> tuple[Part, ...]:
    """The jobs of a unit: the dense twin, then the saccadic models fine-tuned from it; RAM apart; the
    shifted chain's twin, then its trajectory, where the task's plan has it."""
    if task not in TASKS:
        return ()  # the user's net: one job (its sparsified variants start from its dense run)
    shifted = TASKS[task].shifted
    part_of = {TWIN: "twin", SHIFTED + TWIN: SHIFTED + TWIN}  # a twin's part, which its fine-tunings wait for
    trajectories = [(v, o["init_from"]) for v, m, _, o in plan_variants(TASKS[task]) if m == "trajectory"]
    return (Part("twin", (TWIN,)), Part("saccadic", ("saccadic*",), after=("twin",)), Part("ram", ("ram",)),
            *((Part(part_of[SHIFTED + TWIN], (SHIFTED + TWIN,)),) if shifted else ()),
            *(Part(v, (v, *(label for label, _ in trajectory_points(v))), after=(part_of[twin],))
              for v, twin in trajectories))


@register_method("saccade", tasks=(*TASKS, "*"),
                 default_tasks=("mnist", "translated-mnist-60", "cluttered-mnist-60", "cluttered-mnist-100"),
                 description="saccadic CNN and glimpse model against the dense twin of the same backbone",
                 fields=(("attended_fraction", "blocks attended (test)", "{:.1%}"),
                         ("mean_glimpses", "glimpses (mean)", "{:.2f}"),
                         ("train_seconds_total", "train s incl. dense twin", "{:,.0f}")),
                 plots=(("mean_glimpses", "glimpses per image (mean)"),),
                 counts=(("glimpse_counts", "test images by the glimpses they took"),),
                 headline_tasks=("cluttered-mnist-60",), selectable=True, parts=saccade_parts, after=("baseline",),
                 summary=Summary(claim="a cheap policy picks the blocks worth computing; convs run on those only",
                                 idea="saccadic*|sparsify*", reference="blockcnn|dense", cost="macs", pick="cheapest",
                                 published="results/saccade-cluttered-mnist-60"))
def run_saccade(ctx: BenchContext, task: str, seed: int) -> list[dict[str, Any]]:
    if task not in TASKS:  # the user's task and net: saccades through sparsify
        return run_any_task(ctx, task, seed)
    rows: dict[str, dict[str, Any]] = {}
    task_plan = TASKS[task]
    stage = TINY if ctx.budget == "tiny" else getattr(task_plan, ctx.budget)
    plan = {"epochs": stage.epochs, **({"train_limit": stage.train_limit} if stage.train_limit is not None else {})}
    finetune = stage.finetune
    variants = plan_variants(task_plan)
    if ctx.headline:  # the front door: the saccadic model against its dense twin, on fewer images
        variants = [v for v in VARIANTS if v[0] in (TWIN, "saccadic")]
        plan["train_limit"] = min(plan.get("train_limit") or HEADLINE_TRAIN, HEADLINE_TRAIN)
        finetune = max(finetune, HEADLINE_FINETUNE)
    for b in task_plan.more_budgets if ctx.budget != "tiny" and not ctx.headline else ():
        variants.append((f"saccadic-{b}", "saccadic", {"budget": b, "budget_warmup": 500}, FINETUNE))
    if ctx.budget == "quick":  # a quick fine-tuning is a few hundred steps: the warm-up must end inside it
        variants = [(v, m, {**kw, "budget_warmup": QUICK_WARMUP} if "budget_warmup" in kw else kw, o)
                    for v, m, kw, o in variants]
    # --variants: the wanted variants, and the twin whenever one of them is fine-tuned from it (its
    # row comes along: it is the reference of theirs)
    wanted = [v for v in variants if ctx.wants(v[0]) or (v[0] == "saccadic" and ctx.wants("saccadic top *"))
              or (v[0] in TRAJECTORIES and any(ctx.wants(label) for label, _ in trajectory_points(v[0])))]
    twins = {v[3].get("init_from") for v in wanted} - {None}
    wanted = [v for v in variants if v[0] in twins or v in wanted]
    for variant, model, model_kw, overrides in wanted:
        settings = {"optimizer": "adam", "lr": 2e-3, **plan, **overrides}
        twin = settings.pop("init_from", None)
        if twin is not None:
            settings.update(epochs=finetune, init_from=str(ctx.run_dir("saccade", task, seed, twin).resolve()))
        if model == "ram":  # the control of the trajectory gets its training budget: the twin's epochs and its own
            settings["epochs"] = plan["epochs"] + finetune
        if model in ("saccadic", "blockcnn", "trajectory") and task_plan.block_size is not None:
            model_kw = {**model_kw, "block_size": task_plan.block_size}
        if model == "trajectory":
            free = variant.removeprefix(SHIFTED) == FREE
            glimpse = {"blocks": task_plan.window ** 2} if free else {"window": task_plan.window}
            model_kw = {**glimpse, **model_kw}
        if model == "saccadic":
            model_kw = {"budget": task_plan.budget, **model_kw}
            if task_plan.kernel_sizes is not None:
                model_kw["kernel_sizes"] = list(task_plan.kernel_sizes)
        cfg = TrainConfig(task=task, model=model, model_kw=model_kw, seed=seed, device=str(ctx.device),
                          data_dir=ctx.data_dir, **settings)
        teacher = task_plan.teacher if model == "saccadic" and twin else None
        hooks = [TwinTeacher(settings["init_from"], teacher)] if teacher else []
        if model == "trajectory":
            teacher = TRAJECTORY_TEACHER["weight"]
            hooks = [GlimpseTeacher(settings["init_from"], **TRAJECTORY_TEACHER)]
        row = train_and_measure(ctx, cfg, ctx.run_dir("saccade", task, seed, variant), hooks=hooks,
                                extra=lambda m, d, v=variant: attention_stats(m, d, ctx, v, seed))
        row.update(variant=variant, teacher_weight=teacher or 0.0)
        # what it took to get there: a fine-tuned model's own training plus its twin's
        row["train_seconds_total"] = row["train_seconds"] + (rows[twin]["train_seconds"] if twin else 0.0)
        rows[variant] = row
        if variant == "saccadic" and not ctx.headline:
            rows.update(at_fractions(ctx, row, task, seed))
        if variant in TRAJECTORIES:
            rows.update(at_halts(ctx, row, task, seed))
    return list(rows.values())


def remeasured(ctx: BenchContext, row: dict[str, Any], task: str, seed: int,
               points: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """A trained model measured again at each test-time setting of `points` ((variant, {attribute:
    value})): the same weights and training cost, a different share of the compute at test time. Only
    the points `--variants` asks for are measured."""
    points = [(variant, settings) for variant, settings in points if ctx.wants(variant)]
    if not points:
        return {}
    trained, cfg, _ = load_run(ctx.out_dir / row["run_dir"], device=ctx.device)
    data = load_task(task, data_dir=ctx.data_dir, val_size=cfg.val_size)
    out = {}
    for variant, settings in points:
        model = copy.deepcopy(trained)  # each point's settings alone
        for k, v in settings.items():
            setattr(model, k, v)
        r = measure(model, data, ctx.device, data_dir=ctx.data_dir, speed=ctx.budget != "tiny")
        r.update({k: row[k] for k in ("val_acc", "train_seconds", "train_seconds_total", "epochs", "train_examples",
                                      "model", "run_dir", "teacher_weight") if k in row},
                 variant=variant, **settings, **attention_stats(model, data, ctx, variant, seed, draw=False))
        out[variant] = r
    return out


def at_fractions(ctx: BenchContext, row: dict[str, Any], task: str, seed: int) -> dict[str, dict[str, Any]]:
    """The trained saccadic model attending each of INFERENCE_FRACTIONS of each image's blocks."""
    return remeasured(ctx, row, task, seed,
                      [(f"saccadic top {f:.0%}", {"inference_fraction": f}) for f in INFERENCE_FRACTIONS])


def trajectory_points(variant: str) -> list[tuple[str, dict[str, Any]]]:
    """A trained trajectory model's test-time settings: (variant, {attribute: value})."""
    rules = [(h, None) for h in HALTS] + [(None, k) for k in FIXED_GLIMPSES] + list(CAPPED)
    return [(f"{variant} {label}", attrs) for label, attrs in (stopping_rule(h, k) for h, k in rules)]


def at_halts(ctx: BenchContext, row: dict[str, Any], task: str, seed: int) -> dict[str, dict[str, Any]]:
    """The trained trajectory model stopping at each of HALTS, where its prediction is confident early,
    after each of FIXED_GLIMPSES glimpses whatever its confidence, and at each of CAPPED."""
    return remeasured(ctx, row, task, seed, trajectory_points(row["variant"]))
