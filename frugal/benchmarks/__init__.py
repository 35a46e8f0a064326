"""Benchmark scripts: each times or measures something and prints what it measured as JSON."""

from __future__ import annotations

import argparse

import torch

from frugal.utils import resolve_device


def add_where_args(p: argparse.ArgumentParser, data_dir: bool = True) -> None:
    """--threads, --device and (unless data_dir=False) --data-dir: where a benchmark runs."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--device", default="auto")
    if data_dir:
        p.add_argument("--data-dir", default=None)


def where(a: argparse.Namespace) -> torch.device:
    """Apply --threads; the device --device names."""
    if a.threads:
        torch.set_num_threads(a.threads)
    return resolve_device(a.device)


def add_out_arg(p: argparse.ArgumentParser) -> None:
    """--out: also write the JSON to a file (say results/NAME/results.json, which `frugal report`
    renders)."""
    p.add_argument("--out", default=None, help="also write the JSON here, e.g. results/NAME/results.json")


def publish(result: dict, script: str, argv: list[str] | None, out: str | None) -> dict:
    """Print a benchmark's result as JSON, with the command that made it, and write it to `out`."""
    import json
    import sys

    from frugal.utils import atomic_write_json

    args = sys.argv[1:] if argv is None else list(argv)
    result = {"benchmark": result.get("benchmark", script.rsplit(".", 1)[-1]),
              "command": " ".join(["python -m", script, *args]), **result}
    print(json.dumps(result, indent=2))
    if out:
        atomic_write_json(out, result)
    return result
