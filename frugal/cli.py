"""The `frugal` command: parses arguments, calls the library, prints. Nothing here that Python can't call."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import yaml

from .utils import json_extent


def _cmd_data(a: argparse.Namespace) -> int:
    from .data import fetch, format_dataset_table, list_datasets

    if a.data_cmd == "list":
        print(format_dataset_table(list_datasets(a.data_dir)))
    else:
        for name in a.names:
            path = fetch(name, data_dir=a.data_dir, force=a.force)
            print(f"{name}: ready in {path}")
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from .models import count_params, create_model, describe_model, list_models

    for name in list_models():
        n = count_params(create_model(name))
        print(f"{name:10s} {n:>9,d} params on 1x28x28  {describe_model(name)}")
    return 0


def _train_config(a: argparse.Namespace):
    from .train import TrainConfig

    d = {}
    if a.config:
        try:
            d = yaml.safe_load(Path(a.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read config {a.config}: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"config {a.config} must be a mapping of TrainConfig fields")
        if json_extent(d, max_nodes=10_000)[1] > 10_000:  # YAML aliases can make a small file expand without bound
            raise ValueError(f"config {a.config} expands to more than 10,000 values; a config is a short mapping of "
                             "TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        v = getattr(a, f.name, None)
        if v is not None and f.name != "model_kw":
            d[f.name] = v
    if a.model_kw:
        try:
            kw = json.loads(a.model_kw)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-kw {a.model_kw!r} is not valid JSON ({e.msg}, column {e.colno}); give a JSON "
                             'object of model options, e.g. \'{"width": 64}\'') from None
        if not isinstance(kw, dict):
            raise ValueError(f"--model-kw must be a JSON object of model options, e.g. '{{\"width\": 64}}', "
                             f"got {a.model_kw!r}")
        d["model_kw"] = {**(d.get("model_kw") or {}), **kw}
    return TrainConfig.from_dict(d)


_FLAG_TYPES = {"int": int, "float": float, "str": str}


def add_config_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """One flag per field of a config dataclass, typed by its annotation, with the field's help text
    (and its default): a new setting is added to the config alone. A dict field takes JSON."""
    for f in dataclasses.fields(config):
        kinds = [k.strip() for k in str(f.type).split("|") if k.strip() != "None"]
        kind = _FLAG_TYPES.get(kinds[0], str) if kinds[0] != "dict" else str
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "") + (f" (default {default})" if default not in (None, "", False) else "")
        if kinds[0] == "bool":  # a switch: present or not
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_const", const=True, default=None,
                                help=text)
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=text)


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import train

    cfg = _train_config(a)
    res = train(cfg, a.out, resume=a.resume)
    print(json.dumps({"run_dir": str(res.run_dir), "test_acc": res.test_acc, "val_acc": res.val_acc,
                      "train_seconds": round(res.train_seconds, 2)}, indent=2))
    return 0


def _cmd_measure(a: argparse.Namespace) -> int:
    from .data import load_task
    from .measure import measure
    from .train import load_run
    from .utils import atomic_write_json, resolve_device

    device = resolve_device(a.device)
    model, cfg, _ = load_run(a.run, device=device)
    data = load_task(cfg.task, data_dir=a.data_dir or cfg.data_dir, val_size=cfg.val_size)
    row = measure(model, data, device, corrupted=a.corrupted, data_dir=a.data_dir or cfg.data_dir)
    row.update(run=str(a.run), task=cfg.task, model=cfg.model)
    atomic_write_json(Path(a.run) / "measure.json", row)
    print(json.dumps(row, indent=2))
    return 0


def _cmd_explain(a: argparse.Namespace) -> int:
    from .data import load_task, task_slug
    from .train import load_run, normalize
    from .utils import resolve_device

    device = resolve_device(a.device)
    model, cfg, _ = load_run(a.run, device=device)
    if not callable(getattr(model, "explain", None)):
        raise ValueError(f"model {cfg.model!r} has no attention to explain; `frugal explain` works for "
                         "models that choose where to look (saccadic, ram)")
    data = load_task(a.data or cfg.task, data_dir=a.data_dir or cfg.data_dir)
    images, labels = data.test.x[:a.n], data.test.y[:a.n]
    x = normalize(images.to(device), data.mean, data.std, next(model.parameters()).dtype)
    out = a.out or str(Path(a.run) / f"explain-{task_slug(data.name)}.png")
    print(f"explanations: {model.explain(x, images, labels, out)}")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench import BenchConfig, bench

    budget = a.budget or ("quick" if a.quick else "full")
    seeds = a.seeds if a.seeds is not None else (1 if budget != "full" else 3)
    from .bench import list_methods

    headline = budget == "quick" and not a.methods and not a.tasks  # the front door
    methods = tuple(list_methods()) if a.methods == ["all"] or headline else tuple(a.methods or ["baseline"])
    cfg = BenchConfig(out=a.out, budget=budget, methods=methods, tasks=tuple(a.tasks or ()),
                      seeds=seeds, device=a.device, data_dir=a.data_dir, corrupted=a.corrupted,
                      threads=a.threads, verbose=a.verbose, variants=tuple(a.variants or ()), model=a.model,
                      headline=headline, executor=a.executor, jobs=a.jobs, address=a.address, retries=a.retries)
    path = bench(cfg, log=lambda s: print(s, flush=True))
    print(f"results: {path}\nreport:  {path.parent / 'report.md'} and {path.parent / 'report.html'}")
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report

    md, html = write_report(a.dir)
    print(f"report: {md} and {html}")
    return 0


# Commands the ideas add: name -> (help, add_arguments(parser), run(namespace) -> exit code)
_IDEA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int]) -> None:
    """An idea's own subcommand (e.g. `frugal compress`), parsed and error-handled like the rest."""
    if name in _IDEA_COMMANDS or name in COMMANDS:
        raise ValueError(f"command {name!r} is registered twice")
    _IDEA_COMMANDS[name] = (help, add_arguments, run)


