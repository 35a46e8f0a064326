"""Bounded readers for array files someone else may have written: .npy, .npz and gzip.

Each reader checks what a file declares (an npy header's shape and dtype, a zip member's
uncompressed size, a gzip stream's length) against the bytes really there and against a memory
budget *before* it allocates anything, so a crafted file (a zip bomb, a header claiming a terabyte)
fails fast with a DataError naming the file and the key, instead of exhausting the machine. Nothing
is ever unpickled: object dtypes are refused outright, and np.load is never called on a whole file.
idx.py does the same for IDX headers.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from frugal.data.errors import DataError

MEMORY_FRACTION = 0.5  # of the memory available at the time of a read: the most one file's arrays may take
FALLBACK_BUDGET = 8 << 30  # bytes, where the available memory cannot be found out
ACCEPTED_KINDS = "biufSU"  # bool, int, uint, float, bytes, str; no objects (pickles), no structs
_NPY_HEADER_MAX = 10_000  # bytes of an npy header's dict (numpy's own default limit)


def read_budget() -> int:
    """Bytes one file's arrays may take: MEMORY_FRACTION of the memory available now (the smaller
    of Linux's MemAvailable and what a cgroup v2 memory limit leaves), else of physical memory."""
    avail = []
    try:
        with open("/proc/meminfo") as f:
            avail += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:  # inside a container the cgroup's limit, not the host's memory, is what runs out
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            avail.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not avail:
        try:
            avail.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return FALLBACK_BUDGET
    return max(0, int(min(avail) * MEMORY_FRACTION))


def _size(n: int) -> str:
    """A byte count for people: 1,234 bytes, 3.2 GB."""
    return f"{n:,} bytes" if n < 10**6 else f"{n / 1e9:.3g} GB" if n >= 10**9 else f"{n / 1e6:.3g} MB"


def _over_budget(where: str, nbytes: int, budget: int, fix: str) -> DataError:
    return DataError(f"{where} declares {_size(nbytes)} of arrays, more than the {_size(budget)} frugal may "
                     f"read ({MEMORY_FRACTION:.0%} of the memory available now); {fix}")


def npy_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the npy stream `f` (at its start), checked: no object or
    structured dtype. Leaves `f` at the first data byte."""
    version = npy_format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(f, max_header_size=_NPY_HEADER_MAX)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(f, max_header_size=_NPY_HEADER_MAX)
    else:
        raise ValueError(f"npy format version {version[0]}.{version[1]} is not read here (only 1.0 and 2.0)")
    if dtype.hasobject or dtype.kind not in ACCEPTED_KINDS or dtype.fields is not None:
        raise DataError(f"{where} holds {dtype} values; only numbers, booleans and strings are read "
                        f"(never Python objects, which would need pickle); save it as a numeric array")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _data_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize  # Python ints: a crafted shape cannot overflow


def _unreadable(where: str, e: BaseException, fix: str) -> DataError:
    return DataError(f"cannot read {where} ({type(e).__name__}: {e}); {fix}")


# What a damaged or crafted file raises from zipfile, zlib, gzip and numpy's header parser. RuntimeError
# is an encrypted zip member; DataError (also a RuntimeError) is re-raised before these are caught.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, struct.error,
                NotImplementedError, RuntimeError, MemoryError)


@contextlib.contextmanager
def _reading(path: Path, fix: str) -> Iterator[None]:
    """Any fault while reading `path` becomes a DataError naming it and `fix`."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; {fix}") from None
    except _READ_ERRORS as e:
        raise _unreadable(str(path), e, fix) from e


def read_npy(path: Path, fix: str) -> np.ndarray:
    """One .npy file, read only after its header's shape x dtype matched the file's size exactly
    and fit the memory budget."""
    with _reading(path, fix), open(path, "rb") as f:
        shape, fortran, dtype = npy_header(f, str(path))
        need, found = _data_bytes(shape, dtype), os.fstat(f.fileno()).st_size - f.tell()
        if need != found:
            raise DataError(f"{path} declares shape {shape} {dtype} ({_size(need)}) but holds {_size(found)} "
                            f"of data: it is damaged or crafted; {fix}")
        if need > (budget := read_budget()):
            raise _over_budget(str(path), need, budget, fix)
        f.seek(0)
        return npy_format.read_array(f, allow_pickle=False)


def npz_keys(path: Path, fix: str) -> list[str]:
    """The array names in an npz (its members ending in .npy, without that suffix); reads no data."""
    with _reading(path, fix), zipfile.ZipFile(path) as z:
        return [i.filename[:-4] for i in z.infolist() if i.filename.endswith(".npy")]


def read_npz(path: Path, keys: Sequence[str] | None, fix: str) -> dict[str, np.ndarray]:
    """The arrays `keys` of an npz (those present; all when None), like np.load(allow_pickle=False)
    but bounded: the members' declared uncompressed sizes must fit the memory budget together, and
    each member's npy header (shape x dtype) must account for its size exactly, before any array is
    allocated or any member decompressed. Reading a member to its end checks its CRC."""
    with _reading(path, fix), zipfile.ZipFile(path) as z:
        members = {i.filename[:-4]: i for i in z.infolist() if i.filename.endswith(".npy")}
        want = list(members) if keys is None else [k for k in keys if k in members]
        total = sum(members[k].file_size for k in want)  # as the zip's directory declares them
        if total > (budget := read_budget()):
            raise _over_budget(str(path), total, budget, fix)
        for k in want:
            where = f"{k} in {path}"
            with _reading(where, fix), z.open(members[k]) as f:
                shape, _, dtype = npy_header(f, where)
                need, found = _data_bytes(shape, dtype), members[k].file_size - f.tell()
            if need != found:
                raise DataError(f"{where} declares shape {shape} {dtype} ({_size(need)}) but its zip member "
                                f"holds {_size(max(found, 0))} of data: the file is damaged or crafted; {fix}")
        out = {}
        for k in want:
            with _reading(f"{k} in {path}", fix), z.open(members[k]) as f:
                out[k] = npy_format.read_array(f, allow_pickle=False)
        return out


def gunzip(path: Path, limit: int) -> bytes:
    """A gzip file's content, refusing (DataError) content longer than `limit` bytes without
    decompressing past it, so a gzip bomb costs at most `limit` bytes of memory."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) > limit:
        raise DataError(f"{path} decompresses to more than {_size(limit)}, more than such a file may hold: "
                        f"it is damaged or crafted")
    return data
