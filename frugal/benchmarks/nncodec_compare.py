"""frugal's post-hoc coder against NNCodec (ISO/IEC 15938-17) on the same trained weights.

For each run folder (a plainly trained net, a loop run, or a run trained against its learned code,
which is first baked into its plain net), the run's own file where it has one ("frugal run"), and
both tools code every tensor at a sweep of their step (NNCodec: its qp; frugal: one step for all
weights with RDOQ at a few strengths, and "allocated": each tensor's step and RDOQ strength chosen
by its bytes against its Fisher-weighted error, the run's own code among the choices). Each point
is decoded and its test accuracy measured. Batch norms are folded first (`fold_batchnorm`), for
both tools. Printed: both fronts, and each tool's smallest file within
0.1 and within 0.5 points of the run's own accuracy. frugal's bytes are a whole `.frugal` file
(header, architecture, checksum); NNCodec's are its bitstream.

    python -m frugal.benchmarks.nncodec_compare --run RUN [RUN ...] [--transform none conv]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from frugal.benchmarks import add_out_arg, add_where_args, publish, where
from frugal.compress.peers import (ALPHAS, NNCODEC_INSTALL, QPS, STEPS, allocated_front, frugal_front, model_options,
                                   nncodec_front, nncodec_status, smallest_within)
from frugal.utils import versions

MARGINS = (0.1, 0.5)  # percentage points of accuracy a file may lose


def compare(run: str, device, steps, alphas, qps, transforms, data_dir=None) -> dict:
    from frugal.coding.codecs import codec_from_spec
    from frugal.compress.container import encode_model
    from frugal.compress.loop import CHOSEN
    from frugal.compress.rate import baked, code_of, fold_batchnorm, plain_spec
    from frugal.data import load_task
    from frugal.train import evaluate, load_run

    model, cfg, _ = load_run(run, device=device)
    spec = json.loads((Path(run) / "config.json").read_text())["model_spec"]
    own = None  # the run's own codes: its learned code, or the codes the discrete loop chose
    if code_of(model) is not None:
        model, own = baked(model)
        spec = plain_spec(spec)
    elif (Path(run) / CHOSEN).exists():
        own = {k: codec_from_spec(v) for k, v in json.loads((Path(run) / CHOSEN).read_text())["codecs"].items()}
    data = load_task(cfg.task, data_dir=data_dir or cfg.data_dir, val_size=cfg.val_size)
    acc = evaluate(model, data.test, data.mean, data.std, device)[0]
    fronts = {}
    if own is not None:  # the file the run itself writes: the weights as they are, so at the run's accuracy
        fronts["frugal run"] = [{"tool": "frugal run", "bytes": len(encode_model(model, spec, own)), "test_acc": acc}]
    folded = fold_batchnorm(model)  # both tools code the same folded tensors: no batch-norm statistics to spend on
    fronts["nncodec"] = nncodec_front(model, data, device, qps)
    for t in transforms:
        fronts[f"frugal {t}"] = frugal_front(model, spec, data, device, steps, alphas, transform=t, extra=folded)
        options = model_options(model, data, device, steps, alphas, transform=t, own=own)
        fronts[f"frugal allocated {t}"] = allocated_front(model, spec, data, device, options, extra=folded,
                                                          label=f"frugal allocated {t}")
    within = {}
    for margin in MARGINS:
        best = {tool: smallest_within(points, acc, margin) for tool, points in fronts.items()}
        within[f"{margin:g}"] = {tool: None if p is None else {"bytes": p["bytes"], "test_acc": p["test_acc"]}
                                 for tool, p in best.items()}
    return {"run": run, "task": cfg.task, "model": cfg.model, "test_acc": acc, "within": within, "fronts": fronts}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", nargs="+", required=True, help="finished run folders")
    p.add_argument("--transform", nargs="+", default=["none"], choices=["none", "conv"],
                   help="frugal's transforms to sweep: none, or conv (kernels in their DCT)")
    p.add_argument("--steps", type=float, nargs="+", default=list(STEPS), help="frugal's steps (weight units)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="frugal's RDOQ strengths")
    p.add_argument("--qps", type=int, nargs="+", default=list(QPS), help="NNCodec's quantisation parameters")
    add_where_args(p)
    add_out_arg(p)
    a = p.parse_args(argv)
    missing = nncodec_status()
    if missing is not None:
        raise SystemExit(f"nncodec_compare needs NNCodec: {missing}")
    device = where(a)
    runs = [compare(r, device, a.steps, a.alphas, a.qps, a.transform, a.data_dir) for r in a.run]
    for r in runs:
        for margin, best in r["within"].items():
            line = ", ".join(f"{tool} {'-' if b is None else format(b['bytes'], ',') + ' B'}" for tool, b in best.items())
            print(f"{r['run']}: smallest file within {margin} points of {r['test_acc']:.4f}: {line}")
    # flat rows, which `frugal report` renders as tables: the smallest files, then every point
    within = [{"run": r["run"], "test_acc": r["test_acc"], "margin_points": float(m), "tool": tool,
               "bytes": None if b is None else b["bytes"], "coded_test_acc": None if b is None else b["test_acc"]}
              for r in runs for m, best in r["within"].items() for tool, b in best.items()]
    points = [{"run": r["run"], "tool": tool, **{k: p.get(k) for k in ("qp", "step", "alpha", "bytes", "test_acc")}}
              for r in runs for tool, pts in r["fronts"].items() for p in pts]
    return publish({"install": NNCODEC_INSTALL, "within": within, "points": points, "versions": versions()},
                   "frugal.benchmarks.nncodec_compare", argv, a.out)


if __name__ == "__main__":
    main()
