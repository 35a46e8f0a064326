"""Lossy codes for one weight tensor. Each codec turns a tensor into self-contained bytes (its
parameters, then entropy-coded integer symbols) and back; `decode(encode(w))` is the tensor the
training loop continues from, and its size is `len(encode(w))`, never an estimate.

- `uniform`: round(w / step), the symbols range-coded (a dead zone of |w| < step / 2 becomes 0).
- `prune`: the `fraction` of weights smallest in magnitude set to 0, the rest uniform-quantised.
- `structured`: whole output and input units of smallest norm dropped; two bit masks and the
  surviving block, uniform-quantised.
- `kmeans`: weight sharing as in Deep Compression (Han et al. 2016): up to k float32 centroids and
  a range-coded cluster index per weight; 0 is always one of the centroids, so pruned weights stay 0.
- `units`: uniform, prune or kmeans, with the output and input units that code leaves all zero
  cut out first: two bit masks, then only the block that is left, coded the same way.
- `dct`: JPEG for kernels. An orthonormal DCT-II over each kernel's spatial axes (over blocks of up
  to 8x8 of an fc matrix), coefficients of frequency u + v >= `cutoff` dropped, the rest
  uniform-quantised; smooth kernels become a few small integers.

Every code is idempotent: encoding a decoded tensor again gives back the same tensor, so a model
trained with compression in the loop is exactly what its compressed file decodes to.

Decoding allocates for the shape it is given (the model's, never one read from the bytes): each
stream of symbols must hold exactly as many values as that shape implies, and every parameter read
from the bytes (a step, a centroid count, a block code, unit masks) is checked before use;
damaged bytes raise `CodecError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from frugal.coding.entropy import CodecError, decode_symbols, encode_symbols

FC_BLOCK = 8  # largest side of the blocks an fc matrix is cut into for the DCT


def dct_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(n, n) orthonormal DCT-II: row k is the k-th basis vector, so X = C @ x and x = C.T @ X."""
    i = torch.arange(n, dtype=dtype, device=device)
    c = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)  # (k, i)
    c[0] /= math.sqrt(2)
    return c


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two axes (as scipy.fft.dctn(x, axes=(-2, -1), norm='ortho'))."""
    ch = dct_matrix(x.shape[-2], x.dtype, x.device)
    cw = dct_matrix(x.shape[-1], x.dtype, x.device)
    return ch @ x @ cw.T


def idct2(c: torch.Tensor) -> torch.Tensor:
    ch = dct_matrix(c.shape[-2], c.dtype, c.device)
    cw = dct_matrix(c.shape[-1], c.dtype, c.device)
    return ch.T @ c @ cw


def _block_side(n: int) -> int:
    """The largest divisor of n that is at most FC_BLOCK: blocks tile the side exactly, with no
    padding, so decoding then encoding again gives back the same coefficients (the code is idempotent)."""
    return max(d for d in range(1, min(n, FC_BLOCK) + 1) if n % d == 0)


def to_blocks(w: torch.Tensor) -> torch.Tensor:
    """The 2-D pictures the DCT runs on: a conv weight (O, I, kh, kw) as O*I kernels (kh, kw); an
    fc weight (O, I) cut into bo x bi blocks (each side the largest divisor of O, I up to 8); a vector
    as a one-row matrix."""
    if w.dim() >= 3:
        return w.reshape(-1, *w.shape[-2:])  # (O*I, kh, kw)
    m = w.reshape(1, -1) if w.dim() == 1 else w
    o, i = m.shape
    bo, bi = _block_side(o), _block_side(i)
    return m.reshape(o // bo, bo, i // bi, bi).permute(0, 2, 1, 3).reshape(-1, bo, bi)  # (nb, bo, bi)


def from_blocks(blocks: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) >= 3:
        return blocks.reshape(shape)
    o, i = (1, shape[0]) if len(shape) == 1 else shape
    bo, bi = _block_side(o), _block_side(i)
    m = blocks.reshape(o // bo, i // bi, bo, bi).permute(0, 2, 1, 3).reshape(o, i)  # (O, I)
    return m.reshape(shape)


@dataclass(frozen=True)
class Codec:
    """Base: `encode(w) -> bytes`, `decode(bytes, shape) -> float32 tensor`."""

    name = "codec"

    def encode(self, w: torch.Tensor) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        """The bytes carry the code's parameters: decoding needs only the codec's name and the shape."""
        raise NotImplementedError

    def spec(self) -> dict:
        """{"codec": name, **parameters}: what `codec_from_spec` rebuilds it from."""
        return {"codec": self.name, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def roundtrip(self, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(decoded tensor, bytes): what the training loop loads, and what it costs."""
        data = self.encode(w)
        return self.decode(data, tuple(w.shape)).to(w.device, w.dtype), len(data)


