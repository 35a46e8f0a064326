"""Bench method `compress`: compression in the training loop against the same net trained plainly
and against a plain control, each measured by the size of its real `.frugal` file.

Per (task, model, seed):
- `dense`: plain training; its file stores every tensor raw (float32).
- `loop λ=...`: the same training with `CompressInTheLoop` at each lambda; the file holds the
  codes the last round chose, and decodes to exactly the trained weights.
- `genes_lenet5` (mnist): LeNet-5 whose conv2 and fc1 are written by generators, trained plainly
  and in the loop: its file holds the generators, to set against lenet5's weights at equal accuracy.
- `code λ=...`: the same training against the code length itself (`frugal.compress.rate`): every
  tensor is integers x a learned step (each kernel's DCT), and the loss adds lam x the bits those
  integers cost under the learned densities; the file is them range-coded under exactly those.
  Batch norms are folded after training (`folded`): their statistics cost a few bytes, and their
  folded weights and biases are re-coded finely; the row measures the folded net.
- `nncodec qp=...`: the standard's coder (NNCodec, ISO/IEC 15938-17) on the plainly trained net, at a
  few quantisation parameters, where it is installed (`.ci/install-nncodec`); its bitstream's bytes.
- `torch-prune λ=...` and `torch-prune (code's sparsity, λ=...)`: the control at matched sparsity
  (the loop's, or the code's). The dense net is pruned with
  `torch.nn.utils.prune.global_unstructured` (L1) to the share of zero weights the loop model of
  that lambda ended with, fine-tuned with the mask for the same epochs as one loop round, then
  uniform-quantised (step 0.05 x each tensor's std) and written with the same range coder.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from frugal.bench import BenchContext, Part, Summary, plan_fields, register_method, train_and_measure
from frugal.coding.codecs import Uniform
from frugal.compress.container import encode_model
from frugal.compress.loop import CompressInTheLoop, LoopConfig
from frugal.data import load_task, task_slug
from frugal.measure import measure
from frugal.train import TrainConfig, model_spec, train
from frugal.utils import atomic_write_bytes

@dataclass(frozen=True)
class CompressPlan:
    """One model the method trains on a task: its options, epochs per budget, and its training
    settings over Adam at 1e-3 (None: the task's baseline recipe instead, as for a user's model)."""

    model: str
    quick: int
    full: int
    model_kw: tuple[tuple[str, Any], ...] = ()
    lr: float | None = 1e-3
    own_recipe: bool = True  # False: train as the task's baseline recipe does (optimizer, lr, batch)
    code_lambdas: tuple[float, ...] | None = None  # the learned-code runs' lambdas (None: CODE_LAMBDAS)


# The genes' generator: the factored form, rank 32 with 64 hidden units (24,432 parameters writing
# 425,000 weights), which learns faster than the additive form. The generated weights learn slowly
# at Adam's 1e-3, hence 3e-3.
GENES = CompressPlan("genes_lenet5", quick=4, full=20, model_kw=(("rank", 32), ("hidden", 64)), lr=3e-3)
PLANS: dict[str, list[CompressPlan]] = {
    "mnist": [CompressPlan("lenet5", quick=4, full=20), CompressPlan("lenet300", quick=4, full=20), GENES],
    # the residual net: one more lambda where its file crosses 10 KB
    "fashion-mnist": [CompressPlan("resnet", quick=4, full=15, code_lambdas=(0.003, 0.01, 0.015, 0.03))],
    "digits": [CompressPlan("lenet300", quick=10, full=30)],
}


def any_task_plan(ctx: BenchContext, task: str) -> list[CompressPlan]:
    """A task without a plan: the user's --model (or the baseline's), trained as the baseline is."""
    cfg = ctx.base_config(task, 0)
    return [CompressPlan(cfg.model, quick=cfg.epochs, full=cfg.epochs, own_recipe=False)]


TINY = dict(epochs=2, train_limit=256)
LAMBDAS = (0.003, 0.03, 0.3)  # loss increase (nats per example) worth one kilobyte of code
CODE_LAMBDAS = (0.003, 0.01, 0.03)  # the same, for training against the learned code's length
NNCODEC_QPS = (-44, -38, -32, -26)  # NNCodec's quantisation parameters on the dense net (its step 2^(qp/4))
CONTROL_STEP = 0.05  # the control's quantisation step, in units of each tensor's std

# Published points (accuracy, bytes) drawn on the report's accuracy-vs-bytes plots: Deep Compression
# (Han et al. 2016), EPR (Oktay et al. 2020), MIRACLE (Havasi et al. 2019).
PUBLISHED = {
    "mnist": [("LeNet-5 Deep Compression", 0.9926, 44_000), ("LeNet-5 EPR", 0.990, 2_840),
              ("LeNet-5 MIRACLE", 0.9904, 1_520), ("LeNet-300-100 Deep Compression", 0.9842, 27_000),
              ("LeNet-300-100 EPR", 0.981, 8_560)],
}


def _weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def zero_fraction(model: nn.Module) -> float:
    """Share of zeros among the parameters of two or more dimensions (what pruning acts on)."""
    ws = [p for p in model.parameters() if p.dim() >= 2]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def file_row(model: nn.Module, spec: dict, codecs: dict, path: Path) -> dict[str, Any]:
    blob = encode_model(model, spec, codecs)
    atomic_write_bytes(path, blob)
    return {"file_bytes": len(blob), "zero_fraction": zero_fraction(model)}


def torch_prune_control(ctx: BenchContext, base: TrainConfig, dense_dir: Path, sparsity: float,
                        epochs: int, run_dir: Path) -> dict[str, Any]:
    """Prune the trained dense net to `sparsity`, fine-tune with the mask, quantise, write the file."""
    import torch.nn.utils.prune as prune

    from frugal.train import WEIGHTS, build_model, read_weights

    data = load_task(base.task, data_dir=ctx.data_dir, val_size=base.val_size)
    spec = model_spec(base, data)
    model = build_model(spec, device=ctx.device)
    model.load_state_dict(read_weights(dense_dir / WEIGHTS))
    params = _weights(model)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    cfg = TrainConfig(**{**base.to_dict(), "epochs": epochs, "warmup_epochs": 0.0,
                         "lr": base.lr / 10})  # fine-tuning: a tenth of the training rate
    res = train(cfg, run_dir, resume=(run_dir / "checkpoint.pt").exists(), model=model, data=data,
                quiet=ctx.quiet, progress=False)
    for m, name in params:
        prune.remove(m, name)  # make the zeros permanent: plain weights again
    state = res.model.state_dict()
    codecs = {k: Uniform(max(CONTROL_STEP * float(v.float().std()), 1e-6))
              for k, v in state.items() if v.is_floating_point() and v.numel() > 1}
    with torch.no_grad():
        for k, c in codecs.items():
            state[k].copy_(c.roundtrip(state[k])[0])  # the file's weights: measured as they decode
    row = measure(res.model, data, ctx.device, data_dir=ctx.data_dir, speed=False)
    row.update(file_row(res.model, spec, codecs, run_dir / "model.frugal"), train_seconds=res.train_seconds,
               **plan_fields(cfg, data), model=base.model, run_dir=str(run_dir.relative_to(ctx.out_dir)),
               target_sparsity=sparsity)
    return row


HEADLINE_LAMBDA = 0.03  # the front door's one lambda, on lenet5 alone


def code_control(model_name: str, lam: float) -> str:
    """The control of `code λ=lam`: torch pruning to the share of zeros that run ended with."""
    return f"{model_name} torch-prune (code's sparsity, λ={lam:g})"


def schedule(ctx: BenchContext, task: str) -> list[tuple[CompressPlan, tuple[float, ...], tuple[float, ...]]]:
    """Per model of the task's plan: the lambdas of its loop runs and of its learned-code runs."""
    plans = PLANS.get(task) or any_task_plan(ctx, task)
    lambdas, code_lambdas = LAMBDAS, CODE_LAMBDAS
    if ctx.headline:  # the front door: the first model, trained against its code at one lambda, and its control
        plans, lambdas, code_lambdas = plans[:1], (), (HEADLINE_LAMBDA,)
    # genes: one loop lambda (each of its epochs costs two of lenet5's), and no learned code
    return [(p, lambdas[1:2], ()) if p.model.startswith("genes")
            else (p, lambdas, code_lambdas if ctx.headline or p.code_lambdas is None else p.code_lambdas)
            for p in plans]


