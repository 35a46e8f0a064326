"""The bench report: tables (mean ± std over seeds) and plots, as report.md and report.html.

Everything is rebuilt from results.json (`frugal report DIR`); sample images of each task are drawn
by the bench into DIR/samples/ and reused here.
"""

from __future__ import annotations

import fnmatch
import html
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .methods import list_methods  # the registry (importing it loads no idea; listing does)
from .utils import atomic_write_text, read_json, save_figure

# (field, header, format) of the main table; accuracy columns are mean ± std over seeds
COLUMNS = [
    ("params", "params", "{:,.0f}"),
    ("nonzero_params", "non-zero", "{:,.0f}"),
    ("macs", "MACs/image", "{:,.0f}"),
    ("fp32_bytes", "fp32 bytes", "{:,.0f}"),
    ("zstd_bytes", "zstd bytes", "{:,.0f}"),
    ("latency_ms", "latency ms (b=1)", "{:.3f}"),
    ("throughput", "images/s (b=256)", "{:,.0f}"),
    ("train_seconds", "train s", "{:,.0f}"),
]


# fields every row must carry, and the type each must have (what the report computes with)
REQUIRED = {"method": str, "task": str, "seed": int, "test_acc": float}
NUMERIC = {"val_acc", "latency_ms", "corrupted_mean_acc", "file_bytes", *(k for k, _, _ in COLUMNS)}


def check_rows(rows: list[Any], path: Path) -> None:
    """Every row of a results file has the fields the report reads, of the right types: a ValueError
    naming the row and the field otherwise, never a KeyError from deep inside a table."""
    numeric, counted = set(NUMERIC), set()
    for m in list_methods().values():
        numeric |= {k for k, _, _ in m.fields} | {k for k, _ in m.plots}
        counted |= {k for k, _ in m.counts}

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for i, r in enumerate(rows):
        where = f"{path}: row {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where} is not an object; rerun the bench into a new --out folder")
        where += f" ({r.get('method', '?')}, {r.get('task', '?')}, seed {r.get('seed', '?')})"
        for key, kind in REQUIRED.items():
            v = r.get(key)
            ok = is_number(v) if kind is float else isinstance(v, kind) and not isinstance(v, bool)
            if not ok:
                raise ValueError(f"{where} lacks {key!r} as a {kind.__name__} (it has {v!r}); the file was not "
                                 "written by `frugal bench`, or was edited: rerun the bench into a new --out folder")
        bad = [k for k in numeric if r.get(k) is not None and not is_number(r[k])]
        if not isinstance(r.get("variant", ""), str):
            bad.append("variant")
        c = r.get("corrupted")
        if c is not None and not (isinstance(c, dict) and all(isinstance(k, str) and is_number(v) for k, v in c.items())):
            bad.append("corrupted")
        bad += [k for k in counted if r.get(k) is not None and parse_counts(r[k]) is None]
        if bad:
            raise ValueError(f"{where} has field(s) {sorted(bad)} of the wrong type; the file was not written by "
                             "`frugal bench`, or was edited: rerun the bench into a new --out folder")


MAX_COUNTED_VALUES = 1000  # a distribution field's distinct values; more is not a bench's row


def parse_counts(v: Any) -> dict[str, int] | None:
    """A distribution field ({value: count} as JSON text) as a dict, or None where it is not one."""
    if not isinstance(v, str) or len(v) > 64 * MAX_COUNTED_VALUES:
        return None
    try:
        d = json.loads(v)
    except ValueError:
        return None
    if not isinstance(d, dict) or len(d) > MAX_COUNTED_VALUES or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in d.values()):
        return None
    return d


