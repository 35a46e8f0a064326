"""Where data lives on disk and how it is written and checked there.

Every cached file is written atomically (temp file in the same folder, fsync, rename), so an
interrupted fetch never leaves a half file that looks whole. Pinned files are checked by md5;
generated npz files carry a JSON stamp of how they were made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from frugal.data.errors import DataError
from frugal.utils import atomic_file


def data_root(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: `override`, else $FRUGAL_DATA, else $XDG_CACHE_HOME/frugal or ~/.cache/frugal."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    env = os.environ.get("FRUGAL_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "frugal"


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def file_signature(path: Path) -> tuple[str, int, int] | None:
    """(path, size, mtime_ns), or None when the file is absent: a cheap "has this changed" key."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (str(path), st.st_size, st.st_mtime_ns)


def signature(paths: list[Path]) -> tuple:
    return tuple(file_signature(p) for p in paths)


# (path, size, mtime_ns) of files whose md5 matched their pin in this process. A new process
# hashes again (about 0.1 s for MNIST), so corruption that keeps size and mtime is still caught.
_verified: set[tuple[str, int, int]] = set()


def read_verified(path: Path, md5: str, fix: str) -> bytes:
    """The bytes of a pinned file, after checking its md5. `fix` is the command that repairs it."""
    sig = file_signature(path)
    if sig is None:
        raise DataError(f"{path} is missing; run `{fix}`")
    data = path.read_bytes()
    if sig not in _verified:
        got = md5_hex(data)
        if got != md5:
            raise DataError(f"checksum mismatch for {path} (md5 {got}, expected {md5}): "
                            f"the cache is corrupt; run `{fix} --force`")
        _verified.add(sig)
    return data


def is_verified(path: Path, md5: str) -> bool:
    """True when the file exists and matches its pin (hashing it unless already done here)."""
    sig = file_signature(path)
    if sig is None:
        return False
    if sig in _verified:
        return True
    if md5_hex(path.read_bytes()) != md5:
        return False
    _verified.add(sig)
    return True


def save_stamped_npz(path: Path, arrays: dict[str, np.ndarray], stamp: dict[str, Any]) -> Path:
    """Write arrays plus a JSON stamp into one uncompressed npz (uncompressed: loads ~5x faster,
    and the zip CRC still catches flipped bytes)."""
    if "stamp" in arrays:
        raise ValueError("'stamp' is reserved for the stamp itself")
    with atomic_file(path) as f:
        np.savez(f, stamp=np.array(json.dumps(stamp, sort_keys=True)), **arrays)
    return path


def load_stamped_npz(path: Path, fix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read every array of a stamped npz. Unreadable (truncated, bad CRC, bad header) -> DataError
    naming `fix`; the caller compares the stamp to decide whether the file is stale."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # reading each member to its end checks its CRC
        stamp = json.loads(str(arrays.pop("stamp")))
    except FileNotFoundError:
        raise DataError(f"{path} is missing; run `{fix}`") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}): the cache is corrupt; "
                        f"run `{fix} --force`") from e
    if not isinstance(stamp, dict):
        raise DataError(f"{path} has a malformed stamp: the cache is corrupt; run `{fix} --force`")
    return arrays, stamp


def replace_dir(staging: Path, dest: Path) -> None:
    """Move a finished staging folder onto `dest`, replacing any old one. Readers see the old
    folder or the new one, never a half-written mix (bar a brief moment with neither)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def normalised_stamp(stamp: dict[str, Any]) -> dict[str, Any]:
    # a JSON round trip, so tuples and lists (or int keys and str keys) compare as stored
    return json.loads(json.dumps(stamp, sort_keys=True))


def read_stamp(path: Path) -> dict[str, Any] | None:
    """Just the stamp of a stamped npz (reads no image data), or None when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stamp = json.loads(str(z["stamp"]))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        return None
    return stamp if isinstance(stamp, dict) else None


def stamp_matches(path: Path, stamp: dict[str, Any]) -> bool:
    return read_stamp(path) == normalised_stamp(stamp)
