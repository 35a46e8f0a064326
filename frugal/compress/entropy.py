"""Entropy coding of integer symbols: a range coder (`constriction`) with a categorical model
built from the symbols' own histogram, which is stored in front of the payload.

A stream is self-describing: varint n, zigzag-varint smallest symbol, varint alphabet size K, K
varint counts, varint number of 32-bit words, then the words (little-endian). Decoding checks
every length against the bytes it has and refuses anything inconsistent with `CodecError`; it
never returns symbols it did not read.
"""

from __future__ import annotations

import numpy as np

MAX_ALPHABET = 1 << 20  # symbols span at most this many values: bounds what a damaged header can allocate


class CodecError(ValueError):
    """Bytes that do not decode: truncated, damaged, or not written by this codec."""


def write_varint(out: bytearray, v: int) -> None:
    if v < 0:
        raise ValueError(f"varint must be >= 0, got {v}")
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, next position). At most 10 bytes (64 bits)."""
    v = shift = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise CodecError("stream ends inside a number: the data is truncated")
        b = buf[pos + i]
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v, pos + i + 1
        shift += 7
    raise CodecError("a number is longer than 64 bits: the data is damaged")


def zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def unzigzag(u: int) -> int:
    return u // 2 if u % 2 == 0 else -(u + 1) // 2


def encode_symbols(symbols: np.ndarray) -> bytes:
    """Integers (any shape, flattened) -> bytes, near n times the entropy of their histogram
    plus the histogram itself."""
    import constriction

    s = np.asarray(symbols).reshape(-1)
    if s.size and not np.issubdtype(s.dtype, np.integer):
        raise TypeError(f"symbols must be integers, got {s.dtype}")
    s = s.astype(np.int64)
    out = bytearray()
    write_varint(out, s.size)
    if s.size == 0:
        return bytes(out)
    lo, hi = int(s.min()), int(s.max())
    k = hi - lo + 1
    if k > MAX_ALPHABET:
        raise ValueError(f"symbols span {k} values (max {MAX_ALPHABET}); quantise more coarsely")
    counts = np.bincount(s - lo, minlength=k)
    write_varint(out, zigzag(lo))
    write_varint(out, k)
    for c in counts.tolist():
        write_varint(out, c)
    if k == 1:
        return bytes(out)  # one value repeated: the header says it all
    coder = constriction.stream.queue.RangeEncoder()
    coder.encode((s - lo).astype(np.int32), _model(counts))
    words = coder.get_compressed()
    write_varint(out, words.size)
    return bytes(out) + words.astype("<u4").tobytes()


def decode_symbols(buf: bytes | memoryview, pos: int = 0, expected: int | None = None) -> tuple[np.ndarray, int]:
    """(int64 symbols, position after the stream) from `buf` at `pos`. With `expected`, a stream of
    another length is refused before anything is allocated for it."""
    import constriction

    n, pos = read_varint(buf, pos)
    if expected is not None and n != expected:
        raise CodecError(f"stream holds {n} values, {expected} expected: the data is damaged or for another tensor")
    if n == 0:
        return np.zeros(0, dtype=np.int64), pos
    u, pos = read_varint(buf, pos)
    lo = unzigzag(u)
    k, pos = read_varint(buf, pos)
    if not 1 <= k <= MAX_ALPHABET:
        raise CodecError(f"alphabet of {k} symbols is out of range (1..{MAX_ALPHABET}): the data is damaged")
    if k > len(buf) - pos:
        raise CodecError("histogram longer than the data left: the data is truncated or damaged")
    counts = np.empty(k, dtype=np.int64)
    for i in range(k):
        c, pos = read_varint(buf, pos)
        if c > n:  # also keeps a damaged varint from overflowing int64
            raise CodecError(f"histogram count {c} exceeds the {n} symbols of the stream: the data is damaged")
        counts[i] = c
    if int(counts.sum()) != n:
        raise CodecError(f"histogram counts {int(counts.sum())} symbols, header says {n}: the data is damaged")
    if k == 1:
        return np.full(n, lo, dtype=np.int64), pos
    n_words, pos = read_varint(buf, pos)
    end = pos + 4 * n_words
    if end > len(buf):
        raise CodecError(f"payload of {4 * n_words} bytes but only {len(buf) - pos} left: the data is truncated")
    words = np.frombuffer(bytes(buf[pos:end]), dtype="<u4").astype(np.uint32)
    try:
        decoded = constriction.stream.queue.RangeDecoder(words).decode(_model(counts), n)
    except Exception as e:  # constriction reports a stream it cannot decode as a generic error
        raise CodecError(f"range-coded payload does not decode ({e}): the data is damaged") from e
    return decoded.astype(np.int64) + lo, end


def _model(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def entropy_bits(symbols: np.ndarray) -> float:
    """n x the empirical entropy of the symbols' histogram: the bound a coder of that histogram approaches."""
    s = np.asarray(symbols).reshape(-1)
    if s.size == 0:
        return 0.0
    _, c = np.unique(s, return_counts=True)
    p = c / s.size
    return float(-(c * np.log2(p)).sum())
