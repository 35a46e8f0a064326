"""Spatial specialisation: features computed only where a high-level feature of the base fires.

For each chosen channel of a base stage (the high-level features), a gate marks the image blocks
where that channel's activation is above its threshold (a quantile of its activations over
training images); a small conv runs on the image only on those blocks (`BlockSparseConv2d` from
the saccade work: gathered tiles, nothing computed elsewhere), and its features, max-pooled over
the computed positions, join the base's penultimate features in a residual head (zero at start,
so the untrained net is the base). Coarse to fine: the base says where, the new features say what.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.layers.sparse_conv import BlockSet, BlockSparseConv2d
from frugal.specialists.nets import Tapped


class SpatialSpecialist(nn.Module):
    def __init__(self, parent: Tapped, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 tap: int, channels: Sequence[int], thresholds: torch.Tensor, penultimate: int,
                 width: int = 8, block: int = 4, kernel: int = 5):
        super().__init__()
        h, w = image_size
        if h % block or w % block:
            raise ValueError(f"block {block} does not divide the {h}x{w} image; choose one that does")
        object.__setattr__(self, "parent", parent)  # frozen, not saved with this net
        self.tap, self.block = tap, block
        self.register_buffer("channels", torch.as_tensor(list(channels), dtype=torch.long))
        self.register_buffer("thresholds", thresholds.float().reshape(-1))  # (F,)
        self.convs = nn.ModuleList(BlockSparseConv2d(in_channels, width, block, (kernel,), coords=True)
                                   for _ in channels)
        self.head = nn.Linear(width * len(channels) + penultimate, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.computed_fraction: float = 0.0  # share of image blocks computed in the last forward, over features

    def gates(self, act: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(B, F, gh, gw) bool: blocks where each chosen channel fires anywhere inside."""
        a = act[:, self.channels]  # (B, F, h', w')
        fire = (a > self.thresholds[None, :, None, None]).float()
        gh, gw = image_size[0] // self.block, image_size[1] // self.block
        return F.adaptive_max_pool2d(fire, (gh, gw)) > 0  # (B, F, gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.parent.eval()
            logits, acts, pen = self.parent(x)
        gates = self.gates(acts[self.tap], tuple(x.shape[-2:]))  # (B, F, gh, gw)
        feats, computed = [], 0
        for f, conv in enumerate(self.convs):
            blocks = BlockSet(gates[:, f].long())
            t = F.relu(conv.forward_tiles(x, blocks))  # (n, s, s, width): only the gated blocks
            pooled = t.new_zeros(x.shape[0], t.shape[-1])
            if blocks.n:
                per_block = t.amax(dim=(1, 2))  # (n, width)
                index = blocks.bi[:, None].expand_as(per_block)  # (n, width): the example of each block
                pooled = pooled.scatter_reduce(0, index, per_block, "amax", include_self=True)  # (B, width)
            feats.append(pooled)
            computed += blocks.n
        self.computed_fraction = computed / max(1, gates.numel())
        return logits + self.head(torch.cat(feats + [pen], dim=1))


@torch.no_grad()
def choose_features(parent: Tapped, x: torch.Tensor, tap: int, n: int, quantile: float = 0.9):
    """The n channels of a tap with the largest mean activation on x, and each one's threshold:
    the `quantile` of its activations (so each gate fires on about 1 - quantile of positions)."""
    parent.eval()
    act = parent(x)[1][tap]  # (B, C, h, w)
    channels = act.mean(dim=(0, 2, 3)).topk(min(n, act.shape[1])).indices
    flat = act[:, channels].transpose(0, 1).reshape(len(channels), -1)  # (F, B*h*w)
    return channels.tolist(), torch.quantile(flat, quantile, dim=1)