def _value_order(v: str) -> tuple:
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def count_tables(rows: list[dict[str, Any]]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """Per method and distribution field (`counts`): each variant's share of the counted items at each
    value, summed over its seeds."""
    out = []
    for name, m in list_methods().items():
        for key, what in m.counts:
            groups = _variant_groups(rows, name, [key])
            if not groups:
                continue
            totals = {g: Counter() for g in groups}
            for g, rs in groups.items():
                for r in rs:
                    totals[g].update(parse_counts(r[key]) or {})
            values = sorted({v for c in totals.values() for v in c}, key=_value_order)
            body = []
            for (task, variant), c in sorted(totals.items()):
                n = sum(c.values())
                body.append([task, variant, str(len(groups[task, variant])), f"{n:,}"]
                            + [f"{c[v] / n:.1%}" if n and c[v] else "–" for v in values])
            out.append((f"Method `{name}`: {what} (share, summed over seeds)",
                        (["task", "variant", "seeds", "counted"] + values, body)))
    return out


def _mean_std(vals: list[float]) -> tuple[float, float]:
    a = np.asarray(vals, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (task, method, variant): accuracy mean ± std over seeds, the other fields'
    means, and latency as a ratio to the task's baseline measured in the same process."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], r.get("variant", r["method"]))].append(r)
    # the baseline's latency per (task, process, seed): ratios are taken within one process only,
    # against the baseline of the same seed where there is one, else the median over its seeds
    base_lat: dict[tuple, float] = {}
    for r in rows:
        if r["method"] == "baseline" and "latency_ms" in r:
            base_lat[(r["task"], r.get("process_id"), r["seed"])] = r["latency_ms"]

    def baseline_latency(r: dict) -> float | None:
        same = base_lat.get((r["task"], r.get("process_id"), r["seed"]))
        if same is not None:
            return same
        others = [v for (t, p, _), v in base_lat.items() if (t, p) == (r["task"], r.get("process_id"))]
        return float(np.median(others)) if others else None

    out = []
    for (task, method, variant), rs in sorted(groups.items()):
        acc_m, acc_s = _mean_std([r["test_acc"] for r in rs])
        e = {"task": task, "method": method, "variant": variant, "n": len(rs),
             "seeds": sorted(r["seed"] for r in rs), "test_acc_mean": acc_m, "test_acc_std": acc_s,
             "plan": " / ".join(sorted({plan_of(r) for r in rs}))}
        for key, _, _ in COLUMNS:
            vals = [r[key] for r in rs if key in r]
            if vals:
                e[key] = float(np.mean(vals))
        # the size to plot: a method's real compressed file where it wrote one, else zstd of the fp32 weights
        sizes = [r.get("file_bytes", r.get("zstd_bytes")) for r in rs]
        if all(v is not None for v in sizes):
            e["plot_bytes"] = float(np.mean(sizes))
        ratios = [r["latency_ms"] / b for r in rs if "latency_ms" in r and (b := baseline_latency(r))]
        if ratios:
            e["latency_vs_baseline"] = float(np.mean(ratios))
        corr = [r["corrupted_mean_acc"] for r in rs if "corrupted_mean_acc" in r]
        if corr:
            e["corrupted_mean"], e["corrupted_std"] = _mean_std(corr)
        out.append(e)
    return out


TOLERANCE = 0.005  # accuracy within half a point of the reference counts as kept (pick="cheapest")
COST_NAMES = {"macs": "MACs/image", "file_bytes": "file bytes", "conv_free_params": "conv free params",
              "train_seconds": "train s", "params": "params"}
METRIC_NAMES = {"test_acc": "test acc", "corrupted_mean_acc": "corrupted acc"}


def _variant_stats(rows: list[dict[str, Any]], metric: str, cost: str) -> dict[str, dict[str, Any]]:
    """Per variant: metric mean and std over seeds, mean cost, mean latency, seeds."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r.get("variant", r["method"])].append(r)
    out = {}
    for v, rs in by.items():
        vals = [r[metric] for r in rs if isinstance(r.get(metric), (int, float))]
        if not vals:
            continue
        m, sd = _mean_std(vals)
        costs = [r[cost] for r in rs if isinstance(r.get(cost), (int, float))]
        lat = [r["latency_ms"] for r in rs if isinstance(r.get("latency_ms"), (int, float))]
        thr = [r["throughput"] for r in rs if isinstance(r.get("throughput"), (int, float))]
        out[v] = {"variant": v, "mean": m, "std": sd, "n": len(vals), "cost": float(np.mean(costs)) if costs else None,
                  "latency": float(np.mean(lat)) if lat else None, "throughput": float(np.mean(thr)) if thr else None}
    return out


def _matching(stats: dict[str, dict], globs: str) -> list[dict]:
    pats = [g.strip() for g in globs.split("|")]
    return [e for v, e in stats.items() if any(fnmatch.fnmatchcase(v, p) for p in pats)]


def summary_lines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (method with a Summary, task): its best idea row against the reference and the
    fair control, and a verdict on the metric (beats / matches / loses the control: apart by more
    than the larger std over seeds, or 0.1 point)."""
    out = []
    for name, m in list_methods().items():
        sm = m.summary
        if sm is None:
            continue
        for task in sorted({r["task"] for r in rows if r["method"] == name}):
            stats = _variant_stats([r for r in rows if r["method"] == name and r["task"] == task], sm.metric, sm.cost)
            refs = _matching(stats, sm.reference)
            ref = refs[0] if refs else None
            ideas = _matching(stats, sm.idea)
            if ref is None or not ideas:
                continue
            if sm.pick == "cheapest":
                kept = [e for e in ideas if e["cost"] is not None and e["mean"] >= ref["mean"] - TOLERANCE]
                idea = min(kept, key=lambda e: e["cost"]) if kept else max(ideas, key=lambda e: e["mean"])
            else:
                idea = max(ideas, key=lambda e: e["mean"])
            control = ref
            if sm.control:
                ctrls = _matching(stats, sm.control)
                if ctrls:
                    control = min(ctrls, key=lambda e: abs((e["cost"] or 0) - (idea["cost"] or 0)))
            diff = idea["mean"] - control["mean"]
            tol = max(idea["std"], control["std"], 0.001)
            verdict = "beats" if diff > tol else "loses to" if diff < -tol else "matches"
            out.append({"method": name, "task": task, "claim": sm.claim, "metric": sm.metric, "cost": sm.cost,
                        "idea": idea, "reference": ref, "control": control, "verdict": verdict,
                        "control_is_reference": control is ref, "published": sm.published})
    return out


def _point(e: dict, metric: str, cost: str) -> str:
    acc = f"{100 * e['mean']:.2f}" + (f" ± {100 * e['std']:.2f}" if e["n"] > 1 else "")
    acc += f"% {METRIC_NAMES.get(metric, metric)}"
    c = f", {e['cost']:,.0f} {COST_NAMES.get(cost, cost)}" if e["cost"] is not None else ""
    return f"{e['variant']}: {acc}{c}"


def published_line(method: str, folder: str) -> str:
    """The idea's line computed from its full-budget `results/` folder (in a source checkout), or the
    folder's name where it is not at hand."""
    res_path = Path(__file__).resolve().parent.parent / folder / "results.json"
    if not res_path.exists():
        return folder
    res = read_json(res_path, "rebuild it with the command in its README")
    if not isinstance(res, dict) or "meta" not in res or not res.get("rows"):  # a benchmark script's: the folder says
        return folder
    rows = res["rows"]
    lines = [ln for ln in summary_lines(rows) if ln["method"] == method]
    text = "; ".join(f"{ln['task']}: {_point(ln['idea'], ln['metric'], ln['cost'])} "
                     f"({ln['verdict']} {'the plain net' if ln['control_is_reference'] else ln['control']['variant']})"
                     for ln in lines)
    return f"{text} ({folder})" if text else folder


def summary_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """The report's first table: one line per idea and task (see summary_lines)."""
    lines = summary_lines(rows)
    if not lines:
        return None

    header = ["idea", "claim", "task", "best point", "plain net", "fair control",
              "measured speed-up vs plain (batch 256 / batch 1)",
              "verdict (against the control)", "full budget (results/)"]
    body = []
    for ln in lines:
        i, r, c = ln["idea"], ln["reference"], ln["control"]
        big = f"{i['throughput'] / r['throughput']:.2f}x" if i["throughput"] and r["throughput"] else "–"
        one = f"{r['latency'] / i['latency']:.2f}x" if i["latency"] and r["latency"] else "–"
        speed = f"{big} / {one}"
        pub = ln["published"]
        body.append([ln["method"], ln["claim"], ln["task"], _point(i, ln["metric"], ln["cost"]),
                     _point(r, ln["metric"], ln["cost"]),
                     "(the plain net)" if ln["control_is_reference"] else _point(c, ln["metric"], ln["cost"]),
                     speed, ln["verdict"], published_line(ln["method"], pub) if pub else "–"])
    return header, body


def plan_of(row: dict[str, Any]) -> str:
    """A row's training plan as the report prints it: epochs x training examples."""
    ep, n = row.get("epochs"), row.get("train_examples")
    if ep is None:
        return "–"
    return f"{ep:g} ep" + (f" × {n:,}" if isinstance(n, int) else "")


def plan_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (task, model) whose rows were trained on different plans (say a method's own
    plan beside the baseline's), so that no comparison across them goes unremarked."""
    plans: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        if r.get("model") and r.get("epochs") is not None:
            plans[(r["task"], r["model"])][plan_of(r)].add(f"{r['method']}: {r.get('variant', r['method'])}")
    return [f"{task}, model `{model}`: " + "; ".join(f"{p} ({', '.join(sorted(v))})" for p, v in sorted(by.items()))
            for (task, model), by in sorted(plans.items()) if len(by) > 1]


def _variant_groups(rows: list[dict[str, Any]], method: str, keys) -> dict[tuple, list[dict]]:
    """A method's rows that carry any of `keys`, grouped by (task, variant): one entry per seed."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] == method and any(r.get(k) is not None for k in keys):
            groups[(r["task"], r.get("variant", method))].append(r)
    return groups


def _accuracy_axes(ax, title: str, xlabel: str) -> None:
    """The common dress of an accuracy-against-cost panel: log x, the y axis ending at 100%."""
    ax.set_xscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, min(hi, 100.2))  # accuracy ends at 100%
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy %")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7)


def method_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Per registered method that declares `plots`: per field, test accuracy (mean ± std over
    seeds) against the field's mean, one panel per task, one marker per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, m in list_methods().items():
        for key, label in m.plots:
            groups = _variant_groups(rows, name, (key,))
            tasks = sorted({t for t, _ in groups})
            if not tasks:
                continue
            fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
            for ax, task in zip(axes[0], tasks):
                for (t, variant), rs in sorted(groups.items()):
                    if t != task:
                        continue
                    acc, std = _mean_std([r["test_acc"] for r in rs])
                    ax.errorbar(float(np.mean([r[key] for r in rs])), 100 * acc, yerr=100 * std, fmt="o", capsize=3,
                                label=variant)
                _accuracy_axes(ax, f"{task}: {name}", label)
            fig.tight_layout()
            written.append(save_figure(fig, out / f"{name}_acc_vs_{key}.png"))
    return written


def _fmt(e: dict, key: str, fmt: str) -> str:
    return fmt.format(e[key]) if key in e and e[key] is not None and not math.isnan(e[key]) else "–"


def table_rows(agg: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["task", "method", "variant", "plan", "seeds", "test acc % (mean ± std)"] + [h for _, h, _ in COLUMNS] + [
        "latency / baseline", "corrupted acc %"]
    body = []
    for e in agg:
        cells = [e["task"], e["method"], e["variant"], e.get("plan", "–"), str(e["n"]),
                 f"{100 * e['test_acc_mean']:.2f} ± {100 * e['test_acc_std']:.2f}" if e["n"] > 1
                 else f"{100 * e['test_acc_mean']:.2f}"]
        cells += [_fmt(e, k, f) for k, _, f in COLUMNS]
        cells.append(f"{e['latency_vs_baseline']:.2f}x" if "latency_vs_baseline" in e else "–")
        cells.append("–" if "corrupted_mean" not in e else f"{100 * e['corrupted_mean']:.2f}" + (
            f" ± {100 * e['corrupted_std']:.2f}" if e["n"] > 1 else ""))
        body.append(cells)
    return header, body


def method_tables(rows: list[dict[str, Any]]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """Per registered method that declares its own fields: a table of their means (± std where a
    field has more than one seed)."""
    out = []
    for name, m in list_methods().items():
        groups = _variant_groups(rows, name, [k for k, _, _ in m.fields])
        if not groups:
            continue
        header = ["task", "variant", "seeds"] + [h for _, h, _ in m.fields]
        body = []
        for (task, variant), rs in sorted(groups.items()):
            cells = []
            for k, _, f in m.fields:
                vals = [r[k] for r in rs if r.get(k) is not None]
                mean, std = _mean_std(vals) if vals else (None, 0.0)
                cells.append(_fmt({k: mean}, k, f) + (f" ± {f.format(std)}" if len(vals) > 1 else ""))
            body.append([task, variant, str(len(rs))] + cells)
        out.append((f"Method `{name}`: its own measurements (mean ± std over seeds)", (header, body)))
    return out


def plot_tradeoffs(agg: list[dict[str, Any]], out: Path) -> list[Path]:
    """Per task, accuracy vs MACs and accuracy vs bytes (log x), one marker per (method, variant)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list_methods()
    refs: dict[str, list] = defaultdict(list)  # task -> published points of the methods in this report
    for name in sorted({e["method"] for e in agg}):
        for task, points in ((methods[name].references or {}) if name in methods else {}).items():
            refs[task] += points
    written = []
    tasks = sorted({e["task"] for e in agg})
    for xkey, xlabel, fname in [("macs", "multiply-adds per image", "acc_vs_macs.png"),
                                ("plot_bytes", "bytes (compressed file, else zstd of fp32)", "acc_vs_bytes.png")]:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for e in (e for e in agg if e["task"] == task and e.get(xkey)):
                ax.errorbar(e[xkey], 100 * e["test_acc_mean"], yerr=100 * e["test_acc_std"], fmt="o", capsize=3,
                            label=f"{e['method']}: {e['variant']}" if e["variant"] != e["method"] else e["method"])
            if xkey == "plot_bytes":
                for label, acc, size in refs.get(task, []):
                    ax.plot(size, 100 * acc, "k*", markersize=8)
                    ax.annotate(label, (size, 100 * acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
            _accuracy_axes(ax, task, xlabel)
        fig.tight_layout()
        written.append(save_figure(fig, out / fname))
    return written


def write_task_samples(out: Path, task: str, n: int = 16, data_dir=None) -> Path | None:
    """A grid of the first n test images of a task, with labels, in out/samples/<task>.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import load_task, task_slug

    path = Path(out) / "samples" / f"{task_slug(task)}.png"
    if path.exists():
        return path
    data = load_task(task, data_dir=data_dir)
    x, y = data.test.x[:n], data.test.y[:n]
    cols = 8
    rows = math.ceil(len(x) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(x):
            img = x[i].permute(1, 2, 0).numpy()  # (H, W, C)
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(str(int(y[i])), fontsize=8)
    fig.suptitle(f"{task}: test images and labels", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def corrupted_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """Accuracy % per corruption (a row) and severity (a column), mean over seeds, for each
    (task, method, variant); splits named without a severity go in the "–" column."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("corrupted"):
            groups[(r["task"], r["method"], r.get("variant", r["method"]))].append(r["corrupted"])
    if not groups:
        return None

    def split(name: str) -> tuple[str, str]:
        m = re.fullmatch(r"(.+)-s(\d+)", name)
        return (m.group(1), f"s{m.group(2)}") if m else (name, "–")

    severities = sorted({split(k)[1] for cs in groups.values() for c in cs for k in c})
    header = ["task", "method", "variant", "seeds", "corruption", *severities, "mean"]
    body = []
    for key, cs in sorted(groups.items()):
        for corruption in sorted({split(k)[0] for c in cs for k in c}):
            cells, accs = [], []
            for sev in severities:
                name = corruption if sev == "–" else f"{corruption}-{sev}"
                vals = [c[name] for c in cs if name in c]
                cells.append(f"{100 * np.mean(vals):.1f}" if vals else "–")
                if vals:
                    accs.append(float(np.mean(vals)))
            body.append([*key, str(len(cs)), corruption, *cells, f"{100 * np.mean(accs):.1f}"])
    return header, body


def corrupted_by_variant(rows: list[dict[str, Any]]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """Per (task, method) with two or more variants measured on a corrupted suite: accuracy % per
    corruption (a row) for each variant (a column), mean over severities and seeds, so that the
    variants' robustness can be read side by side; the last row is the mean over the suite."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("corrupted"):
            groups[(r["task"], r["method"])][r.get("variant", r["method"])].append(r["corrupted"])
    out = []
    for (task, method), variants in sorted(groups.items()):
        if len(variants) < 2:
            continue
        names = list(variants)  # in the order the method wrote them
        per = {v: defaultdict(list) for v in names}  # variant -> corruption -> accuracies (severities x seeds)
        for v in names:
            for c in variants[v]:
                for split, acc in c.items():
                    per[v][re.sub(r"-s\d+$", "", split)].append(acc)
        corruptions = sorted({c for v in names for c in per[v]})
        body = [[c] + [f"{100 * np.mean(per[v][c]):.1f}" if per[v][c] else "–" for v in names] for c in corruptions]
        body.append(["mean"] + [f"{100 * np.mean([a for c in variants[v] for a in c.values()]):.1f}" for v in names])
        header = ["corruption"] + [f"{v} ({len(variants[v])} seed{'s' if len(variants[v]) > 1 else ''})" for v in names]
        out.append((f"Corrupted suite, {task}, `{method}`: variants side by side (accuracy %, mean over severities "
                    "and seeds)", (header, body)))
    return out


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in body]


def _html_table(header: list[str], body: list[list[str]]) -> list[str]:
    esc = html.escape
    return (["<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>"]
            + ["<tr>" + "".join(f"<td>{esc(x)}</td>" for x in c) + "</tr>" for c in body] + ["</table>"])


def write_report(out: str | Path) -> tuple[Path, Path]:
    """Rebuild report.md and report.html in `out` from out/results.json."""
    out = Path(out)
    res_path = out / "results.json"
    if not res_path.exists():
        raise FileNotFoundError(f"no results.json in {out}; run `frugal bench --out {out}` first")
    results = read_json(res_path, "it is not a frugal results file; rebuild it with `frugal bench --out DIR`")
    if isinstance(results, dict) and isinstance(results.get("benchmark"), str) and "meta" not in results:
        return write_benchmark_report(out, results)
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise ValueError(f"{res_path} is not a frugal results file (no list of rows); rebuild it with "
                         f"`frugal bench --out {out}`")
    rows = results["rows"]
    check_rows(rows, res_path)
    if not isinstance(results.get("meta", {}), dict):
        raise ValueError(f"{res_path}: 'meta' must be an object; rebuild it with `frugal bench --out {out}`")
    if not rows:
        raise ValueError(f"{res_path} holds no rows yet; the bench has not finished a run")
    agg = aggregate(rows)
    plots = [p.name for p in plot_tradeoffs(agg, out) + method_plots(rows, out)]
    samples = ([f"samples/{p.name}" for p in sorted((out / "samples").glob("*.png"))]
               if (out / "samples").exists() else [])
    meta = results.get("meta", {})
    cfg, ver = meta.get("config", {}), meta.get("versions", {})
    threads = ver.get("torch_threads", "?")
    intro = (f"Budget `{cfg.get('budget', '?')}`, device `{meta.get('device', '?')}`, "
             f"{threads} thread{'' if threads == '1' else 's'}, torch {ver.get('torch', '?')}; "
             f"updated {meta.get('updated', '?')}. Accuracy is on the test split, mean ± std over seeds; "
             "MACs are multiply-adds counted from the ops that ran; bytes are len() of real encodings; "
             "latency is a median at batch 1 on this machine, comparable only as a ratio within one process.")

    # sections: (title, table or None, images)
    sections: list[tuple[str, tuple | None, list[str]]] = []
    summary = summary_table(rows)
    if summary:
        sections.append(("Summary: each idea's best point against the plain net and its fair control", summary, []))
    sections += [("Every row", table_rows(agg), []), ("Trade-offs", None, plots)]
    sections += [(title, table, []) for title, table in method_tables(rows) + count_tables(rows)]
    corr = corrupted_table(rows)
    if corr:
        sections += [(title, table, []) for title, table in corrupted_by_variant(rows)]
        sections.append(("Corrupted test suites (accuracy % by severity, mean over seeds)", corr, []))
    figures = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() else []
    if figures:
        sections.append(("Figures", None, [f"figures/{p.name}" for p in figures]))
    if samples:
        sections.append(("Tasks", None, samples))

    notes = plan_notes(rows)
    md = ["# frugal bench report", "", intro]
    h = ["<!doctype html><meta charset='utf-8'><title>frugal bench report</title>",
         "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:nth-child(-n+3){text-align:left}"
         "img{max-width:100%}</style>",
         "<h1>frugal bench report</h1>", f"<p>{html.escape(intro)}</p>"]
    for title, table, images in sections:
        if title == "Every row" and notes:  # after the summary: which rows were trained on other plans
            lead = ("The plan column gives each row's epochs and training examples. These models were trained on "
                    "more than one plan; compare their rows with that in mind:")
            md += ["", lead, ""] + [f"- {n}" for n in notes]
            h += [f"<p>{html.escape(lead)}</p><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
        if title:
            md += ["", f"## {title}"]
            h.append(f"<h2>{html.escape(title)}</h2>")
        if table:
            md += [""] + _md_table(*table)
            h += _html_table(*table)
        if images:
            md += [""] + [f"![{Path(i).stem}]({i})" for i in images]
            h += [f"<img src='{html.escape(i)}' alt='{html.escape(Path(i).stem)}'>" for i in images]
    md_path = atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    html_path = atomic_write_text(out / "report.html", "\n".join(h) + "\n")
    return md_path, html_path


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def write_benchmark_report(out: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """report.md / report.html of a benchmark script's results.json (`frugal.benchmarks.*`, which
    records its `benchmark` name and `command`): its scalar figures in one table, then one table per
    object of figures (an object of objects becomes rows x columns). Nested data beyond that is left
    to the JSON."""
    title = f"frugal benchmark `{results['benchmark']}`"
    intro = f"Command: `{results.get('command', '?')}`. Every figure below is in results.json."
    scalars = [[k, _cell(v)] for k, v in results.items() if _scalar(v) and k not in ("benchmark", "command")]
    sections: list[tuple[str, tuple[list[str], list[list[str]]]]] = [("", (["figure", "value"], scalars))]
    for key, v in results.items():
        if not isinstance(v, dict) or not v or key == "versions":
            continue
        if all(_scalar(x) for x in v.values()):
            sections.append((key, (["", key], [[k, _cell(x)] for k, x in v.items()])))
        elif all(isinstance(x, dict) and all(_scalar(y) for y in x.values()) for x in v.values()):
            cols = list(dict.fromkeys(c for x in v.values() for c in x))
            sections.append((key, ([""] + cols, [[k] + [_cell(x.get(c, "–")) for c in cols] for k, x in v.items()])))
    for key, v in results.items():  # a list of rows of figures: one table
        if isinstance(v, list) and v and all(isinstance(x, dict) and all(_scalar(y) for y in x.values()) for x in v):
            cols = list(dict.fromkeys(c for x in v for c in x))
            sections.append((key, (cols, [[_cell(x.get(c, "–")) for c in cols] for x in v])))
    versions = results.get("versions")
    if isinstance(versions, dict):
        intro += " Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if _scalar(v)) + "."
    md = [f"# {title}", "", intro]
    h = ["<!doctype html><meta charset='utf-8'><title>frugal benchmark report</title>",
         f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for name, table in sections:
        if name:
            md += ["", f"## {name}"]
            h.append(f"<h2>{html.escape(name)}</h2>")
        md += [""] + _md_table(*table)
        h += _html_table(*table)
    return (atomic_write_text(out / "report.md", "\n".join(md) + "\n"),
            atomic_write_text(out / "report.html", "\n".join(h) + "\n"))
