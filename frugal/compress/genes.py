"""Genes: a compact generator that writes a layer's weights, the same rule at every place.

A weight w[o, i, dy, dx] (conv) or w[o, i] (fc) is computed from what it connects: a learned
embedding of the output unit, features of the input unit, and the kernel offset. For an fc layer
that reads a flattened (C, H, W) map, the input unit is described by its channel's embedding and
its (y, x) position, so one rule can write long-range connection plans as well as local ones.
The generator is a one-hidden-layer MLP whose first layer is additive in the three parts:

    w = v . relu(A e_out[o] + B f_in[i] + K f_pos[dy, dx] + b) * gain / sqrt(fan_in)

which is evaluated as broadcast sums, (O, I, kh*kw, hidden), without building every input row.
With `rank=r` the output unit enters as a factor instead: the MLP writes r values per (input unit,
offset), and each output unit mixes them with its own r weights,

    w = u[o] . V relu(B f_in[i] + K f_pos[dy, dx] + b) * gain / sqrt(fan_in * r)

a rank-r weight whose input factors come from the shared rule: cheaper to evaluate, (I*kh*kw, r),
and it learns faster than the additive form.
In the spirit of HyperNetworks (Ha et al. 2017), whose MNIST CNN reached 99.24% with 4,240
generator parameters for 12,544 kernel weights; the size that counts is the generator's file.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.models import InputCheck, register_model


def fourier_features(coords: torch.Tensor, freqs: int) -> torch.Tensor:
    """(..., d) coordinates in [-1, 1] -> (..., d * 2 * freqs) sines and cosines of periods 4, 2, 1, ...

    The longest period is twice the span, so -1 and 1 stay apart: at period 2 they would get the
    same features and a generator could not tell a kernel's or a map's two edges apart."""
    k = (2.0 ** torch.arange(freqs, dtype=coords.dtype, device=coords.device)) * (math.pi / 2)  # (freqs,)
    a = coords[..., None] * k  # (..., d, freqs)
    return torch.cat([a.sin(), a.cos()], dim=-1).flatten(-2)  # (..., d * 2 * freqs)


def _grid(n: int, device=None) -> torch.Tensor:
    return torch.linspace(-1, 1, n, device=device) if n > 1 else torch.zeros(1, device=device)


class GeneratedWeight(nn.Module):
    """Writes a weight of shape (out, in, kh, kw) or (out, in) from a compact code.

    `in_map=(C, H, W)` says the input units are a flattened C x H x W map (an fc layer after a
    conv): they get a channel embedding plus position features instead of one embedding each."""

    def __init__(self, out_units: int, in_units: int, kernel: tuple[int, int] | None = None,
                 in_map: tuple[int, int, int] | None = None, emb: int = 8, hidden: int = 32, freqs: int = 2,
                 gain: float = 1.0, rank: int | None = None):
        super().__init__()
        if in_map is not None and math.prod(in_map) != in_units:
            raise ValueError(f"in_map {in_map} has {math.prod(in_map)} units, the layer reads {in_units}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be a positive number of factors (or None for the additive form), got {rank}")
        self.out_units, self.in_units, self.kernel, self.in_map = out_units, in_units, kernel, in_map
        self.freqs, self.gain, self.rank = freqs, gain, rank
        self.out_emb = nn.Parameter(torch.randn(out_units, rank or emb))  # u[o] with a rank, else e_out[o]
        n_in = in_map[0] if in_map else in_units
        self.in_emb = nn.Parameter(torch.randn(n_in, emb))
        # with a rank the output unit is a factor, not an input of the MLP: its bias moves to B
        self.A = None if rank else nn.Linear(emb, hidden)
        self.B = nn.Linear(emb, hidden, bias=bool(rank))
        self.P = nn.Linear(2 * 2 * freqs, hidden, bias=False) if in_map else None  # input (y, x) position
        self.K = nn.Linear(2 * 2 * freqs, hidden, bias=False) if kernel else None  # kernel offset (dy, dx)
        self.v = nn.Linear(hidden, rank or 1, bias=False)
        self.fan_in = in_units * (math.prod(kernel) if kernel else 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_units, self.in_units, *self.kernel) if self.kernel else (self.out_units, self.in_units)

    def _in_features(self) -> torch.Tensor:
        """(I, hidden): each input unit's term of the first layer."""
        b = self.B(self.in_emb)  # (C or I, hidden)
        if self.in_map is None:
            return b
        c, h, w = self.in_map
        dev = b.device
        yy, xx = torch.meshgrid(_grid(h, dev), _grid(w, dev), indexing="ij")  # (H, W) each
        pos = self.P(fourier_features(torch.stack([yy, xx], -1).to(b.dtype), self.freqs))  # (H, W, hidden)
        return (b[:, None, None, :] + pos[None]).reshape(c * h * w, -1)  # (C*H*W, hidden), flatten order

    def _offset_features(self, like: torch.Tensor) -> torch.Tensor:
        """(K, hidden): each kernel offset's term of the first layer; one zero row for an fc layer."""
        if not self.kernel:
            return like.new_zeros(1, like.shape[-1])
        kh, kw = self.kernel
        yy, xx = torch.meshgrid(_grid(kh, like.device), _grid(kw, like.device), indexing="ij")  # (kh, kw)
        return self.K(fourier_features(torch.stack([yy, xx], -1).to(like.dtype), self.freqs)).reshape(kh * kw, -1)

    def forward(self) -> torch.Tensor:
        bi = self._in_features()  # (I, hidden)
        k = self._offset_features(bi)  # (K, hidden)
        if self.rank:
            h = F.relu(bi[:, None, :] + k[None, :, :])  # (I, K, hidden)
            factors = self.v(h).flatten(0, 1)  # (I*K, r): the input side of every weight
            w = self.out_emb @ factors.T * (self.gain / math.sqrt(self.fan_in * self.rank))  # (O, I*K)
            return w.reshape(self.shape)
        a = self.A(self.out_emb)  # (O, hidden)
        h = F.relu(a[:, None, None, :] + bi[None, :, None, :] + k[None, None, :, :])  # (O, I, K, hidden)
        w = self.v(h).squeeze(-1) * (self.gain / math.sqrt(self.fan_in))  # (O, I, K)
        return w.reshape(self.shape)

    def extra_repr(self) -> str:
        form = f"rank {self.rank}" if self.rank else "additive"
        return f"writes {tuple(self.shape)} ({math.prod(self.shape):,} weights), {form}"