def build_parser() -> argparse.ArgumentParser:
    from .plugins import load_ideas

    load_ideas()
    from .bench import list_methods
    from .data import KNOWN

    p = argparse.ArgumentParser(prog="frugal", description="Cheaper CNNs, measured against a standard CNN.")
    p.add_argument("--trust-model", action="append", default=[], metavar="MODULE",
                   help="let run folders and model files name models from this module (an import path like "
                        "'mypkg.nets:MyNet' runs its code); repeatable; also FRUGAL_TRUST_MODELS=mod1,mod2")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="list or fetch data sets")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dl = dsub.add_parser("list", help="each data set, where it comes from, whether it is cached")
    dl.add_argument("--data-dir", default=None)
    df = dsub.add_parser("fetch", help="fetch (or generate) and verify data sets")
    df.add_argument("names", nargs="+")
    df.add_argument("--force", action="store_true", help="fetch again even when cached")
    df.add_argument("--data-dir", default=None)

    sub.add_parser("models", help="list registered models")

    from .train import TrainConfig

    t = sub.add_parser("train", help="train one model on one task")
    t.add_argument("--config", help="YAML file of TrainConfig fields; flags override it")
    add_config_flags(t, TrainConfig)
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    m = sub.add_parser("measure", help="measure a finished run: accuracy, params, MACs, bytes, speed")
    m.add_argument("run", help="run folder written by `frugal train`")
    m.add_argument("--corrupted", action="store_true", help="also accuracy on the corrupted test suites")
    m.add_argument("--device", default="auto")
    m.add_argument("--data-dir")

    e = sub.add_parser("explain", help="draw where an attention model looked, for each prediction")
    e.add_argument("run", help="run folder of a saccadic or ram model")
    e.add_argument("--data", help="task whose test images to explain (default: the run's task)")
    e.add_argument("--n", type=int, default=16, help="how many test images")
    e.add_argument("--out", help="PNG path (default: RUN/explain-TASK.png)")
    e.add_argument("--device", default="auto")
    e.add_argument("--data-dir")

    b = sub.add_parser("bench", help="the main job: methods x tasks x seeds, measured, with a report")
    b.add_argument("--quick", action="store_true",
                   help="short training; without --methods and --tasks, every idea's headline comparison with its "
                        "control (about 15 minutes on 2 CPU cores)")
    b.add_argument("--budget", choices=["tiny", "quick", "full"], help=argparse.SUPPRESS)
    b.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"bench methods to run, or 'all': {', '.join(list_methods())} (default: baseline; with "
                        "--quick alone, all of them on their headline tasks)")
    b.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"tasks: {', '.join(t for t in KNOWN if not t.endswith('-c'))}, or folder:/path/to/your/data "
                        "(default: each method's own)")
    b.add_argument("--seeds", type=int, help="seeds per method and task (default: 1 quick, 3 full)")
    b.add_argument("--out", default="bench-out", help="output folder; run again with the same one to resume "
                                                       "(default: bench-out)")
    b.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    b.add_argument("--data-dir", help="the data cache (default: $FRUGAL_DATA or ~/.cache/frugal)")
    b.add_argument("--corrupted", action="store_true", help="also accuracy on the corrupted test suites")
    b.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    b.add_argument("--model", help="your model: a registered name or an import path 'package.module:Callable'; "
                                   "the baseline trains it on every task, each idea on tasks without a plan of "
                                   "its own (default: each task's plan; convnet for a folder: task)")
    b.add_argument("--verbose", action="store_true", help="per-epoch lines")
    b.add_argument("--variants", nargs="+", metavar="PATTERN",
                   help="only the variants whose label matches one of these glob patterns, e.g. 'plain' 'snap *' "
                        "(methods whose plan can be split: compress, dream, kernels, saccade, specialists)")
    b.add_argument("--executor", choices=["local", "process", "ray"], default="local",
                   help="where the plan's jobs run: local (one after another in this process; default), process (a "
                        "pool of --jobs local processes), ray (Ray tasks on the cluster at --address)")
    b.add_argument("--jobs", type=int, default=2, help="workers of --executor process, and CPUs of the Ray instance "
                                                       "started when no --address is given (default: 2)")
    b.add_argument("--address", help="--executor ray: the cluster, 'auto' (started here by `ray start`) or HOST:PORT "
                                     "(default: a private Ray instance on this machine)")
    b.add_argument("--retries", type=int, default=1, help="a failed job is started again this many times before it "
                                                          "is reported (default: 1)")

    r = sub.add_parser("report", help="rebuild report.md and report.html from DIR/results.json")
    r.add_argument("dir")

    for name, (help_text, add_arguments, _) in sorted(_IDEA_COMMANDS.items()):
        add_arguments(sub.add_parser(name, help=help_text))
    return p


