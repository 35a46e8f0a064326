"""Tied weights: each weight replaced by the mean of its cluster (weight sharing as k-means codes it,
and as a training aid holds it between rounds)."""

from __future__ import annotations

import torch


def tied(w: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
    """Each weight replaced by the mean of its cluster. `cluster` holds an index per weight
    (0..k-1), or -1 for weights held at exactly 0."""
    flat, idx = w.reshape(-1), cluster.reshape(-1)
    free = idx >= 0
    k = int(idx.max()) + 1 if free.any() else 0
    sums = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, idx[free], flat[free])
    counts = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, idx[free], torch.ones_like(flat[free]))
    out = torch.zeros_like(flat)
    out[free] = (sums / counts.clamp_min(1))[idx[free]]
    return out.view_as(w)
