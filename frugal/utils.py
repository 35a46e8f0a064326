"""Small shared helpers: device resolution, atomic writes, seeding, version stamps."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


TMP_SUFFIX = ".tmp"  # atomic_file's temp files: `.NAME.RANDOM.tmp` beside the file they become
STALE_TMP_SECONDS = 60.0  # a temp file this old whose writer holds no lock on it was left by a killed writer


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temp file beside `path` for binary writing; on success it is fsynced and renamed onto
    `path`, so a reader never sees half a file and a killed writer leaves the old file intact. The
    writer holds a lock on the temp file while it writes, so `remove_stale_temp_files` can tell a
    killed writer's leftover from a file being written."""
    import fcntl

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:  # name the file asked for, not a temp name the caller never gave
        raise type(e)(e.errno, f"cannot write {path.name} there ({e.strerror})", str(path.parent)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or when the writer dies
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed atomic writes left in `folder` (not below it): those older
    than STALE_TMP_SECONDS whose writer no longer holds its lock. Returns the paths removed."""
    import fcntl

    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        try:
            if not p.is_file() or p.is_symlink() or now - p.stat().st_mtime < STALE_TMP_SECONDS:
                continue  # a fresh file may be one whose writer has not taken its lock yet
            with open(p, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            continue  # its writer finished (renamed it) meanwhile
    return removed


def read_json(path: str | os.PathLike, fix: str, max_bytes: int = 64 << 20) -> Any:
    """The JSON value in a file someone may have handed us (a run folder's config, a results file),
    or a ValueError that names the file, what is wrong with it and `fix`: never a bare
    JSONDecodeError, RecursionError (deep nesting) or an unbounded read."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size:,} bytes, more than the {max_bytes:,} such a file may have; {fix}")
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; {fix}") from None
    except RecursionError:
        raise ValueError(f"{path} nests its JSON too deeply to read; {fix}") from None


def json_extent(v: Any, max_depth: int | None = None, max_nodes: int | None = None) -> tuple[int, int]:
    """(depth, nodes) of a parsed JSON or YAML value: how deeply lists and objects nest (0 for a
    plain value) and how many values and keys it holds, each alias counted again. Counted without
    recursion, and stopped once past either bound, so a value that nests or expands without bound
    (a crafted header, a YAML alias bomb) costs no more than the bound."""
    depth, nodes, stack = 0, 0, [(v, 0)]
    while stack:
        x, d = stack.pop()
        nodes += 1
        if isinstance(x, (list, dict)):
            depth = max(depth, d + 1)
            stack += [(y, d + 1) for y in ([*x.keys(), *x.values()] if isinstance(x, dict) else x)]
        if (max_depth is not None and depth > max_depth) or (max_nodes is not None and nodes > max_nodes):
            break
    return depth, nodes


class LockHeld(RuntimeError):
    """Another process holds the lock (`file_lock(..., wait=False)`)."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) for the `with` block. wait=False:
    raise LockHeld at once if another process (or another open of the file) holds it; the holder's
    pid, written into the file, is in the message."""
    import fcntl

    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            raise LockHeld(f"{path} is held by pid {f.read().strip() or '?'}") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure to `path` as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_file(path) as f:
        fig.savefig(f, dpi=dpi, format="png")
    plt.close(fig)
    return path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.device):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    """Library versions stamped into every checkpoint and result file."""
    import frugal

    out = {
        "frugal": frugal.__version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a plain str: TorchVersion would need a pickle global to read back
        "numpy": np.__version__,
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }
    return out
