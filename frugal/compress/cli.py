"""`frugal compress RUN -o FILE` and `frugal eval FILE`: the compressed model file from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from frugal.cli import register_command
from frugal.compress.loop import CHOSEN  # in a run folder: the codec per tensor that training in the loop chose


def _add_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a finished run folder")
    p.add_argument("-o", "--out", required=True, help="the .frugal file to write")
    p.add_argument("--codec", default=None,
                   help='codec for every weight of 2 or more dimensions, as JSON, e.g. \'{"codec": "dct", '
                        '"step": 0.01, "cutoff": 4}\'; default: the choice in RUN/compression.json, else raw')
    p.add_argument("--other-codec", default=None, help="codec for biases and other 1-D tensors (default raw)")
    p.add_argument("--device", default="auto")


def _parse_spec(text: str, flag: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be a JSON object like '{{\"codec\": \"uniform\", \"step\": 0.01}}': {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return spec


def _run_compress(a: argparse.Namespace) -> int:
    from frugal.compress.codecs import codec_from_spec
    from frugal.compress.container import decode_model, encode_model
    from frugal.data import load_task
    from frugal.measure import weight_tensors
    from frugal.train import evaluate, load_run
    from frugal.utils import atomic_write_bytes, resolve_device

    device = resolve_device(a.device)
    model, cfg, metrics = load_run(a.run, device=device)
    meta_path = Path(a.run) / "config.json"
    spec = json.loads(meta_path.read_text())["model_spec"]
    tensors = weight_tensors(model)
    chosen = Path(a.run) / CHOSEN
    if a.codec is None and chosen.exists():
        specs = json.loads(chosen.read_text())["codecs"]
    else:
        big = _parse_spec(a.codec, "--codec") if a.codec else None
        small = _parse_spec(a.other_codec, "--other-codec") if a.other_codec else None
        specs = {k: (big if t.dim() >= 2 else small) for k, t in tensors.items()}
    codecs = {k: codec_from_spec(v) for k, v in specs.items() if v is not None}
    data = load_task(cfg.task, data_dir=cfg.data_dir, val_size=cfg.val_size)
    meta = {"task": cfg.task}  # kept short: every byte of the file counts
    # the accuracy the file will reproduce: that of the decoded weights, measured before writing
    blob = encode_model(model, spec, codecs, meta)
    decoded, _ = decode_model(blob, device=device)
    meta["test_acc"] = evaluate(decoded, data.test, data.mean, data.std, device)[0]
    blob = encode_model(model, spec, codecs, meta)
    atomic_write_bytes(Path(a.out), blob)
    print(json.dumps({"file": a.out, "bytes": len(blob), "test_acc": meta["test_acc"],
                      "run_test_acc": metrics.get("test_acc"), "codecs": specs}, indent=2))
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .frugal model file")
    p.add_argument("--data", default=None, help="task to evaluate on (default: the one the file was made for)")
    p.add_argument("--device", default="auto")


def _run_eval(a: argparse.Namespace) -> int:
    from frugal.compress.container import read_model_file
    from frugal.data import load_task
    from frugal.train import evaluate
    from frugal.utils import resolve_device

    device = resolve_device(a.device)
    model, header = read_model_file(a.file, device=device)
    meta = header["meta"]
    task = a.data or meta.get("task")
    if task is None:
        raise ValueError(f"{a.file} does not name its task; pass --data TASK")
    data = load_task(task)
    acc = evaluate(model, data.test, data.mean, data.std, device)[0]
    recorded = meta.get("test_acc") if task == meta.get("task") else None
    print(json.dumps({"file": a.file, "bytes": Path(a.file).stat().st_size, "task": task, "test_acc": acc,
                      "recorded_test_acc": recorded, "reproduced": None if recorded is None else acc == recorded},
                     indent=2))
    return 0


register_command("compress", "write a finished run as one compressed .frugal model file", _add_compress, _run_compress)
register_command("eval", "decode a .frugal model file and measure its test accuracy", _add_eval, _run_eval)
