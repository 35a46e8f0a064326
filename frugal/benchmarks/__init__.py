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


ALLOCATORS = ("steady", "default")


def add_allocator_arg(p: argparse.ArgumentParser) -> None:
    """--allocator: how the process's memory allocator treats freed memory while models are timed."""
    p.add_argument("--allocator", choices=ALLOCATORS, default="steady",
                   help="steady: freed memory stays in the process (glibc mallopt), so no model pays the page "
                        "faults of memory that another call gave back; default: the C library's own thresholds, "
                        "under which a model's time depends on what the process allocated and freed before it")


def use_allocator(name: str) -> str:
    """Apply --allocator; returns what the timings ran under ("steady", "default", or "default: ..."
    where a steady allocator is not to be had)."""
    if name == "default":
        return "default"
    return "steady" if steady_allocator() else "default: no glibc mallopt here"


def steady_allocator() -> bool:
    """Keep freed memory in the process: glibc's mmap threshold raised to 1 GiB (large blocks come from
    the heap, not fresh pages of the system), no trimming of the heap's top, and 256 MiB of padding
    when it grows. Its own thresholds move with what was freed before, so that a dense net's
    megabyte maps may or may not cost a page fault per 4 KiB on every call, depending on what ran
    before it. Returns False where there is no glibc (other C libraries: unchanged)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return all(mallopt(opt, value) == 1 for opt, value in (
        (m_mmap_threshold, 1 << 30), (m_trim_threshold, (1 << 31) - 1), (m_top_pad, 256 << 20)))


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
