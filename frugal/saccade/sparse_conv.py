"""Block-sparse convolution: a conv computed only on the blocks of a feature map that asked for it.

The map is cut into s x s blocks. Each block of each example carries a level: 0 = skip, 1 = the
first kernel size (say 3x3), 2 = the second (say 5x5), and so on. For every level the chosen blocks
are gathered with their halo into a batch of tiles, one dense conv runs on that batch, and the
results are scattered back; skipped blocks cost nothing and read zeros. Optionally each pixel's
normalised (x, y) position in the whole map is given to the conv as two extra input channels, so
that a block knows where it is.

The result equals a dense conv of the whole map (zero padding at the borders) kept only on the
chosen blocks, which is what the tests check against `F.conv2d`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def coordinate_channels(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(2, h, w): x then y of each pixel centre, normalised to [-1, 1] over the map."""
    ys = torch.linspace(-1, 1, h, device=device, dtype=dtype) if h > 1 else torch.zeros(1, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, w, device=device, dtype=dtype) if w > 1 else torch.zeros(1, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    return torch.stack([xx, yy])  # (2, h, w)


def check_levels(levels: torch.Tensor, x: torch.Tensor, block_size: int, n_levels: int) -> tuple[int, int]:
    """Validate a level map against a feature map; return the block grid (rows, cols)."""
    if x.dim() != 4:
        raise ValueError(f"expected a feature map (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if h % block_size or w % block_size:
        raise ValueError(f"block size {block_size} does not divide the {h}x{w} map; choose a block size "
                         f"that divides both sides, or pad the input")
    gh, gw = h // block_size, w // block_size
    if levels.shape != (b, gh, gw):
        raise ValueError(f"levels must have shape (B, H/s, W/s) = {(b, gh, gw)} for a {h}x{w} map with "
                         f"{block_size}x{block_size} blocks, got {tuple(levels.shape)}")
    if levels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"levels must be an integer tensor, got {levels.dtype}")
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) > n_levels):
        raise ValueError(f"levels must be in 0..{n_levels} (0 = skip), got values "
                         f"{int(levels.min())}..{int(levels.max())}")
    return gh, gw


def _axis_coordinate(i: torch.Tensor, n: int, dtype) -> torch.Tensor:
    """Normalised position in [-1, 1] of pixel index i on an axis of n pixels (as coordinate_channels)."""
    return (2 * i.to(dtype) / (n - 1) - 1) if n > 1 else torch.zeros_like(i, dtype=dtype)


def gather_tiles(x_nhwc: torch.Tensor, bi: torch.Tensor, yi: torch.Tensor, xi: torch.Tensor,
                 block_size: int, halo: int, coords: bool) -> torch.Tensor:
    """One tile per chosen block: the block plus `halo` pixels on each side, zero outside the map,
    with the two coordinate channels appended when `coords`: (n, C [+2], s + 2 halo, s + 2 halo),
    channels-last in memory.

    x_nhwc is the feature map as (B, H, W, C), so that each gathered pixel is one contiguous run of C
    values. Only the chosen tiles are read (no padded copy of the map): the cost follows the blocks."""
    _, h, w, _ = x_nhwc.shape
    ar = torch.arange(block_size + 2 * halo, device=x_nhwc.device)
    rows = (yi * block_size - halo)[:, None] + ar  # (n, T) pixel rows, may fall outside the map
    cols = (xi * block_size - halo)[:, None] + ar  # (n, T)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (n, T, T)
    r, c = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    tiles = x_nhwc[bi[:, None, None], r[:, :, None], c[:, None, :]]  # (n, T, T, C)
    if coords:
        t = ar.numel()
        cx = _axis_coordinate(c, w, x_nhwc.dtype)[:, None, :].expand(-1, t, t)  # (n, T, T): x varies along columns
        cy = _axis_coordinate(r, h, x_nhwc.dtype)[:, :, None].expand(-1, t, t)  # (n, T, T): y varies along rows
        tiles = torch.cat([tiles, torch.stack([cx, cy], dim=-1)], dim=-1)  # (n, T, T, C+2)
    tiles = tiles * inside[..., None].to(tiles.dtype)  # zero padding outside the map
    return tiles.permute(0, 3, 1, 2)  # (n, C', T, T), channels-last in memory