EXIT_BAD_INPUT = 2  # the message names the input and the fix
EXIT_INCOMPLETE = 3  # `frugal bench` ended with runs of its plan missing from results.json

COMMANDS = {"data": _cmd_data, "models": _cmd_models, "train": _cmd_train, "measure": _cmd_measure,
            "explain": _cmd_explain, "bench": _cmd_bench, "report": _cmd_report}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from .bench import BenchIncomplete

    from .models import trust_model_source

    run = COMMANDS.get(a.cmd) or _IDEA_COMMANDS[a.cmd][2]
    try:
        for module in a.trust_model:
            trust_model_source(module)
        return run(a)
    except KeyboardInterrupt:  # Ctrl-C: the bench's jobs were cancelled; finished ones are kept
        print(f"frugal {a.cmd}: cancelled; what finished is kept: the same command resumes", file=sys.stderr)
        return 130
    except BenchIncomplete as e:  # not bad input: runs of the plan are missing, said apart by its own status
        print(f"frugal {a.cmd}: incomplete: {e}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        # bad input and missing data end with the message alone: it says what was wrong and the fix
        print(f"frugal {a.cmd}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a path that cannot be used: below a regular file, unwritable, a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"frugal {a.cmd}: error: {where}{e.strerror or e}; check that the paths given (--out, --data-dir, "
              "-o, ...) are folders you can write to, and that the disk has room", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
