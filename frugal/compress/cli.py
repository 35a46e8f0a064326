"""`frugal compress RUN -o FILE` and `frugal eval FILE`: the compressed model file from the command line.

A model file may come from anyone: `frugal eval` reads it within bounds (`--max-params`), checks
that the task's images and classes fit the model before running it, and ends every fault with a
message naming the file (exit 2), as `frugal compress` does for an output it cannot write.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from frugal.cli import register_command
from frugal.compress.loop import CHOSEN  # in a run folder: the codec per tensor that training in the loop chose


def _add_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a finished run folder")
    p.add_argument("-o", "--out", required=True, help="the .frugal file to write")
    p.add_argument("--codec", default=None,
                   help='codec for every weight of 2 or more dimensions, as JSON, e.g. \'{"codec": "dct", '
                        '"step": 0.01, "cutoff": 4}\'; default: the run\'s learned code, or the choice in '
                        'RUN/compression.json, else raw')
    p.add_argument("--other-codec", default=None, help="codec for biases and other 1-D tensors (default raw)")
    p.add_argument("--device", default="auto")


def _parse_spec(text: str, flag: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be a JSON object like '{{\"codec\": \"uniform\", \"step\": 0.01}}': {e}") from None
    except RecursionError:
        raise ValueError(f"{flag} nests its JSON too deeply; give a flat object like "
                         '\'{"codec": "uniform", "step": 0.01}\'') from None
    if not isinstance(spec, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text[:80]!r}")
    return spec


def _codec(spec: dict, flag: str):
    from frugal.coding.codecs import codec_from_spec

    try:
        return codec_from_spec(spec)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def _check_writable(out: Path) -> None:
    """Refuse, before any work, an output path whose folder cannot be made or written to."""
    fix = "give -o a path in a folder you can write to"
    if out.is_dir():
        raise ValueError(f"-o {out} is a folder; {fix}, e.g. -o {out / 'model.frugal'}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists is where we create
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write -o {out}: {folder} is a file, not a folder; {fix}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write -o {out}: {folder} is not writable; {fix}")


def _run_compress(a: argparse.Namespace) -> int:
    from frugal.compress.container import MAX_PARAMS, decode_model, encode_model
    from frugal.compress.rate import baked, code_of, plain_spec
    from frugal.data import load_task
    from frugal.measure import weight_tensors
    from frugal.train import evaluate, load_run
    from frugal.utils import atomic_write_bytes, read_json, resolve_device

    out = Path(a.out)
    _check_writable(out)
    # the flags are checked before the run is read: a typo costs nothing
    big = _parse_spec(a.codec, "--codec") if a.codec else None
    small = _parse_spec(a.other_codec, "--other-codec") if a.other_codec else None
    for spec, flag in ((big, "--codec"), (small, "--other-codec")):
        if spec is not None:
            _codec(spec, flag)
    device = resolve_device(a.device)
    model, cfg, metrics = load_run(a.run, device=device)
    meta_path = Path(a.run) / "config.json"
    spec = json.loads(meta_path.read_text())["model_spec"]
    learned = {}
    if code_of(model) is not None:  # trained against its code length: the plain net and its learned codes
        model, learned = baked(model)
        spec = plain_spec(spec)
    tensors = weight_tensors(model)
    chosen = Path(a.run) / CHOSEN
    if a.codec is None and learned:
        specs = {k: c.spec() for k, c in learned.items()}
        source = {k: f"the learned code of {a.run}" for k in specs}
    elif a.codec is None and chosen.exists():
        held = read_json(chosen, "the run folder is damaged; pass --codec instead")
        specs = held.get("codecs") if isinstance(held, dict) else None
        if not isinstance(specs, dict) or not all(isinstance(v, dict) or v is None for v in specs.values()):
            raise ValueError(f"{chosen} holds no object of codecs per tensor; the run folder is damaged; "
                             "pass --codec")
        source = {k: str(chosen) for k in specs}  # where each codec came from, for an error to name
    else:
        specs = {k: (big if t.dim() >= 2 else small) for k, t in tensors.items()}
        source = {k: "--codec" if t.dim() >= 2 else "--other-codec" for k, t in tensors.items()}
    codecs = {k: _codec(v, source[k]) for k, v in specs.items() if v is not None}
    data = load_task(cfg.task, data_dir=cfg.data_dir, val_size=cfg.val_size)
    # kept short: every byte of the file counts; the normalisation makes the file usable on raw images
    meta = {"task": cfg.task, "normalize": [data.mean, data.std]}
    # the accuracy the file will reproduce: that of the decoded weights, measured before writing
    blob = encode_model(model, spec, codecs, meta)
    own = sum(t.numel() for t in tensors.values())  # our own model: its size is no reason to refuse it
    decoded, _ = decode_model(blob, device=device, max_params=max(MAX_PARAMS, 2 * own))
    meta["test_acc"] = evaluate(decoded, data.test, data.mean, data.std, device)[0]
    blob = encode_model(model, spec, codecs, meta)
    try:
        atomic_write_bytes(out, blob)
    except OSError as e:  # the folder went away or filled up since the check above
        raise ValueError(f"cannot write -o {out}: {e.strerror or e}; give -o a path in a folder you can write to, "
                         "on a disk with room") from None
    print(json.dumps({"file": a.out, "bytes": len(blob), "test_acc": meta["test_acc"],
                      "run_test_acc": metrics.get("test_acc"), "codecs": specs}, indent=2))
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .frugal model file")
    p.add_argument("--data", default=None, help="task to evaluate on (default: the one the file was made for)")
    p.add_argument("--max-params", type=int, default=None,
                   help="largest model (floating-point entries) to build from the file; raise it only for a file "
                        "from a source you trust (default: frugal.compress.container.MAX_PARAMS)")
    p.add_argument("--device", default="auto")


def _run_eval(a: argparse.Namespace) -> int:
    from frugal.compress.container import MAX_PARAMS, read_model_file
    from frugal.data import load_task
    from frugal.train import evaluate
    from frugal.utils import resolve_device

    if a.max_params is not None and a.max_params < 1:
        raise ValueError(f"--max-params must be a positive number of entries, got {a.max_params}")
    device = resolve_device(a.device)
    model, header = read_model_file(a.file, device=device, max_params=a.max_params or MAX_PARAMS)
    meta, spec = header["meta"], header["spec"]  # checked by read_model_file: an object, a name, a number
    task = a.data or meta.get("task")
    if task is None:
        raise ValueError(f"{a.file} does not name its task; pass --data TASK")
    data = load_task(task)
    has = (data.in_channels, *data.image_size, data.num_classes)
    wants = (spec.get("in_channels", has[0]), *spec.get("image_size", has[1:3]), spec.get("num_classes", has[3]))
    if tuple(wants) != has:
        raise ValueError(f"{a.file} holds a model for {wants[0]}x{wants[1]}x{wants[2]} images in {wants[3]} "
                         f"classes, but task {task!r} has {has[0]}x{has[1]}x{has[2]} images in {has[3]} classes; pass "
                         f"--data with a task of the model's shape"
                         + (f" (it was made for {meta['task']!r})" if meta.get("task") else ""))
    mean, std = meta.get("normalize", (data.mean, data.std))  # the file's own, where it records one
    acc = evaluate(model, data.test, mean, std, device)[0]
    recorded = meta.get("test_acc") if task == meta.get("task") else None
    print(json.dumps({"file": a.file, "bytes": Path(a.file).stat().st_size, "task": task, "test_acc": acc,
                      "recorded_test_acc": recorded, "reproduced": None if recorded is None else acc == recorded},
                     indent=2))
    return 0


register_command("compress", "write a finished run as one compressed .frugal model file", _add_compress, _run_compress)
register_command("eval", "decode a .frugal model file and measure its test accuracy", _add_eval, _run_eval)
