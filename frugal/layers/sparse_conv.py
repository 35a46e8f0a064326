"""Block-sparse convolution: a conv computed only on the blocks of a feature map that asked for it.

The map is cut into s x s blocks. Each block of each example carries a level: 0 = skip, 1 = the
first kernel size (say 3x3), 2 = the second (say 5x5), and so on. For every level the chosen blocks
are gathered with their halo into a batch of tiles, one dense conv runs on that batch, and the
results are scattered back; skipped blocks cost nothing and read zeros. Optionally each pixel's
normalised (x, y) position in the whole map is given to the conv as two extra input channels, so
that a block knows where it is.

The result equals a dense conv of the whole map (zero padding at the borders) kept only on the
chosen blocks, which is what the tests check against `F.conv2d`.

Two forms. `forward(x, levels)` takes and returns a dense map (zeros on skipped blocks). In a stack
of sparse layers the dense map is waste: allocating and zeroing it costs as much as the conv on a
quarter of the blocks. `forward_tiles(x, blocks)` returns only the chosen blocks, as tiles
(n, s, s, C), and takes either a dense map or the previous layer's tiles; the halo of a tile is
then read from its neighbours' tiles, or zeros where a neighbour was skipped.
"""

from __future__ import annotations

import functools
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
                 block_size: int, halo: int, coords: bool, workspace: "Workspace | None" = None) -> torch.Tensor:
    """One tile per chosen block: the block plus `halo` pixels on each side, zero outside the map,
    with the two coordinate channels appended when `coords`: (n, C [+2], s + 2 halo, s + 2 halo),
    channels-last in memory.

    x_nhwc is the feature map as (B, H, W, C), so that each gathered pixel is one contiguous run of C
    values. Only the chosen tiles are read (no padded copy of the map): the cost follows the blocks.
    With a `workspace` (inference only) the tiles live in reused memory."""
    _, h, w, c = x_nhwc.shape
    rows, cols, inside = _tile_pixels(yi, xi, block_size, halo, h, w)
    # one index_select of whole pixels (C contiguous values each) from the flat map; the few pixels
    # outside the map, read clamped, are then zeroed in place (cheaper than a mask over every tile)
    idx = (bi[:, None, None] * h + rows.clamp(0, h - 1)[:, :, None]) * w + cols.clamp(0, w - 1)[:, None, :]  # (n, T, T)
    flat = x_nhwc.reshape(-1, c)
    if workspace is None:
        tiles = flat.index_select(0, idx.view(-1))  # (n*T*T, C)
    else:
        tiles = torch.index_select(flat, 0, idx.view(-1), out=workspace.get("tiles", (idx.numel(), c), flat))
    outside = (~inside).view(-1).nonzero().squeeze(1)
    if outside.numel():
        tiles = tiles.index_fill(0, outside, 0) if tiles.requires_grad else tiles.index_fill_(0, outside, 0)
    tiles = tiles.view(*idx.shape, c)  # (n, T, T, C)
    if coords:
        tiles = _append_coordinates(tiles, yi, xi, block_size, halo, h, w)
    return tiles.permute(0, 3, 1, 2)  # (n, C', T, T), channels-last in memory


def _tile_pixels(yi: torch.Tensor, xi: torch.Tensor, s: int, halo: int, h: int, w: int):
    """Pixel rows (n, T) and columns (n, T) of each tile with its halo, and (n, T, T) inside the map."""
    ar = torch.arange(s + 2 * halo, device=yi.device)
    rows = (yi * s - halo)[:, None] + ar  # (n, T), may fall outside the map
    cols = (xi * s - halo)[:, None] + ar  # (n, T)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (n, T, T)
    return rows, cols, inside


def _append_coordinates(tiles: torch.Tensor, yi: torch.Tensor, xi: torch.Tensor, s: int, halo: int,
                        h: int, w: int) -> torch.Tensor:
    """(n, T, T, C) -> (n, T, T, C+2): each pixel's normalised (x, y) in the h x w map, zero outside
    it (as a dense conv pads the coordinate channels with zeros)."""
    xy = _coordinate_tiles(s, halo, h, w, tiles.dtype, tiles.device)[yi, xi]  # (n, T, T, 2)
    return torch.cat([tiles, xy], dim=-1)