def _header(fmt: str, data: bytes, what: str) -> tuple[tuple, int]:
    size = struct.calcsize(fmt)
    if len(data) < size:
        raise CodecError(f"{what} data of {len(data)} bytes is shorter than its {size}-byte header: truncated")
    return struct.unpack_from(fmt, data), size


def _symbols(data: bytes, pos: int, n: int, what: str) -> np.ndarray:
    try:
        s, end = decode_symbols(data, pos, expected=n)
    except CodecError as e:
        raise CodecError(f"{what}: {e}") from None
    if end != len(data):
        raise CodecError(f"{what} data has {len(data) - end} unexpected trailing bytes")
    return s


def _check_step(step: float) -> None:
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"quantisation step must be a positive finite number, got {step}")


def _read_step(step: float, what: str) -> float:
    """A step read from data: what `encode` wrote is positive and finite."""
    if not (step > 0 and math.isfinite(step)):
        raise CodecError(f"{what} data has quantisation step {step}: damaged")
    return step


@dataclass(frozen=True)
class Uniform(Codec):
    step: float  # quantisation step, in weight units

    name = "uniform"

    def __post_init__(self):
        _check_step(self.step)

    def encode(self, w: torch.Tensor) -> bytes:
        q = torch.round(w.detach().double().cpu() / np.float32(self.step)).long().numpy()
        return struct.pack("<f", self.step) + encode_symbols(q)

    @classmethod
    def decode(cls, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        (step,), pos = _header("<f", data, cls.name)
        step = _read_step(step, cls.name)
        q = _symbols(data, pos, math.prod(shape), cls.name)
        return (torch.from_numpy(q).double() * step).float().reshape(shape)


@dataclass(frozen=True)
class Prune(Codec):
    fraction: float  # share of weights, smallest in magnitude, set to 0
    step: float  # quantisation step of the survivors

    name = "prune"

    def __post_init__(self):
        if not 0 <= self.fraction < 1:
            raise ValueError(f"prune fraction must be in [0, 1), got {self.fraction}")
        _check_step(self.step)

    def encode(self, w: torch.Tensor) -> bytes:
        w = w.detach().double().cpu().reshape(-1)
        k = int(self.fraction * w.numel())
        if k:
            w = w.clone()
            w[w.abs().argsort()[:k]] = 0.0
        return Uniform(self.step).encode(w)

    @classmethod
    def decode(cls, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        return Uniform.decode(data, shape)  # pruned weights are uniform symbols with many zeros


@dataclass(frozen=True)
class KMeans(Codec):
    k: int  # number of shared values, 0 included
    iters: int = 20  # Lloyd iterations

    name = "kmeans"

    def __post_init__(self):
        if not 2 <= self.k <= 65536:
            raise ValueError(f"kmeans needs 2..65536 clusters, got {self.k}")

    def encode(self, w: torch.Tensor) -> bytes:
        x = w.detach().double().cpu().reshape(-1).numpy()
        values = np.unique(np.concatenate([[0.0], x]))
        if values.size <= self.k:  # already shared (e.g. decoded by this codec): keep the values exactly
            idx = np.searchsorted(values, x)
            centroids = values.astype(np.float32)
            return struct.pack("<H", centroids.size) + centroids.astype("<f4").tobytes() + encode_symbols(idx)
        k = self.k
        # linear initialisation over the range (Han et al. found it best for weight sharing). In 1-D,
        # Lloyd's step needs only the sorted values and their prefix sums: each cluster is a run of
        # the sorted values between midpoints, found by binary search: O(k log n) per iteration
        xs = np.sort(x)
        csum = np.concatenate([[0.0], np.cumsum(xs)])
        c = np.linspace(xs[0], xs[-1], k - 1)
        for _ in range(self.iters):
            cuts = np.concatenate([[0], np.searchsorted(xs, (c[1:] + c[:-1]) / 2), [xs.size]])  # (k,) run bounds
            n = np.diff(cuts)
            sums = csum[cuts[1:]] - csum[cuts[:-1]]
            c = np.sort(np.where(n > 0, sums / np.maximum(n, 1), c))
        centroids = np.unique(np.concatenate([[0.0], c]).astype(np.float32))  # sorted, 0 included exactly
        idx = _nearest(x, centroids.astype(np.float64))
        return struct.pack("<H", centroids.size) + centroids.astype("<f4").tobytes() + encode_symbols(idx)

    @classmethod
    def decode(cls, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        (k,), pos = _header("<H", data, cls.name)
        if len(data) < pos + 4 * k:
            raise CodecError(f"{cls.name} data ends inside its {k} centroids: truncated")
        centroids = np.frombuffer(data[pos:pos + 4 * k], dtype="<f4").astype(np.float32)
        idx = _symbols(data, pos + 4 * k, math.prod(shape), cls.name)
        if idx.size and (idx.min() < 0 or idx.max() >= k):
            raise CodecError(f"{cls.name} data refers to centroid {int(idx.max())} of {k}: damaged")
        return torch.from_numpy(centroids[idx].copy()).reshape(shape)


@dataclass(frozen=True)
class DCT(Codec):
    step: float  # quantisation step of the coefficients (orthonormal: same units as the weights)
    cutoff: int = 0  # keep coefficients with u + v < cutoff; 0 keeps all

    name = "dct"

    def __post_init__(self):
        _check_step(self.step)
        if self.cutoff < 0:
            raise ValueError(f"dct cutoff must be >= 0, got {self.cutoff}")

    def _keep(self, h: int, w: int) -> torch.Tensor:
        u, v = torch.arange(h)[:, None], torch.arange(w)[None, :]
        return (u + v < self.cutoff) if self.cutoff else torch.ones(h, w, dtype=torch.bool)  # (h, w)

    def encode(self, w: torch.Tensor) -> bytes:
        blocks = to_blocks(w.detach().double().cpu())  # (n, h, w)
        keep = self._keep(*blocks.shape[1:])
        coef = dct2(blocks)[:, keep]  # (n, kept): dropped frequencies are not stored at all
        q = torch.round(coef / np.float32(self.step)).long().numpy()
        return struct.pack("<fH", self.step, self.cutoff) + encode_symbols(q)

    @classmethod
    def decode(cls, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        (step, cutoff), pos = _header("<fH", data, cls.name)
        step = _read_step(step, cls.name)
        empty = to_blocks(torch.zeros(shape, dtype=torch.float64))  # (n, h, w)
        keep = DCT(1.0, cutoff)._keep(*empty.shape[1:])
        q = _symbols(data, pos, empty.shape[0] * int(keep.sum()), cls.name)
        coef = empty.clone()
        coef[:, keep] = torch.from_numpy(q).double().reshape(empty.shape[0], -1) * step
        return from_blocks(idct2(coef), shape).float()


def _nearest(x: np.ndarray, sorted_c: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted values `sorted_c` for each x."""
    return np.searchsorted((sorted_c[1:] + sorted_c[:-1]) / 2, x)


def _pack_units(rows: torch.Tensor, inputs: torch.Tensor) -> bytes:
    """Two bit masks (output units, then input units), packed into bytes."""
    return np.packbits(np.concatenate([rows.numpy(), inputs.numpy()])).tobytes()


def _read_units(data: bytes, pos: int, shape: tuple[int, ...], what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rows, inputs, position after the masks) read at `pos` for a tensor of `shape`."""
    if len(shape) < 2:
        raise CodecError(f"{what} data for a tensor of shape {shape}: needs 2 or more dimensions")
    o, i = shape[0], shape[1]
    nmask = (o + i + 7) // 8
    if len(data) < pos + nmask:
        raise CodecError(f"{what} data ends inside its unit masks: truncated")
    bits = np.unpackbits(np.frombuffer(data[pos:pos + nmask], dtype=np.uint8))[: o + i].astype(bool)
    return torch.from_numpy(bits[:o].copy()), torch.from_numpy(bits[o:].copy()), pos + nmask


def _scatter_units(block: torch.Tensor, rows: torch.Tensor, inputs: torch.Tensor,
                   shape: tuple[int, ...]) -> torch.Tensor:
    """The kept (o', i', k) block placed back among zeros at its units: a tensor of `shape`."""
    m = torch.zeros(shape[0], shape[1], math.prod(shape[2:]), dtype=block.dtype)
    m[rows.nonzero()[:, 0][:, None], inputs.nonzero()[:, 0][None, :]] = block
    return m.reshape(shape)


@dataclass(frozen=True)
class Structured(Codec):
    """Structured pruning: whole output units (rows: dim 0) and whole input units (dim 1, with their
    kernels) of smallest L2 norm are dropped; two bit masks say which survived, and only the surviving
    block is uniform-quantised and range-coded. Positions cost O(rows + inputs) bits, not one symbol
    per weight, which is where unstructured pruning spends most of its bytes at high sparsity."""

    rows: float  # share of output units dropped
    inputs: float  # share of input units dropped (of those still read by a kept row)
    step: float  # quantisation step of the survivors

    name = "structured"

    def __post_init__(self):
        if not (0 <= self.rows < 1 and 0 <= self.inputs < 1):
            raise ValueError(f"structured fractions must be in [0, 1), got rows={self.rows}, inputs={self.inputs}")
        _check_step(self.step)

    def encode(self, w: torch.Tensor) -> bytes:
        if w.dim() < 2:
            raise ValueError(f"structured pruning needs a weight of 2 or more dimensions, got shape {tuple(w.shape)}")
        m = w.detach().double().cpu().reshape(w.shape[0], w.shape[1], -1)  # (O, I, k)
        o, i, _ = m.shape
        keep_rows = torch.ones(o, dtype=torch.bool)
        keep_rows[m.pow(2).sum((1, 2)).argsort()[: int(self.rows * o)]] = False
        keep_in = torch.ones(i, dtype=torch.bool)
        keep_in[m[keep_rows].pow(2).sum((0, 2)).argsort()[: int(self.inputs * i)]] = False
        kept = m[keep_rows][:, keep_in]  # (o', i', k)
        q = torch.round(kept / np.float32(self.step)).long().numpy()
        return struct.pack("<f", self.step) + _pack_units(keep_rows, keep_in) + encode_symbols(q)

    @classmethod
    def decode(cls, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        (step,), pos = _header("<f", data, cls.name)
        step = _read_step(step, cls.name)
        keep_rows, keep_in, pos = _read_units(data, pos, shape, cls.name)
        block_shape = (int(keep_rows.sum()), int(keep_in.sum()), math.prod(shape[2:]))
        q = _symbols(data, pos, math.prod(block_shape), cls.name)
        block = torch.from_numpy(q).double().reshape(block_shape) * step
        return _scatter_units(block, keep_rows, keep_in, shape).float()


@dataclass(frozen=True)
class Raw(Codec):
    """Lossless: the float32 values as they are (the reference every lossy code is measured against)."""

    name = "raw"

    def encode(self, w: torch.Tensor) -> bytes:
        return w.detach().cpu().float().numpy().astype("<f4").tobytes()

    @classmethod
    def decode(cls, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if len(data) != 4 * n:
            raise CodecError(f"raw data of {len(data)} bytes for {n} float32 values ({4 * n} bytes)")
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32)).reshape(shape)


def unit_masks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, inputs) boolean masks of the units of `w` (2 or more dimensions) that hold a non-zero
    weight: output units (dim 0) first, then input units (dim 1) among the rows kept."""
    m = w.reshape(w.shape[0], w.shape[1], -1) != 0
    rows = m.any(2).any(1)
    return rows, m[rows].any(2).any(0)


@dataclass(frozen=True)
class Units(Codec):
    """`inner` (uniform, prune, kmeans or learned), then the output and input units its code left
    all zero cut out: two bit masks say which units remain, and only their block is range-coded, by
    the same quantiser (a learned code: the same step and transform, densities fitted to the
    block). Where whole units are dead (as group lasso makes them), their positions cost a
    bit per unit instead of a symbol per weight; elsewhere the masks cost (rows + inputs) / 8 bytes
    more than `inner` alone. decode(encode(w)) equals inner's decode(encode(w)) exactly."""

    inner: Codec

    name = "units"
    KINDS = ("uniform", "kmeans", "learned")  # the block's code, the first byte of the data

    def __post_init__(self):
        if not (isinstance(self.inner, (Uniform, Prune, KMeans)) or getattr(self.inner, "name", None) == "learned"):
            raise ValueError(f"units wraps a uniform, prune, kmeans or learned code, got {self.inner!r}")

    def spec(self) -> dict:
        return {"codec": self.name, "inner": self.inner.spec()}

    def encode(self, w: torch.Tensor) -> bytes:
        if w.dim() < 2:
            raise ValueError(f"units needs a weight of 2 or more dimensions, got shape {tuple(w.shape)}")
        return self.pack(self.inner.roundtrip(w)[0])

    def pack(self, decoded: torch.Tensor) -> bytes:
        """The bytes for a tensor `inner` has already decoded (its values are kept exactly)."""
        d = decoded.detach().float().cpu()
        rows, inputs = unit_masks(d)
        block = d.reshape(d.shape[0], d.shape[1], -1)[rows][:, inputs]  # (o', i', k)
        if self.inner.name == "learned" and block.numel():
            block = block.reshape(block.shape[0], block.shape[1], *d.shape[2:])  # kernels stay kernels (DCT)
            code = type(self.inner).fitted(block, self.inner.step, self.inner.transform, self.inner.grouping)
            kind, data = 2, code.encode(block)
        elif isinstance(self.inner, KMeans):
            kind, data = 1, KMeans(self.inner.k).encode(block)  # <= k values: kept exactly
        else:
            kind, data = 0, Uniform(self.inner.step).encode(block)  # multiples of the step: kept exactly
        return struct.pack("<B", kind) + _pack_units(rows, inputs) + data

    @classmethod
    def decode(cls, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        (kind,), pos = _header("<B", data, cls.name)
        if kind >= len(cls.KINDS):
            raise CodecError(f"{cls.name} data names block code {kind} (known: 0..{len(cls.KINDS) - 1}): damaged")
        rows, inputs, pos = _read_units(data, pos, shape, cls.name)
        block_shape = (int(rows.sum()), int(inputs.sum()), math.prod(shape[2:]))
        if cls.KINDS[kind] == "learned":
            if not all(block_shape):
                raise CodecError(f"{cls.name} data has a learned code for an empty block: damaged")
            block = CODECS["learned"].decode(data[pos:], (*block_shape[:2], *shape[2:])).reshape(block_shape)
        else:
            block = CODECS[cls.KINDS[kind]].decode(data[pos:], block_shape)
        return _scatter_units(block, rows, inputs, shape)


CODECS = {c.name: c for c in (Raw, Uniform, Prune, Structured, KMeans, DCT, Units)}


def decode_tensor(codec_name: str, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode bytes written by the codec named `codec_name`."""
    if codec_name not in CODECS:
        raise CodecError(f"unknown codec {codec_name!r}; known: {', '.join(CODECS)}")
    return CODECS[codec_name].decode(data, shape)


def codec_from_spec(spec: dict) -> Codec:
    """{"codec": "dct", "step": 0.01, "cutoff": 3} -> DCT(step=0.01, cutoff=3)."""
    spec = dict(spec)
    name = spec.pop("codec", None)
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(CODECS)}")
    if name == Units.name and isinstance(spec.get("inner"), dict):
        spec["inner"] = codec_from_spec(spec["inner"])
    try:
        return CODECS[name](**spec)
    except TypeError as e:
        raise ValueError(f"bad parameters for codec {name!r}: {e}") from e