def compress_parts(ctx: BenchContext, task: str) -> tuple[Part, ...]:
    """The jobs of a unit, per model: the dense net (and NNCodec on it); each lambda's loop and
    learned-code run, side by side with it; each pruning control once the dense net and its
    lambda's run (whose share of zeros it takes) have finished."""
    parts = []
    for plan, lams, code_lams in schedule(ctx, task):
        m = plan.model
        dense = f"{m} dense"
        parts.append(Part(dense, (dense, f"{m} nncodec *")))
        for kind, lam_set, control in (("loop", lams, lambda lam: f"{m} torch-prune λ={lam:g}"),
                                       ("code", code_lams, lambda lam: code_control(m, lam))):
            for lam in lam_set:
                run = f"{m} {kind} {lam:g}"
                parts += [Part(run, (f"{m} {kind} λ={lam:g}",)),
                          Part(f"{run} control", (control(lam),), after=(dense, run))]
    return tuple(parts)


@register_method("compress", tasks=(*PLANS, "*"), default_tasks=("mnist", "fashion-mnist"),
                 description="compression in the training loop vs plain training and torch pruning, in real file bytes",
                 fields=(("file_bytes", "file bytes", "{:,.0f}"), ("zero_fraction", "zero weights", "{:.1%}")),
                 references=PUBLISHED, headline_tasks=("mnist",), selectable=True, parts=compress_parts,
                 after=("baseline",),
                 summary=Summary(claim="the weights' code length as a training objective: fewer bytes of a real file",
                                 idea="* loop *|* code *", reference="* dense",
                                 control="* torch-prune *|* nncodec *", cost="file_bytes",
                                 pick="cheapest", published="results/compress-mnist-lenet5"))
