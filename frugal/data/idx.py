"""A strict reader and writer for the IDX format that MNIST and Fashion-MNIST ship in.

Layout: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32 per
dimension, then the values in C order (big-endian for multi-byte types).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

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


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one IDX file's bytes into a fresh, writable native-endian array.

    `name` is only used in error messages (pass the file path). Every structural problem
    (bad magic, unknown type, truncated or oversized payload) raises DataError.
    """
    if len(data) < 4:
        raise DataError(f"{name} is not an IDX file: {len(data)} bytes, too short for the 4-byte magic number")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _DTYPES:
        raise DataError(f"{name} is not an IDX file: bad magic number 0x{data[:4].hex()} "
                        f"(expected 0x0000 then a type code in {sorted(hex(c) for c in _DTYPES)})")
    if ndim == 0:
        raise DataError(f"{name} is not a valid IDX file: it declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise DataError(f"{name} is truncated: shape {dims} needs {expected} bytes of data, found {found}")
    if found > expected:
        raise DataError(f"{name} is malformed: shape {dims} needs {expected} bytes of data, found {found} "
                        f"({found - expected} trailing bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    # copy: frombuffer views are read-only, and torch wants writable memory
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gunzipping it first when its name ends in .gz."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}") from e
    return parse_idx(data, str(path))


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
