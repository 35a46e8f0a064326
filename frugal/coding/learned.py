"""A learned code for one weight tensor: the tensor in a decorrelating form (each kernel's DCT, or
the weights as they are), divided by a step and rounded to integers, and the integers range-coded
under a small parametric density per group of coefficients (the DCT's frequency bands, or the
whole tensor). The density's parameters travel in the bytes (float16), so the file needs no
histogram and no zero mask: every integer, zero or not, costs -log2 of its probability.

The density of a group is a mixture of two logistics around a shared centre, discretised to the
integers: P(q) = pi (F1(q + 1/2) - F1(q - 1/2)) + (1 - pi) (F2(q + 1/2) - F2(q - 1/2)), with
parameters (centre, logit pi, log s1, log s2). `bits` gives the same quantity in torch, so a
training loss can be the code length itself (`frugal.compress.rate`).

The range coder's table is that density on the group's integer range, computed in float64 and
quantised to integer counts at TABLE_BITS: a last-bit difference in a platform's exp cannot change
a count, so any machine decodes what another wrote.

Layout of the bytes: u8 transform, u8 grouping, f32 step, varint G groups, G x 4 float16
parameters, per group zigzag-varint smallest integer and varint range, varint words, the words.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from frugal.coding.codecs import CODECS, Codec, _check_step, _header, _read_step, dct2, from_blocks, idct2, to_blocks
from frugal.coding.entropy import (MARGIN_BITS, MAX_ALPHABET, CodecError, read_varint, unzigzag, write_varint,
                                   zigzag)

TRANSFORMS = ("none", "dct")
GROUPINGS = ("tensor", "frequency")
N_PARAMS = 4  # per group: centre, logit of the first component's weight, log scale 1, log scale 2
TABLE_BITS = 20  # resolution of the range coder's table: counts = floor(p 2^TABLE_BITS) + 1
MIN_LOG_SCALE, MAX_LOG_SCALE = -8.0, 12.0  # scales from 3e-4 to 1.6e5 integer steps


def coefficients(w: torch.Tensor, transform: str) -> torch.Tensor:
    """The tensor as (n, h, w) pictures (see `to_blocks`) in the code's domain: each kernel's (or fc
    block's) orthonormal DCT, or the values as they are."""
    blocks = to_blocks(w)
    return dct2(blocks) if transform == "dct" else blocks


def weights(coef: torch.Tensor, shape: tuple[int, ...], transform: str) -> torch.Tensor:
    """Inverse of `coefficients`."""
    return from_blocks(idct2(coef) if transform == "dct" else coef, shape)


def block_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(to_blocks(torch.empty(shape, device="meta")).shape)


def group_index(shape: tuple[int, ...], transform: str, grouping: str) -> torch.Tensor:
    """(h, w) long: each coefficient position's group within a picture (frequency: u + v of the DCT)."""
    _, h, w = block_shape(shape)
    if grouping == "frequency" and transform == "dct":
        return torch.arange(h)[:, None] + torch.arange(w)[None, :]
    return torch.zeros(h, w, dtype=torch.long)


def n_groups(shape: tuple[int, ...], transform: str, grouping: str) -> int:
    return int(group_index(shape, transform, grouping).max()) + 1


def init_density(groups: int) -> torch.Tensor:
    """(G, 4): centre 0, even weights, scales 1 and 8 steps."""
    return torch.tensor([[0.0, 0.0, 0.0, math.log(8.0)]] * groups)


def log_prob(y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Natural log of P(round(y)) under the discretised mixture, evaluated at real y (a noisy
    integer in training); `params` (..., 4) broadcasts against y's shape + (4,)."""
    centre, logit = params[..., 0], params[..., 1]
    ls1 = params[..., 2].clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)
    ls2 = params[..., 3].clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)
    x = y - centre
    parts = [_logistic_mass(x, torch.exp(-ls)) for ls in (ls1, ls2)]
    lw1 = torch.nn.functional.logsigmoid(logit)
    lw2 = torch.nn.functional.logsigmoid(-logit)
    return torch.logaddexp(lw1 + parts[0], lw2 + parts[1])