@functools.lru_cache(maxsize=8)
def _coordinate_tiles(s: int, halo: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(gh, gw, T, T, 2): the coordinate channels of every block's tile in an h x w map. They depend on
    the geometry alone, so a tile's are one index into this, computed once (never written to)."""
    gh, gw = math.ceil(h / s), math.ceil(w / s)
    yi = torch.arange(gh, device=device).repeat_interleave(gw)
    xi = torch.arange(gw, device=device).repeat(gh)
    rows, cols, inside = _tile_pixels(yi, xi, s, halo, h, w)
    t = rows.shape[1]
    cx = _axis_coordinate(cols, w, dtype)[:, None, :].expand(-1, t, t)  # (n, T, T): x varies along columns
    cy = _axis_coordinate(rows, h, dtype)[:, :, None].expand(-1, t, t)  # (n, T, T): y varies along rows
    return (torch.stack([cx, cy], dim=-1) * inside[..., None].to(dtype)).view(gh, gw, t, t, 2)


class BlockSet:
    """The chosen blocks of a batch, shared by every sparse layer that uses the same level map.

    `bi, yi, xi` (n,) are the chosen blocks (level > 0) in row-major order: tile j of every tile
    tensor is block (bi[j], yi[j], xi[j]). `index` (B, gh, gw) maps a block to its tile, or to n,
    the zero tile, where the block was skipped."""

    def __init__(self, levels: torch.Tensor):
        if levels.dim() != 3:
            raise ValueError(f"levels must have shape (B, rows, cols), got {tuple(levels.shape)}")
        self.levels = levels
        b, gh, gw = levels.shape
        self.grid = (gh, gw)
        self.bi, self.yi, self.xi = (levels > 0).nonzero(as_tuple=True)  # (n,) each
        self.n = self.bi.numel()
        self.index = torch.full((b, gh, gw), self.n, dtype=torch.long, device=levels.device)
        self.index[self.bi, self.yi, self.xi] = torch.arange(self.n, device=levels.device)
        self.tile_levels = levels[self.bi, self.yi, self.xi]  # (n,)

    def of_level(self, level: int) -> torch.Tensor:
        """Positions (m,) in the tile list of the blocks at `level`."""
        return (self.tile_levels == level).nonzero(as_tuple=True)[0]

    def to_map(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles (n, s, s, C) -> the dense map (B, C, gh*s, gw*s), zero on skipped blocks. (Writing each
        value once, copied or zeroed by block rows, is slower on CPU: a fresh map's cost is its page
        faults, which a memset pays at full speed.)"""
        (b, gh, gw), (s, c) = self.levels.shape, (tiles.shape[1], tiles.shape[3])
        out = tiles.new_zeros(b, gh * s, gw * s, c)  # (B, H, W, C)
        out.view(b, gh, s, gw, s, c).permute(0, 1, 3, 2, 4, 5)[self.bi, self.yi, self.xi] = tiles
        return out.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory

    def __repr__(self) -> str:
        return f"BlockSet(batch={self.levels.shape[0]}, grid={self.grid}, chosen={self.n})"


def gather_tiles_from_tiles(tiles: torch.Tensor, blocks: BlockSet, sel: torch.Tensor, halo: int,
                            workspace: "Workspace | None" = None) -> torch.Tensor:
    """The tiles `sel` (m,) of a tile tensor (n, s, s, C), each grown by `halo` pixels read from its
    neighbours' tiles (zeros for skipped neighbours and outside the map): (m, s + 2 halo, s + 2 halo, C).
    With a `workspace` (inference only) the result lives in reused memory."""
    n, s, _, c = tiles.shape
    (gh, gw) = blocks.grid
    p = torch.arange(-halo, s + halo, device=tiles.device)  # (T,) pixel offsets within the tile
    shift, local = torch.div(p, s, rounding_mode="floor"), p.remainder(s)  # neighbour offset and its pixel
    bi, yi, xi = blocks.bi[sel], blocks.yi[sel], blocks.xi[sel]  # (m,)
    ny, nx = yi[:, None] + shift, xi[:, None] + shift  # (m, T) block row / column each pixel comes from
    inside = ((ny >= 0) & (ny < gh))[:, :, None] & ((nx >= 0) & (nx < gw))[:, None, :]  # (m, T, T)
    src = blocks.index[bi[:, None, None], ny.clamp(0, gh - 1)[:, :, None], nx.clamp(0, gw - 1)[:, None, :]]
    src = torch.where(inside, src, n)  # (m, T, T): the tile each pixel comes from; n = zeros
    flat = ((src * s + local[None, :, None]) * s + local[None, None, :]).view(-1)  # (m*T*T,) row in `store`
    t = p.numel()
    if workspace is None:
        store = torch.cat([tiles, tiles.new_zeros(1, s, s, c)]).view(-1, c)  # last tile: the zeros
        return store.index_select(0, flat).view(-1, t, t, c)  # (m, T, T, C)
    store = workspace.get("store", ((n + 1) * s * s, c), tiles)
    store[: n * s * s] = tiles.reshape(-1, c)
    store[n * s * s:] = 0
    out = workspace.get("tiles", (flat.numel(), c), tiles)
    return torch.index_select(store, 0, flat, out=out).view(-1, t, t, c)  # (m, T, T, C)


class Workspace:
    """Reused scratch memory for inference. A fresh tensor of tens of MB costs a page fault per 4 kB
    on every call (the allocator hands large blocks back to the system), about as much as the conv
    on a quarter of the blocks; scratch that autograd never keeps can be reused instead."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        need = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(need, dtype=like.dtype, device=like.device)
        return buf[:need].view(shape)


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
        self._workspace = Workspace()
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
        check_levels(levels, x, self.block_size, self.n_levels)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        blocks = BlockSet(levels)
        return blocks.to_map(self.forward_tiles(x, blocks))  # (B, out, H, W), zero on skipped blocks

    def forward_tiles(self, x: torch.Tensor, blocks: BlockSet) -> torch.Tensor:
        """x: a dense map (B, C, H, W), or the tiles (n, s, s, C) of the previous sparse layer on the
        same blocks. Returns this layer's tiles (n, s, s, out), pre-activation, one per chosen block."""
        s, (gh, gw) = self.block_size, blocks.grid
        b = blocks.levels.shape[0]
        if tuple(x.shape) == (b, self.in_channels, gh * s, gw * s):
            check_levels(blocks.levels, x, s, self.n_levels)
            from_tiles, x_nhwc = False, x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
        elif tuple(x.shape) == (blocks.n, s, s, self.in_channels):
            if blocks.n and int(blocks.tile_levels.max()) > self.n_levels:
                raise ValueError(f"levels must be in 0..{self.n_levels} (0 = skip), got up to "
                                 f"{int(blocks.tile_levels.max())}")
            from_tiles, x_nhwc = True, x
        else:
            raise ValueError(f"expected a map {(b, self.in_channels, gh * s, gw * s)} or tiles "
                             f"{(blocks.n, s, s, self.in_channels)} for {blocks}, got {tuple(x.shape)}")
        # scratch for the gathered tiles: reused at inference, fresh when autograd keeps the tiles
        workspace = self._workspace if not torch.is_grad_enabled() else None
        out = None
        for lvl, k in enumerate(self.kernel_sizes, start=1):
            sel = blocks.of_level(lvl)  # (m,)
            if sel.numel() == 0:
                continue
            if from_tiles:
                tiles = gather_tiles_from_tiles(x_nhwc, blocks, sel, k // 2, workspace)  # (m, T, T, C)
                if self.coords:
                    tiles = _append_coordinates(tiles, blocks.yi[sel], blocks.xi[sel], s, k // 2, gh * s, gw * s)
                tiles = tiles.permute(0, 3, 1, 2)  # (m, C', T, T), channels-last in memory
            else:
                tiles = gather_tiles(x_nhwc, blocks.bi[sel], blocks.yi[sel], blocks.xi[sel], s, k // 2, self.coords,
                                     workspace)
            bias = self.bias[lvl - 1] if self.bias is not None else None
            y = F.conv2d(tiles, self.weight[lvl - 1], bias).permute(0, 2, 3, 1)  # (m, s, s, out)
            if sel.numel() == blocks.n:
                return y.contiguous()  # one level for every tile: already in tile order (a view if channels-last)
            if out is None:
                out = x.new_empty(blocks.n, s, s, self.out_channels)  # every chosen tile gets written
            out[sel] = y.to(out.dtype)
        return out if out is not None else x.new_empty(0, s, s, self.out_channels)

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