def run_compress(ctx: BenchContext, task: str, seed: int) -> list[dict[str, Any]]:
    rows = []
    for plan, lams, code_lams in schedule(ctx, task):
        model_name = plan.model
        if plan.own_recipe:
            settings = {"optimizer": "adam", "lr": plan.lr,
                        **(TINY if ctx.budget == "tiny" else {"epochs": getattr(plan, ctx.budget)})}
            base = TrainConfig(task=task, model=model_name, model_kw=dict(plan.model_kw), seed=seed,
                               device=str(ctx.device), data_dir=ctx.data_dir, **settings)
        else:  # the baseline's recipe, whose budgets already hold the epochs
            base = dataclasses.replace(ctx.base_config(task, seed), model=model_name, model_kw=dict(plan.model_kw))
        every = max(1, base.epochs // 4)
        data = load_task(task, data_dir=ctx.data_dir, val_size=base.val_size)
        spec = model_spec(base, data)

        genes = model_name.startswith("genes")
        # --variants: a control needs the dense net and its lambda's loop run, so those train with it
        want_ctrl = {lam: not genes and ctx.wants(f"{model_name} torch-prune λ={lam:g}") for lam in lams}
        want_code_ctrl = {lam: ctx.wants(code_control(model_name, lam)) for lam in code_lams}
        want_loop = {lam: ctx.wants(f"{model_name} loop λ={lam:g}") for lam in lams}
        dense_dir = ctx.run_dir("compress", task, seed, f"{model_name}-dense")
        want_nnc = not (genes or ctx.headline) and any(ctx.wants(f"{model_name} nncodec qp={qp}") for qp in NNCODEC_QPS)
        if ctx.wants(f"{model_name} dense") or any(want_ctrl.values()) or any(want_code_ctrl.values()) or want_nnc:
            row = train_and_measure(ctx, base, dense_dir, extra=lambda m, d: file_row(
                m, spec, {}, dense_dir / "model.frugal"))
            if ctx.wants(f"{model_name} dense"):
                rows.append({**row, "variant": f"{model_name} dense"})

        if want_nnc:
            rows += nncodec_rows(ctx, base, dense_dir, model_name)
        for lam in lams:
            if not (want_loop[lam] or want_ctrl[lam]):
                continue
            run_dir = ctx.run_dir("compress", task, seed, f"{model_name}-loop-{lam:g}")
            hook = CompressInTheLoop(LoopConfig(every=every, lam=lam))

            def chosen_file(m, d, run_dir=run_dir, hook=hook):
                from frugal.coding.codecs import codec_from_spec

                codecs = {k: codec_from_spec(v) for k, v in hook.chosen.items()}
                out = file_row(m, spec, codecs, run_dir / "model.frugal")
                out["rounds"] = json.dumps([{k: r[k] for k in ("epoch", "bytes", "val_acc_after")}
                                            for r in hook.rounds])
                return out

            row = train_and_measure(ctx, base, run_dir, extra=chosen_file, hooks=[hook])
            if want_loop[lam]:
                rows.append({**row, "variant": f"{model_name} loop λ={lam:g}", "lam": lam})
            if not want_ctrl[lam]:
                continue  # (pruning the generators' parameters is not the control for genes: lenet5 is)
            sparsity = row["zero_fraction"]
            ctrl_dir = ctx.run_dir("compress", task, seed, f"{model_name}-torch-prune-{lam:g}")
            ctrl = torch_prune_control(ctx, base, dense_dir, sparsity, every, ctrl_dir)
            rows.append({**ctrl, "variant": f"{model_name} torch-prune λ={lam:g}", "lam": lam})
        for lam in code_lams:
            want = ctx.wants(f"{model_name} code λ={lam:g}")
            if not (want or want_code_ctrl[lam]):
                continue
            run_dir = ctx.run_dir("compress", task, seed, f"{model_name}-code-{lam:g}")
            row = learned_code_run(ctx, base, spec, lam, run_dir)
            if want:
                rows.append({**row, "variant": f"{model_name} code λ={lam:g}", "lam": lam})
            if want_code_ctrl[lam]:  # pruning to the same share of zeros, tuned and coded as the loop's control is
                ctrl_dir = ctx.run_dir("compress", task, seed, f"{model_name}-torch-prune-code-{lam:g}")
                ctrl = torch_prune_control(ctx, base, dense_dir, row["zero_fraction"], every, ctrl_dir)
                rows.append({**ctrl, "variant": code_control(model_name, lam), "lam": lam})
    for r in rows:
        keep_file(ctx, r, task, seed)
    return rows


KEEP_BYTES = 32 * 1024  # model files up to this size are kept beside results.json (out/files/)


def keep_file(ctx: BenchContext, row: dict[str, Any], task: str, seed: int) -> None:
    """A loop's or code's model file of at most KEEP_BYTES is copied to out/files/, named by task,
    variant and seed, so a published row's file is kept with it (`frugal eval FILE` reproduces the
    row's accuracy); `row["file"]` is its path within out/."""
    coded = " loop " in row["variant"] or " code " in row["variant"]
    if not coded or row.get("file_bytes", KEEP_BYTES + 1) > KEEP_BYTES:
        return
    src = ctx.out_dir / row["run_dir"] / "model.frugal"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{task_slug(task)}-{row['variant'].replace('λ=', 'lam')}-seed{seed}")
    dst = ctx.out_dir / "files" / f"{name}.frugal"
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst, src.read_bytes())
    row["file"] = str(dst.relative_to(ctx.out_dir))


