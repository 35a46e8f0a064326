"""Group-tied kernels: the output channels of a conv come in orbits of a group of image transforms
(Cohen & Welling 2016, group-equivariant CNNs), so one free kernel writes a whole orbit.

- `p4`: the four 90-degree rotations (orbits of 4 channels, a quarter of the free values).
- `p4m`: rotations and mirrors (orbits of 8 channels, an eighth).

A channel index c is (c // G, c % G): a feature and a group element. The first conv of a net lifts
the image: its kernel for element t is the free kernel transformed by t. Every later conv reads
group-structured channels: its kernel for output element t and input element s is T_t applied to
the free kernel of input element t^-1 s. Then rotating (or mirroring) the input image rotates each
feature map and permutes the elements of every orbit, through any stack of such convs with
stride 1 and symmetric padding; what the head does with the orbit is left to it (it sees all
channels, so the net can still tell orientations apart).

Kernels only: batch norm and biases stay per channel, which keeps the free-parameter count honest
(their values are counted as usual) but makes the net equivariant only while they are uniform.
"""

from __future__ import annotations

import torch
import torch.nn as nn

GROUPS = {"p4": 4, "p4m": 8}


def transform(a: torch.Tensor, element: int) -> torch.Tensor:
    """Apply group element `element` (0..7: rotate by 90 degrees (element % 4) times after a
    left-right mirror when element >= 4) to the last two (square) dims of `a`."""
    if element >= 4:
        a = a.flip(-1)
    return torch.rot90(a, element % 4, dims=(-2, -1))


def _tables(order: int) -> tuple[list[int], list[list[int]]]:
    """inverse[g] and product[g][h] (the element whose transform is T_g after T_h), found by
    applying the transforms to an asymmetric probe."""
    probe = torch.arange(9).reshape(3, 3)
    images = [transform(probe, g) for g in range(order)]

    def which(img: torch.Tensor) -> int:
        return next(e for e, im in enumerate(images) if torch.equal(im, img))

    product = [[which(transform(transform(probe, h), g)) for h in range(order)] for g in range(order)]
    inverse = [product[g].index(0) for g in range(order)]
    return inverse, product


class GroupKernel(nn.Module):
    """weight (O, I, k, k) from free kernels: (O/G, I, k, k) when `lifting`, else (O/G, I/G, G, k, k).
    A parametrization for nn.Conv2d (`torch.nn.utils.parametrize`)."""

    def __init__(self, group: str, lifting: bool):
        super().__init__()
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")
        self.group, self.order, self.lifting = group, GROUPS[group], lifting
        self.inverse, self.product = _tables(self.order)
        # for output element t, the input elements read in order s = 0..G-1 are t^-1 s
        self.register_buffer("source", torch.tensor([[self.product[self.inverse[t]][s] for s in range(self.order)]
                                                     for t in range(self.order)]), persistent=False)

    def forward(self, free: torch.Tensor) -> torch.Tensor:
        g = self.order
        if self.lifting:
            o, i, k, _ = free.shape
            w = torch.stack([transform(free, t) for t in range(g)], dim=1)  # (O/G, G, I, k, k)
            return w.reshape(o * g, i, k, k)
        o, i, _, k, _ = free.shape
        w = torch.stack([transform(free[:, :, self.source[t]], t) for t in range(g)], dim=1)  # (O/G, G, I/G, G, k, k)
        return w.reshape(o * g, i * g, k, k)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The free kernels of the nearest tied weight: the mean over each orbit of its kernels
        brought back by the inverse transform (an orthogonal projection: the orbits are disjoint
        and every transform permutes pixels)."""
        g = self.order
        o, i, k, _ = weight.shape
        inverse, product = self.inverse, self.product
        if o % g or (not self.lifting and i % g):
            what = f"{o} output channels" if o % g else f"{i} input channels"
            raise ValueError(f"{self.group} ties channels in orbits of {g}; this conv has {what}: use a model "
                             f"whose conv widths divide by {g}")
        w = weight.reshape(o // g, g, i, k, k)
        if self.lifting:
            return torch.stack([transform(w[:, t], inverse[t]) for t in range(g)]).mean(0)
        w = w.reshape(o // g, g, i // g, g, k, k)
        # W[:, t, :, s] = T_t free[:, :, t^-1 s], so free[:, :, u] = T_t^-1 W[:, t, :, t u]
        back = [transform(w[:, t][:, :, [product[t][u] for u in range(g)]], inverse[t]) for t in range(g)]
        return torch.stack(back).mean(0)