def _logistic_mass(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """log(sigmoid((x + 1/2) / s) - sigmoid((x - 1/2) / s)), stable in both tails: with
    a = (|x| - 1/2) / s and d = 1 / s, the mass is sigmoid(-a) - sigmoid(-a - d)
    = sigmoid(-a) sigmoid(a + d) (1 - exp(-d)) (by the logistic's symmetry)."""
    a = (x.abs() - 0.5) * inv_scale
    d = inv_scale
    return (torch.nn.functional.logsigmoid(-a) + torch.nn.functional.logsigmoid(a + d)
            + torch.log(-torch.expm1(-d)))


def bits(y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """-log2 P(y) summed: the code length of the integers y under the density (differentiable in
    y and the parameters)."""
    return -log_prob(y, params).sum() / math.log(2)


def table(params: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Integer counts (float64, as constriction takes them) of the integers lo..hi under one group's
    density: floor(P 2^TABLE_BITS) + 1, P computed in float64 (see the module's note)."""
    p = torch.from_numpy(np.asarray(params, dtype=np.float64))
    q = torch.arange(lo, hi + 1, dtype=torch.float64)
    prob = torch.exp(log_prob(q, p)).numpy()
    return np.floor(prob * (1 << TABLE_BITS)) + 1.0


def table_bits(counts: np.ndarray, symbols: np.ndarray) -> float:
    """What the table's own probabilities say the symbols (indices into the table) cost, in bits."""
    p = counts / counts.sum()
    return float(-np.log2(p[symbols]).sum())


def fit_density(q: torch.Tensor, groups: torch.Tensor, steps: int = 150, lr: float = 0.1) -> torch.Tensor:
    """(G, 4) density parameters fitted by maximum likelihood (Adam) to integers `q` (n, h, w) whose
    positions fall in `groups` (h, w); each group is fitted on its histogram, so the cost grows with
    the distinct values, not with the tensor."""
    g_count = int(groups.max()) + 1
    values, counts, owners = [], [], []
    for g in range(g_count):
        v, c = torch.unique(q[:, groups == g], return_counts=True)
        values.append(v.double())
        counts.append(c.double())
        owners.append(torch.full_like(v, g))
    v, c, o = torch.cat(values), torch.cat(counts), torch.cat(owners).long()
    params = init_density(g_count).double()
    for g in range(g_count):  # start each group at its own centre and spread
        mask = o == g
        mean = float((v[mask] * c[mask]).sum() / c[mask].sum())
        spread = float(((v[mask] - mean).pow(2) * c[mask]).sum() / c[mask].sum()) ** 0.5
        params[g] = torch.tensor([mean, 0.0, math.log(max(spread / 4, 0.1)), math.log(max(spread, 0.5))])
    params.requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            nll = -(log_prob(v, params[o]) * c).sum() / c.sum()
            nll.backward()
            opt.step()
    return params.detach().float()


def rdoq(coef: torch.Tensor, step: float, density: torch.Tensor, groups: torch.Tensor, lam: float) -> torch.Tensor:
    """Rate-distortion optimised quantisation: for each coefficient (n, h, w) the integer among
    round(c / step), one step nearer zero, and zero that minimises (c - q step)^2 + lam x its bits
    under the densities (G, 4) of its group; lam is in squared weight units per bit."""
    c = coef.double()
    r = torch.round(c / step)
    options = torch.stack([r, r - torch.sign(r), torch.zeros_like(r)])  # (3, n, h, w)
    params = density.double()[groups]  # (h, w, 4)
    cost = (c - options * step).pow(2) - lam * log_prob(options, params) / math.log(2)
    return options.gather(0, cost.argmin(0, keepdim=True))[0].long()


@dataclass(frozen=True)
class Learned(Codec):
    """The learned code: `step` (weight units), `density` ((G, 4) parameters, float16-exact), the
    `transform` (none | dct) and the `grouping` (tensor | frequency) of the coefficients."""

    step: float
    density: tuple[tuple[float, ...], ...]
    transform: str = "none"
    grouping: str = "tensor"

    name = "learned"

    def __post_init__(self):
        _check_step(self.step)
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        d = np.asarray(self.density, dtype=np.float64).reshape(-1, N_PARAMS)
        if not np.isfinite(d).all():
            raise ValueError("density parameters must be finite")
        # what the bytes hold: float16 values, and a float32 step
        object.__setattr__(self, "density", tuple(tuple(float(v) for v in row) for row in d.astype(np.float16)))
        object.__setattr__(self, "step", float(np.float32(self.step)))

    @classmethod
    def fitted(cls, w: torch.Tensor, step: float, transform: str = "none", grouping: str = "tensor") -> "Learned":
        """The code at `step` whose densities are fitted to the integers of `w` (what the discrete
        loop tries alongside its fixed-histogram codes)."""
        probe = cls(step, init_density(n_groups(tuple(w.shape), transform, grouping)).tolist(), transform, grouping)
        q = probe.integers(w)
        return cls(probe.step, fit_density(q, group_index(tuple(w.shape), transform, grouping)).tolist(),
                   transform, grouping)

    @classmethod
    def rd_coded(cls, w: torch.Tensor, step: float, alpha: float, transform: str = "none", grouping: str = "tensor",
                 rounds: int = 2) -> tuple["Learned", torch.Tensor]:
        """(code, weights it codes exactly): the integers of `w` at `step` chosen by `rdoq` at lam =
        alpha x step^2, alternating with fitting the densities to them `rounds` times (alpha 0:
        plain rounding). Post-hoc coding of trained weights, as a standard coder's RDOQ does."""
        shape = tuple(w.shape)
        groups = group_index(shape, transform, grouping)
        code = cls.fitted(w, step, transform, grouping)
        if alpha <= 0:
            return code, code.roundtrip(w)[0]
        coef = coefficients(w.detach().double().cpu(), transform)
        for _ in range(rounds):
            q = rdoq(coef, code.step, torch.tensor(code.density), groups, alpha * code.step ** 2)
            code = cls(code.step, fit_density(q, groups).tolist(), transform, grouping)
        q = rdoq(coef, code.step, torch.tensor(code.density), groups, alpha * code.step ** 2)
        decoded = weights(q.double() * code.step, shape, transform).float()
        return code, code.roundtrip(decoded)[0]  # the float32 weights the file decodes to

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        """(n, h, w) long: round(coefficients / step)."""
        coef = coefficients(w.detach().double().cpu(), self.transform)
        return torch.round(coef / self.step).long()

    def encode(self, w: torch.Tensor) -> bytes:
        import constriction

        shape = tuple(w.shape)
        groups = group_index(shape, self.transform, self.grouping)
        if len(self.density) != int(groups.max()) + 1:
            raise ValueError(f"{len(self.density)} density rows for {int(groups.max()) + 1} groups of shape {shape}")
        q = self.integers(w)
        out = bytearray(struct.pack("<BBf", TRANSFORMS.index(self.transform), GROUPINGS.index(self.grouping),
                                    self.step))
        write_varint(out, len(self.density))
        out += np.asarray(self.density, dtype="<f2").tobytes()
        coder = constriction.stream.queue.RangeEncoder()
        for g in range(len(self.density)):
            s = q[:, groups == g].reshape(-1).numpy()
            lo, hi = (int(s.min()), int(s.max())) if s.size else (0, 0)
            if hi - lo + 1 > MAX_ALPHABET:
                raise ValueError(f"integers of group {g} span {hi - lo + 1} values (max {MAX_ALPHABET}); "
                                 "use a larger step")
            write_varint(out, zigzag(lo))
            write_varint(out, hi - lo + 1)
            if hi > lo:
                coder.encode((s - lo).astype(np.int32), _categorical(table(self.density[g], lo, hi)))
        words = coder.get_compressed()
        write_varint(out, words.size)
        return bytes(out) + words.astype("<u4").tobytes()

    @classmethod
    def decode(cls, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        import constriction

        what = cls.name
        (t, g_kind, step), pos = _header("<BBf", data, what)
        if t >= len(TRANSFORMS) or g_kind >= len(GROUPINGS):
            raise CodecError(f"{what} data names transform {t} / grouping {g_kind}: damaged")
        transform, grouping = TRANSFORMS[t], GROUPINGS[g_kind]
        step = _read_step(step, what)
        groups = group_index(shape, transform, grouping)
        g_count, pos = read_varint(data, pos)
        if g_count != int(groups.max()) + 1:
            raise CodecError(f"{what} data has {g_count} groups, a tensor of shape {shape} has "
                             f"{int(groups.max()) + 1}: damaged or for another tensor")
        end = pos + 2 * N_PARAMS * g_count
        if end > len(data):
            raise CodecError(f"{what} data ends inside its density parameters: truncated")
        density = np.frombuffer(data[pos:end], dtype="<f2").astype(np.float64).reshape(g_count, N_PARAMS)
        if not np.isfinite(density).all():
            raise CodecError(f"{what} data has a non-finite density parameter: damaged")
        pos = end
        ranges = []
        for _ in range(g_count):
            u, pos = read_varint(data, pos)
            k, pos = read_varint(data, pos)
            lo = unzigzag(u)
            if not 1 <= k <= MAX_ALPHABET or abs(lo) > (1 << 40):
                raise CodecError(f"{what} data has an integer range of {k} values from {lo}: damaged")
            ranges.append((lo, k))
        n_words, pos = read_varint(data, pos)
        if pos + 4 * n_words != len(data):
            raise CodecError(f"{what} data holds {len(data) - pos} bytes after its header, {4 * n_words} expected: "
                             "truncated or damaged")
        words = np.frombuffer(data[pos:], dtype="<u4").astype(np.uint32)
        nb, h, w = block_shape(shape)
        q = torch.zeros(nb, h, w, dtype=torch.float64)
        info = 0.0
        try:
            decoder = constriction.stream.queue.RangeDecoder(words) if n_words else None
            for g, (lo, k) in enumerate(ranges):
                n = nb * int((groups == g).sum())
                if k == 1:
                    s = np.full(n, lo, dtype=np.int64)
                else:
                    if decoder is None:
                        raise CodecError("no payload for a group of more than one value")
                    counts = table(density[g], lo, lo + k - 1)
                    idx = decoder.decode(_categorical(counts), n)
                    info += table_bits(counts, idx)
                    s = idx.astype(np.int64) + lo
                q[:, groups == g] = torch.from_numpy(s.astype(np.float64)).reshape(nb, -1)
        except CodecError as e:
            raise CodecError(f"{what}: {e}") from None
        except Exception as e:  # constriction reports a stream it cannot decode as a generic error
            raise CodecError(f"{what}: range-coded payload does not decode ({e}): the data is damaged") from e
        if 32 * n_words < info - MARGIN_BITS:
            raise CodecError(f"{what}: payload of {n_words} words cannot hold symbols of {info:.0f} bits: truncated")
        return weights(q * step, shape, transform).float()


def _categorical(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts, perfect=False)


CODECS[Learned.name] = Learned
