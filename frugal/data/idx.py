"""A strict reader and writer for the IDX format that MNIST and Fashion-MNIST ship in.

Layout: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32 per
dimension, then the values in C order (big-endian for multi-byte types).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from frugal.data.bounded import MEMORY_FRACTION, read_budget
from frugal.data.errors import DataError

# IDX type code -> big-endian numpy dtype
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}


def _header(head: bytes, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(dims, dtype, header length) from an IDX file's first bytes (at least its header)."""
    if len(head) < 4:
        raise DataError(f"{name} is not an IDX file: {len(head)} bytes, too short for the 4-byte magic number")
    zero0, zero1, code, ndim = head[0], head[1], head[2], head[3]
    if zero0 != 0 or zero1 != 0 or code not in _DTYPES:
        raise DataError(f"{name} is not an IDX file: bad magic number 0x{head[:4].hex()} "
                        f"(expected 0x0000 then a type code in {sorted(hex(c) for c in _DTYPES)})")
    if ndim == 0:
        raise DataError(f"{name} is not a valid IDX file: it declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(head) < header:
        raise DataError(f"{name} is truncated: {len(head)} bytes, shorter than its {header}-byte header")
    return struct.unpack(f">{ndim}I", head[4:header]), _DTYPES[code], header


def _payload_bytes(dims: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(dims) * dtype.itemsize  # Python ints: crafted dims cannot overflow to a small number


def _check_payload(name: str, dims: tuple[int, ...], expected: int, found: int) -> None:
    if found < expected:
        raise DataError(f"{name} is truncated: shape {dims} needs {expected} bytes of data, found {found}")
    if found > expected:
        raise DataError(f"{name} is malformed: shape {dims} needs {expected} bytes of data, found {found} "
                        f"({found - expected} trailing bytes)")


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one IDX file's bytes into a fresh, writable native-endian array.

    `name` is only used in error messages (pass the file path). Every structural problem
    (bad magic, unknown type, truncated or oversized payload) raises DataError.
    """
    dims, dtype, header = _header(data[:4 + 4 * 255], name)
    _check_payload(name, dims, _payload_bytes(dims, dtype), len(data) - header)
    return _decode(data, header, dims, dtype)


def _decode(data: bytes, offset: int, dims: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=offset)
    # copy: frombuffer views are read-only, and torch wants writable memory
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gunzipping it first when its name ends in .gz.

    The header's dims are checked against the payload's size (the file's size, or for .gz the
    stream, read no further than the header says) and the memory budget before the payload is read,
    so a header declaring absurd dims fails at once with a DataError naming the file."""
    path = Path(path)
    name = str(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(4)
            head += f.read(4 * head[3]) if len(head) == 4 else b""
            dims, dtype, header = _header(head, name)
            expected = _payload_bytes(dims, dtype)
            if path.suffix != ".gz":  # the payload's size is known before reading it
                _check_payload(name, dims, expected, os.fstat(f.fileno()).st_size - header)
            if expected > (budget := read_budget()):
                raise DataError(f"{name} declares shape {dims}, {expected:,} bytes, more than the {budget:,} "
                                f"bytes frugal may read ({MEMORY_FRACTION:.0%} of the memory available now): it "
                                f"is damaged or crafted, or too large for this machine")
            payload = f.read(expected)
            _check_payload(name, dims, expected, len(payload))
            if f.read(1):
                raise DataError(f"{name} is malformed: shape {dims} needs {expected} bytes of data, and more "
                                f"follow them (trailing bytes)")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}") from e
    return _decode(payload, 0, dims, dtype)


def encode_idx(arr: np.ndarray) -> bytes:
    """The IDX bytes for an array (the inverse of parse_idx)."""
    arr = np.asarray(arr)
    native = arr.dtype.newbyteorder("=")
    if native not in _CODES:
        raise ValueError(f"IDX cannot hold dtype {arr.dtype}; use one of {sorted(str(d) for d in _CODES)}")
    if arr.ndim == 0 or arr.ndim > 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {arr.ndim}")
    header = bytes([0, 0, _CODES[native], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=_DTYPES[_CODES[native]]).tobytes()
