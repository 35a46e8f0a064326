"""Where data lives on disk and how it is written and checked there.

Every cached file is written atomically (temp file in the same folder, fsync, rename), so an
interrupted fetch never leaves a half file that looks whole. Pinned files are checked by md5;
generated npz files carry a JSON stamp of how they were made.

Nothing is overwritten or deleted that frugal did not write: a stamped npz is written over only when
the file there carries a frugal stamp, and a folder is replaced (replace_dir) only when it is new,
empty, or holds nothing but what frugal writes there. A cache folder (--data-dir) may be shared with
a user's own files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from frugal.data.bounded import npy_header, read_npz
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


def md5_file(path: Path) -> str:
    """The md5 of a file, read in chunks: a huge file someone left under a pinned name costs time,
    not memory."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
    if sig not in _verified:
        got = md5_file(path)  # before reading it whole: only a file of pinned content is read into memory
        if got != md5:
            raise DataError(f"checksum mismatch for {path} (md5 {got}, expected {md5}): "
                            f"the cache is corrupt; run `{fix} --force`")
        _verified.add(sig)
    return path.read_bytes()


def is_verified(path: Path, md5: str) -> bool:
    """True when the file exists and matches its pin (hashing it unless already done here)."""
    sig = file_signature(path)
    if sig is None:
        return False
    if sig in _verified:
        return True
    if not path.is_file() or md5_file(path) != md5:
        return False
    _verified.add(sig)
    return True


def save_stamped_npz(path: Path, arrays: dict[str, np.ndarray], stamp: dict[str, Any]) -> Path:
    """Write arrays plus a JSON stamp into one uncompressed npz (uncompressed: loads ~5x faster,
    and the zip CRC still catches flipped bytes)."""
    if "stamp" in arrays:
        raise ValueError("'stamp' is reserved for the stamp itself")
    check_overwritable(path)
    with atomic_file(path) as f:
        np.savez(f, stamp=np.array(json.dumps(stamp, sort_keys=True)), **arrays)
    return path


def check_overwritable(path: Path) -> None:
    """Refuse (DataError) to write a stamped npz over a file that does not carry a frugal stamp.
    Callers that generate the arrays first call it before that work, too."""
    if os.path.lexists(path) and not written_by_frugal(path):
        raise DataError(f"{path} exists and carries no frugal stamp, so frugal did not write it (or it is not "
                        f"a frugal cache file); frugal will not overwrite it: move it away, or give another "
                        f"data folder (--data-dir)")


def load_stamped_npz(path: Path, fix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read every array of a stamped npz. Unreadable (truncated, bad CRC, bad header) -> DataError
    naming `fix`; the caller compares the stamp to decide whether the file is stale."""
    if not os.path.lexists(path):
        raise DataError(f"{path} is missing; run `{fix}`")
    # bounded (sizes checked before anything is decompressed); reading each member to its end checks its CRC
    arrays = read_npz(path, None, f"the cache is corrupt; run `{fix} --force`")
    try:
        stamp = json.loads(str(arrays.pop("stamp", "")))
    except ValueError:
        stamp = None
    if not (isinstance(stamp, dict) and isinstance(stamp.get("generator"), str)):
        raise DataError(f"{path} carries no frugal stamp, so it is not a cache file frugal wrote; move it away "
                        f"(frugal will not overwrite it), or give another data folder (--data-dir)")
    return arrays, stamp


def check_replaceable(dest: Path, foreign: Callable[[Path], str | None]) -> None:
    """Refuse (DataError) to replace or delete `dest` unless it does not exist, is an empty folder,
    or holds only what frugal writes there: `foreign(dest)` names the first thing in it that frugal
    did not write (e.g. "data.npz"), or returns None."""
    if not os.path.lexists(dest):
        return
    fix = "choose a new or empty folder, or move its contents away"
    if dest.is_symlink():
        raise DataError(f"{dest} is a symbolic link; frugal replaces only real folders it made, so it will not "
                        f"replace it: give the folder it points to ({dest.resolve()}) or {fix}")
    if not dest.is_dir():
        raise DataError(f"{dest} is a file, not a folder; frugal will not replace it: {fix}")
    if not any(dest.iterdir()):
        return
    what = foreign(dest)
    if what is not None:
        raise DataError(f"{dest} holds {what}, which frugal did not write, and replacing the folder would "
                        f"delete it; frugal replaces only a new or empty folder or one it wrote itself: {fix}")


def replace_dir(staging: Path, dest: Path, foreign: Callable[[Path], str | None]) -> None:
    """Move a finished staging folder onto `dest`, replacing any old one, after check_replaceable
    (a folder holding anything frugal did not write is refused, never deleted). Readers see the old
    folder or the new one, never a half-written mix (bar a brief moment with neither)."""
    check_replaceable(dest, foreign)
    old = None
    if os.path.lexists(dest):
        # a fresh folder of our own to move the old one into: nothing that was there before is removed
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def normalised_stamp(stamp: dict[str, Any]) -> dict[str, Any]:
    # a JSON round trip, so tuples and lists (or int keys and str keys) compare as stored
    return json.loads(json.dumps(stamp, sort_keys=True))


def read_stamp(path: Path) -> dict[str, Any] | None:
    """Just the stamp of a stamped npz (reads no image data), or None when absent or unreadable."""
    try:
        stamp = json.loads(str(read_npz(path, ["stamp"], "")["stamp"]))
    except (DataError, KeyError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


_STAMP_PEEK = 1 << 16  # bytes: a stamped npz's first zip entry, the stamp, lies well within these


def leading_stamp(path: Path) -> dict[str, Any] | None:
    """The stamp of a stamped npz read from the file's first bytes alone (its first zip entry, which
    save_stamped_npz makes the stamp), so a file cut short after it still shows that frugal wrote it;
    None when the file does not begin with one."""
    try:
        with open(path, "rb") as f:
            head = f.read(_STAMP_PEEK)
    except OSError:
        return None
    if len(head) < 30 or head[:4] != b"PK\x03\x04":  # a zip local file header
        return None
    method, = struct.unpack_from("<H", head, 8)
    name_len, extra_len = struct.unpack_from("<HH", head, 26)
    if method != 0 or head[30:30 + name_len] != b"stamp.npy":  # stored, not compressed
        return None
    f = io.BytesIO(head[30 + name_len + extra_len:])
    try:
        shape, _, dtype = npy_header(f, str(path))
        if shape != () or dtype.kind != "U":
            return None
        data = f.read(dtype.itemsize)
        if len(data) < dtype.itemsize:
            return None
        stamp = json.loads(str(np.frombuffer(data, dtype=dtype)[0]))
    except (DataError, ValueError, EOFError):
        return None
    return stamp if isinstance(stamp, dict) else None


def written_by_frugal(path: Path) -> bool:
    """Whether a file carries the stamp frugal writes into every npz it generates (at its start)."""
    stamp = leading_stamp(path)
    return stamp is not None and isinstance(stamp.get("generator"), str)


def stamp_matches(path: Path, stamp: dict[str, Any]) -> bool:
    return read_stamp(path) == normalised_stamp(stamp)
