"""Speed of the block-sparse conv against the dense conv it replaces, on CPU, in one process.

For each block density d, every example gets exactly round(d * blocks) blocks at random; the dense
layer is one `F.conv2d` over the whole map. Both run under no_grad, timed in turn within each
round, and the medians are compared: speed-up = dense / sparse, ideal = 1 / d, efficiency =
speed-up * d.

Three forms of the sparse layer are timed. `map`: a dense map in, a dense map out (zeros on skipped
blocks), as a drop-in for one conv. `tiles`: the chosen blocks' tiles in and out, as a layer inside
a stack of sparse layers runs (the saccadic CNN's stages); the timed call includes building the
block index from the level map, which a model does once per forward pass for all its stages.
`drop-in`: an nn.Conv2d gated by `frugal.saccade.sparsify` (its gate given the same blocks, so no
policy runs), as it computes inside a user's network.

A fresh output map costs its page faults on CPU (the dense conv pays them too); PyTorch backs
large CPU tensors with transparent huge pages when THP_MEM_ALLOC_ENABLE=1 is set, which cuts that
cost. The setting is recorded in the output.

    python -m frugal.benchmarks.sparse_conv --channels 64 --size 60 --batch 64 --block 10 12
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from frugal.benchmarks import add_out_arg, add_where_args, publish, where
from frugal.benchmarks.saccade_model import alternate_timing
from frugal.saccade import BlockSet, BlockSparseConv2d
from frugal.utils import versions


def random_levels(b: int, gh: int, gw: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """(b, gh, gw) with exactly round(density * gh * gw) blocks at level 1 per example, the rest 0."""
    n = gh * gw
    k = max(1, round(density * n))
    order = torch.rand(b, n, generator=gen).argsort(dim=1)  # a random permutation per example
    levels = torch.zeros(b, n, dtype=torch.long)
    levels.scatter_(1, order[:, :k], 1)
    return levels.view(b, gh, gw)  # (b, n) -> (b, gh, gw)


class _Sparse(torch.nn.Module):
    def __init__(self, conv: BlockSparseConv2d, levels: torch.Tensor):
        super().__init__()
        self.conv, self.levels = conv, levels

    def forward(self, x):
        return self.conv(x, self.levels)


class _Tiles(torch.nn.Module):
    def __init__(self, conv: BlockSparseConv2d, levels: torch.Tensor):
        super().__init__()
        self.conv, self.levels = conv, levels

    def forward(self, tiles):
        return self.conv.forward_tiles(tiles, BlockSet(self.levels))


class _Dense(torch.nn.Module):
    def __init__(self, conv: BlockSparseConv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        k = self.conv.kernel_sizes[0]
        return F.conv2d(x, self.conv.weight[0], self.conv.bias[0], padding=k // 2)


def _drop_in(channels: int, kernel: int, block: int, conv: BlockSparseConv2d, levels: torch.Tensor) -> torch.nn.Module:
    """An nn.Conv2d with the layer's weights, gated by sparsify, its gate fixed to `levels`."""
    from frugal.saccade import sparsify

    plain = torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2).to(levels.device)
    with torch.no_grad():
        plain.weight.copy_(conv.weight[0])
        plain.bias.copy_(conv.bias[0])
    net = torch.nn.Sequential(plain)
    gate = sparsify(net, block_size=block, in_channels=channels)
    gate.fixed_levels = levels
    return net


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=60)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--block", type=int, nargs="+", default=[10, 12])
    p.add_argument("--density", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    p.add_argument("--repeats", type=int, default=10)
    add_where_args(p, data_dir=False)
    p.add_argument("--nchw", action="store_true",
                   help="feed NCHW input; default channels-last, the layout a stack of sparse layers passes on")
    add_out_arg(p)
    a = p.parse_args(argv)
    for b in a.block:
        if b < 1:
            p.error(f"--block must be >= 1, got {b}")
        if a.size % b:
            p.error(f"--size {a.size} is not a multiple of --block {b}: pick a size the blocks tile "
                    f"(e.g. --size {a.size + (-a.size) % b} for block {b})")
    device = where(a)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.channels, a.size, a.size, generator=gen).to(device)
    if not a.nchw:
        x = x.contiguous(memory_format=torch.channels_last)  # the dense conv gets the same layout
    rows = []
    for block in a.block:
        conv = BlockSparseConv2d(a.channels, a.channels, block_size=block, kernel_sizes=(a.kernel,),
                                 coords=False).to(device)
        dense = _Dense(conv)
        g = a.size // block
        for d in a.density:
            levels = random_levels(a.batch, g, g, d, gen).to(device)
            blocks = BlockSet(levels)
            tiles = x.permute(0, 2, 3, 1).reshape(a.batch, g, block, g, block, a.channels).permute(
                0, 1, 3, 2, 4, 5)[blocks.bi, blocks.yi, blocks.xi].contiguous()  # (n, s, s, C): the chosen blocks
            real_d = float((levels > 0).float().mean())
            # dense and sparse timed in turn within each round, so drifts in machine load hit both
            forms = {"dense": dense, "map": _Sparse(conv, levels), "tiles": _Tiles(conv, levels),
                     "drop-in": _drop_in(a.channels, a.kernel, block, conv, levels)}
            t = alternate_timing(forms, x, a.repeats, inputs={"tiles": tiles})
            t_dense = t["dense"]
            for form in ("map", "tiles", "drop-in"):
                t_sparse = t[form]
                speedup = t_dense / t_sparse
                rows.append({"form": form, "block": block, "density": real_d, "dense_ms": 1e3 * t_dense,
                             "sparse_ms": 1e3 * t_sparse, "speedup": speedup, "ideal": 1 / real_d,
                             "efficiency": speedup * real_d})
    out = {"benchmark": "sparse_conv", "channels": a.channels, "size": a.size, "batch": a.batch,
           "kernel": a.kernel, "layout": "NCHW" if a.nchw else "channels_last", "device": str(device),
           "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "threads": torch.get_num_threads(), "rows": rows,
           "versions": versions()}
    return publish(out, "frugal.benchmarks.sparse_conv", argv, a.out)


if __name__ == "__main__":
    main()
