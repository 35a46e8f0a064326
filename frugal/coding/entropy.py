"""Entropy coding of integer symbols: a range coder (`constriction`) with a categorical model
built from the symbols' own histogram, which is stored in front of the payload.

A stream is self-describing: varint n, zigzag-varint smallest symbol, varint alphabet size K, K
varint counts, varint number of 32-bit words, then the words (little-endian). Decoding checks
every length against the bytes it has and refuses anything inconsistent with `CodecError`; it
never returns symbols it did not read.

A damaged or hostile stream is refused before decoding allocates for it: n is capped
(MAX_SYMBOLS; a caller that knows the length passes `expected`), and the words must hold at least
the information the histogram implies (`min_bits`), since a range coder cannot code n symbols in
fewer bits than their probabilities under its own quantised model allow. Symbols are decoded in
chunks, and a payload that strays from its stored histogram is refused as soon as it does.
"""

from __future__ import annotations

import numpy as np

MAX_ALPHABET = 1 << 20  # symbols span at most this many values: bounds what a damaged header can allocate
MAX_SYMBOLS = 1 << 28  # values in one stream (1 GiB as the coder's int32 while decoding): bounds a stream read
                       # without an `expected` length; a weight tensor that large is 1 GiB of float32 itself
PRECISION = 24  # bits of the fixed-point probabilities of constriction's categorical model (its default)
DECODE_CHUNK = 1 << 20  # symbols decoded per call: a damaged payload is caught before all n are decoded
MARGIN_BITS = 96  # what a range coder's last words may hold beyond the information of its symbols


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
    if s.size > MAX_SYMBOLS:
        raise ValueError(f"{s.size} symbols in one stream (max {MAX_SYMBOLS}); split the tensor")
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
    another length is refused before anything is allocated for it; without, a stream of more than
    MAX_SYMBOLS values, or one whose words are too few for its histogram (`min_bits`), is."""
    import constriction

    n, pos = read_varint(buf, pos)
    if expected is not None and n != expected:
        raise CodecError(f"stream holds {n} values, {expected} expected: the data is damaged or for another tensor")
    if n > MAX_SYMBOLS:
        raise CodecError(f"stream holds {n} values, more than the {MAX_SYMBOLS} a stream may: the data is damaged")
    if n == 0:
        return np.zeros(0, dtype=np.int64), pos
    u, pos = read_varint(buf, pos)
    lo = unzigzag(u)
    k, pos = read_varint(buf, pos)
    if not 1 <= k <= MAX_ALPHABET:
        raise CodecError(f"alphabet of {k} symbols is out of range (1..{MAX_ALPHABET}): the data is damaged")
    if not -(1 << 63) <= lo <= (1 << 63) - k:
        raise CodecError(f"symbols from {lo} over {k} values do not fit 64 bits: the data is damaged")
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
    if counts[0] == 0 or counts[-1] == 0:  # the alphabet runs from the smallest symbol to the largest
        raise CodecError("histogram has no symbol at an end of its range: the data is damaged")
    n_words, pos = read_varint(buf, pos)
    end = pos + 4 * n_words
    if end > len(buf):
        raise CodecError(f"payload of {4 * n_words} bytes but only {len(buf) - pos} left: the data is truncated")
    need = min_bits(counts)
    if n_words == 0 or 32 * n_words < need - MARGIN_BITS:
        raise CodecError(f"payload of {n_words} words cannot hold {n} symbols of this histogram (at least "
                         f"{need:.0f} bits): the data is damaged")
    words = np.frombuffer(bytes(buf[pos:end]), dtype="<u4").astype(np.uint32)
    out = np.empty(n, dtype=np.int64)  # pages are touched only as symbols are decoded into them
    seen = np.zeros(k, dtype=np.int64)
    try:
        decoder, model = constriction.stream.queue.RangeDecoder(words), _model(counts)
        for start in range(0, n, DECODE_CHUNK):
            part = decoder.decode(model, min(DECODE_CHUNK, n - start))  # (m,) int32 in 0..k-1
            seen += np.bincount(part, minlength=k)[:k]
            if (seen > counts).any():  # a damaged payload is refused as soon as it strays from its histogram
                break
            out[start:start + part.size] = part
    except Exception as e:  # constriction reports a stream it cannot decode as a generic error
        raise CodecError(f"range-coded payload does not decode ({e}): the data is damaged") from e
    if not np.array_equal(seen, counts):
        raise CodecError("range-coded payload decodes to symbols other than its histogram: the data is damaged")
    out += lo
    return out, end


def min_bits(counts: np.ndarray) -> float:
    """A lower bound on the bits a range coder spends on symbols with this histogram (K >= 2 values),
    from the probabilities of constriction's quantised model (`Categorical(perfect=False)`): each of
    the K values gets one quantum of 2**-PRECISION, the rest is shared in proportion to the counts
    and rounded down, so no value's probability exceeds c/n + 2 quanta, nor 1 - (K - 1) quanta."""
    c = counts[counts > 0].astype(np.float64)
    n, quantum = c.sum(), 2.0 ** -PRECISION
    p = np.minimum(c / n + 4 * quantum, 1 - (len(counts) - 1) * quantum)  # 4: 2 quanta, and float rounding
    return float(-(c * np.log2(p)).sum())


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
