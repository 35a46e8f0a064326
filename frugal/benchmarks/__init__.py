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