class BlockSparseConv2d(nn.Module):
    """A stride-1 'same' convolution evaluated only on chosen s x s blocks, with one kernel size per
    attention level (0 = skip). Weights are Conv2d-shaped, one per level: (out, in [+2], k, k)."""

    def __init__(self, in_channels: int, out_channels: int, block_size: int = 8,
                 kernel_sizes: Sequence[int] = (3, 5), coords: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if any(k % 2 == 0 or k < 1 for k in kernel_sizes):
            raise ValueError(f"kernel sizes must be odd and positive, got {tuple(kernel_sizes)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.block_size, self.kernel_sizes, self.coords = block_size, tuple(kernel_sizes), coords
        cin = in_channels + (2 if coords else 0)
        self.weight = nn.ParameterList(
            nn.Parameter(torch.empty(out_channels, cin, k, k, device=device, dtype=dtype)) for k in self.kernel_sizes)
        self.bias = nn.ParameterList(
            nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) for _ in self.kernel_sizes) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for i, w in enumerate(self.weight):  # as nn.Conv2d does
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(w[0].numel())
                nn.init.uniform_(self.bias[i], -bound, bound)

    @property
    def n_levels(self) -> int:
        return len(self.kernel_sizes)

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); levels: (B, H/s, W/s) integers in 0..n_levels. Returns (B, out, H, W),
        zero on skipped blocks."""
        s = self.block_size
        gh, gw = check_levels(levels, x, s, self.n_levels)
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {c}")
        # channels-last throughout: a free view when x is already channels-last (as this layer's
        # output is), one copy otherwise
        x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
        out = x.new_zeros(b, h, w, self.out_channels)  # (B, H, W, out)
        # a view of `out` with one (s, s, out) entry per block: writes through it land in `out`
        blocks = out.view(b, gh, s, gw, s, self.out_channels).permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, s, s, out)
        for lvl, k in enumerate(self.kernel_sizes, start=1):
            bi, yi, xi = (levels == lvl).nonzero(as_tuple=True)  # (n,) each
            if bi.numel() == 0:
                continue  # nothing chose this level: no work at all
            tiles = gather_tiles(x_nhwc, bi, yi, xi, s, k // 2, self.coords)  # (n, C', s+k-1, s+k-1)
            bias = self.bias[lvl - 1] if self.bias is not None else None
            y = F.conv2d(tiles, self.weight[lvl - 1], bias)  # (n, out, s, s)
            blocks[bi, yi, xi] = y.permute(0, 2, 3, 1).to(out.dtype)  # (n, s, s, out)
        return out.permute(0, 3, 1, 2)  # (B, out, H, W), channels-last in memory

    def forward_dense(self, x: torch.Tensor, level: int = 1) -> torch.Tensor:
        """Every block at `level`, as one ordinary F.conv2d over the whole map: the dense twin."""
        k = self.kernel_sizes[level - 1]
        if self.coords:
            b, _, h, w = x.shape
            x = torch.cat([x, coordinate_channels(h, w, device=x.device, dtype=x.dtype).expand(b, 2, h, w)], dim=1)
        bias = self.bias[level - 1] if self.bias is not None else None
        return F.conv2d(x, self.weight[level - 1], bias, padding=k // 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, block_size={self.block_size}, "
                f"kernel_sizes={self.kernel_sizes}, coords={self.coords}, bias={self.bias is not None}")


def dense_reference(conv: BlockSparseConv2d, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The same result computed densely: every level's conv over the whole map, kept where chosen.
    For tests and for measuring the speed-up; it does all the work the sparse version skips."""
    s = conv.block_size
    check_levels(levels, x, s, conv.n_levels)
    mask = levels.repeat_interleave(s, 1).repeat_interleave(s, 2)[:, None]  # (B, 1, H, W)
    out = x.new_zeros(x.shape[0], conv.out_channels, *x.shape[2:])
    for lvl in range(1, conv.n_levels + 1):
        out = torch.where(mask == lvl, conv.forward_dense(x, lvl), out)
    return out