def nncodec_rows(ctx: BenchContext, base: TrainConfig, dense_dir: Path, model_name: str) -> list[dict[str, Any]]:
    """The standard's coder on the plainly trained net: NNCodec at each of NNCODEC_QPS, its bitstream's
    bytes and the decoded net's accuracy. Skipped, with a note, where NNCodec is not installed."""
    from frugal.compress.peers import nncodec_decode, nncodec_encode, nncodec_status
    from frugal.train import load_run

    missing = nncodec_status()
    if missing is not None:
        ctx.note(f"compress: the NNCodec control rows are skipped: {missing}")
        return []
    data = load_task(base.task, data_dir=ctx.data_dir, val_size=base.val_size)
    model, cfg, _ = load_run(dense_dir, device=ctx.device)
    tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    rows = []
    for qp in NNCODEC_QPS:
        variant = f"{model_name} nncodec qp={qp}"
        if not ctx.wants(variant):
            continue
        bs = nncodec_encode(tensors, qp)
        coded, _, _ = load_run(dense_dir, device=ctx.device)
        coded.load_state_dict({**coded.state_dict(), **{k: v.to(ctx.device) for k, v in nncodec_decode(bs).items()}})
        row = measure(coded, data, ctx.device, data_dir=ctx.data_dir, speed=False)
        row.update(file_bytes=len(bs), zero_fraction=zero_fraction(coded), qp=qp, variant=variant,
                   **plan_fields(cfg, data), model=base.model, run_dir=str(dense_dir.relative_to(ctx.out_dir)))
        rows.append(row)
    return rows


def learned_code_run(ctx: BenchContext, base: TrainConfig, spec: dict, lam: float, run_dir: Path) -> dict[str, Any]:
    """Train `base` against its learned code's length at `lam`; measure the plain net the file decodes to."""
    from frugal.compress.rate import baked, code_of, folded, learn_code, plain_spec
    from frugal.train import build_model
    from frugal.utils import seed_everything

    data = load_task(base.task, data_dir=ctx.data_dir, val_size=base.val_size)
    seed_everything(base.seed)  # the net's first weights, as a run built from its config gets them
    model = build_model(spec)
    learn_code(model, lam=lam)
    res = train(base, run_dir, resume=(run_dir / "checkpoint.pt").exists(), model=model, data=data,
                quiet=ctx.quiet, progress=False)
    plain, codecs = baked(res.model)
    codecs = folded(plain, codecs)  # batch-norm statistics folded into the file's weights, not stored raw
    row = measure(plain, data, ctx.device, data_dir=ctx.data_dir, speed=ctx.budget != "tiny")
    row.update(file_row(plain, plain_spec(spec), codecs, run_dir / "model.frugal"), val_acc=res.val_acc,
               train_seconds=res.train_seconds, **plan_fields(base, data), model=base.model,
               run_dir=str(run_dir.relative_to(ctx.out_dir)),
               code=json.dumps({k: {f: round(v, 4) if isinstance(v, float) else v for f, v in t.items()}
                                for k, t in code_of(res.model).summary().items()}))
    return row