class GeneLeNet5(nn.Module):
    """LeNet-5 (Caffe's 20-50-500) whose two big layers, conv2 (25,000 weights) and fc1 (400,000),
    are written by generators; conv1 and fc2 are small and stay direct."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, emb: int = 8,
                 hidden: int = 16, rank: int | None = None):
        super().__init__()
        self.check = InputCheck(in_channels, image_size)
        h, w = image_size
        for _ in range(2):  # conv 5x5 (valid) then max-pool 2
            h, w = (h - 4) // 2, (w - 4) // 2
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2_w = GeneratedWeight(50, 20, kernel=(5, 5), emb=emb, hidden=hidden, rank=rank)
        self.conv2_b = nn.Parameter(torch.zeros(50))
        self.fc1_w = GeneratedWeight(500, 50 * h * w, in_map=(50, h, w), emb=emb, hidden=hidden, gain=math.sqrt(2),
                                     rank=rank)
        self.fc1_b = nn.Parameter(torch.zeros(500))
        self.fc2 = nn.Linear(500, num_classes)

    def written(self) -> dict[str, torch.Tensor]:
        """The weights the generators write (for counting and for pictures)."""
        return {"conv2.weight": self.conv2_w(), "fc1.weight": self.fc1_w()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(self.check(x)), 2)
        x = F.max_pool2d(F.conv2d(x, self.conv2_w(), self.conv2_b), 2)
        x = F.relu(F.linear(x.flatten(1), self.fc1_w(), self.fc1_b))
        return self.fc2(x)


@register_model
def genes_lenet5(in_channels: int = 1, image_size: tuple[int, int] = (28, 28), num_classes: int = 10,
                 emb: int = 8, hidden: int = 16, rank: int | None = None) -> nn.Module:
    """LeNet-5 with conv2 and fc1 written by compact generators ("genes"); `rank` for the factored form."""
    return GeneLeNet5(in_channels, image_size, num_classes, emb=emb, hidden=hidden, rank=rank)
