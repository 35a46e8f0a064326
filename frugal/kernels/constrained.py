"""Constrained kernels: conv layers whose k x k kernels have fewer degrees of freedom by construction.

Every kind stays an `nn.Conv2d` (so counting, pruning and export tools still see a Conv2d): its
`weight` is registered with `torch.nn.utils.parametrize` as a transform of a smaller tensor of free
coefficients, and the forward pass is the ordinary `F.conv2d`. Two families:

- Linear subspaces, weight = coefficients @ basis. The symmetries are partitions of the k x k
  pixels into classes of pixels that must be equal (`lr` mirror left-right, `ud` up-down, `lrud`
  both, `c4` 90-degree rotations, `d4` rotations and mirrors, `radial` equal distance from the
  centre); the basis is the normalised indicator of each class, so projecting a kernel onto the
  class is averaging over each set of tied pixels. `dct<m>`: the m lowest-frequency orthonormal
  DCT-II basis kernels (zigzag order, as in Harmonic Networks, Ulicny et al. 2019).
- `rank<r>` (separable): weight = sum of r outer products u v^T; rank 1 is a flattened (1-D x 1-D)
  kernel. Projection is the truncated SVD.
- `lsep<R>` (layer-separable, Jaderberg et al. 2014, scheme 2): w[o, i] = sum over r < R of
  h[o, r] (horizontal, 1 x k) outer v[r, i] (vertical, k x 1): the layer is a k x 1 conv to R
  channels then a 1 x k conv, and it runs that way (`LayerSeparableConv2d`), so its cost follows its
  R k (I + O) free values instead of O I k^2.
- `p4`, `p4m` (group-tied, `frugal.kernels.group`): output channels in orbits of rotations (and
  mirrors), one free kernel per orbit, as in group-equivariant CNNs. These tie whole channels,
  so they apply to 1x1 convs too, and the first conv of a net lifts the image to the group.
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from frugal.kernels.group import GROUPS, GroupKernel

SYMMETRIES = ("lr", "ud", "lrud", "c4", "d4", "radial")


def kind_names() -> list[str]:
    return [*SYMMETRIES, "dct<m> (e.g. dct3)", "rank<r> (e.g. rank1)", "lsep<R> (e.g. lsep8)", *GROUPS]


def pixel_classes(k: int, kind: str) -> list[list[int]]:
    """Partition of the k*k pixels (row-major) into classes tied by the symmetry `kind`."""
    if kind not in SYMMETRIES:
        raise ValueError(f"unknown symmetry {kind!r}; known: {', '.join(SYMMETRIES)}")
    # pixel indices are data, computed on the CPU even where a model is being sized on the meta device
    idx = torch.arange(k * k, device="cpu").reshape(k, k)
    if kind == "radial":
        c = (k - 1) / 2
        ys, xs = torch.meshgrid(torch.arange(k, device="cpu") - c, torch.arange(k, device="cpu") - c, indexing="ij")
        d2 = (4 * (ys ** 2 + xs ** 2)).round().long()  # squared distance x 4: exact for half-integers
        return [idx[d2 == v].tolist() for v in d2.unique().tolist()]
    maps = [idx]
    if kind in ("lr", "lrud", "d4"):
        maps.append(idx.flip(1))
    if kind in ("ud", "lrud", "d4"):
        maps.append(idx.flip(0))
    if kind in ("c4", "d4"):
        maps += [torch.rot90(idx, r) for r in (1, 2, 3)]
    # close under composition: the orbit of each pixel is found by repeated application (union-find)
    parent = list(range(k * k))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for m in maps:
        for a, b in zip(idx.flatten().tolist(), m.flatten().tolist()):
            parent[find(a)] = find(b)
    classes: dict[int, list[int]] = {}
    for p in range(k * k):
        classes.setdefault(find(p), []).append(p)
    return sorted(classes.values())


def symmetry_basis(k: int, kind: str) -> torch.Tensor:
    """(k*k, m) orthonormal basis of the kernels with that symmetry: one column per pixel class."""
    classes = pixel_classes(k, kind)
    b = torch.zeros(k * k, len(classes), dtype=torch.float64)
    for j, cls in enumerate(classes):
        b[cls, j] = 1 / math.sqrt(len(cls))
    return b


def dct_basis(k: int, m: int) -> torch.Tensor:
    """(k*k, m): the m lowest-frequency orthonormal 2-D DCT-II basis kernels, ordered by u + v, then u."""
    if not 1 <= m <= k * k:
        raise ValueError(f"a {k}x{k} kernel has 1..{k * k} DCT coefficients, got {m}")
    i = torch.arange(k, dtype=torch.float64)
    c = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * k)) * math.sqrt(2 / k)  # (freq, pos)
    c[0] /= math.sqrt(2)
    order = sorted(((u, v) for u in range(k) for v in range(k)), key=lambda t: (t[0] + t[1], t[0]))[:m]
    return torch.stack([torch.outer(c[u], c[v]).flatten() for u, v in order], dim=1)  # (k*k, m)


class SubspaceKernel(nn.Module):
    """weight (O, I, k, k) = coefficients (O, I, m) @ basis^T: a parametrization for nn.Conv2d."""

    def __init__(self, basis: torch.Tensor, k: int):
        super().__init__()
        self.k = k
        self.register_buffer("basis", basis.to(torch.get_default_dtype()), persistent=False)  # (k*k, m)

    def forward(self, coef: torch.Tensor) -> torch.Tensor:
        o, i, _ = coef.shape
        return (coef @ self.basis.to(coef.dtype).T).reshape(o, i, self.k, self.k)  # (O, I, k, k)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The coefficients of the projection of `weight` onto the subspace (the basis is orthonormal)."""
        o, i = weight.shape[:2]
        return weight.reshape(o, i, -1) @ self.basis.to(weight.dtype)  # (O, I, m)


class SeparableKernel(nn.Module):
    """weight (O, I, k, k) = sum over r of u_r v_r^T, with u, v of shape (O, I, r, k)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oirh,oirw->oihw", u, v)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best rank-r approximation (truncated SVD), split evenly between u and v."""
        U, S, Vh = torch.linalg.svd(weight.double())  # (O, I, k, k), (O, I, k), (O, I, k, k)
        r = self.rank
        s = S[..., :r].sqrt()  # (O, I, r)
        u = (U[..., :, :r] * s[..., None, :]).transpose(-1, -2)  # (O, I, r, k)
        v = Vh[..., :r, :] * s[..., :, None]  # (O, I, r, k)
        return u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous()


class LayerSeparableKernel(nn.Module):
    """weight (O, I, k, k)[o, i, y, x] = sum_r v[r, i, y] h[o, r, x], from h (O, R, k) and v (R, I, k)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def forward(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("riy,orx->oiyx", v, h)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best approximation of this form: a rank-R SVD of the weight unfolded to (O x, I y)."""
        o, i, k, _ = weight.shape
        m = weight.double().permute(0, 3, 1, 2).reshape(o * k, i * k)  # rows (o, x), columns (i, y)
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        r = self.rank
        s = S[:r].sqrt()
        h = (U[:, :r] * s).reshape(o, k, r).permute(0, 2, 1)  # (O, R, k)
        v = (Vh[:r] * s[:, None]).reshape(r, i, k)  # (R, I, k)
        return h.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous()


class LayerSeparableConv2d(nn.Conv2d):
    """A Conv2d whose weight is layer-separable (`LayerSeparableKernel`) and whose forward pass is
    the two thin convs: k x 1 from I to R channels, then 1 x k from R to O (same result, fewer MACs)."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("layer-separable kernels need groups=1, dilation 1, numeric zero padding")
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        parametrize.register_parametrization(self, "weight", LayerSeparableKernel(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, v = self.parametrizations.weight.original0, self.parametrizations.weight.original1  # (O,R,k), (R,I,k)
        (sy, sx), (py, px) = self.stride, self.padding
        mid = F.conv2d(x, v[..., None], stride=(sy, 1), padding=(py, 0))  # (B, R, H', W): vertical
        return F.conv2d(mid, h[:, :, None, :], self.bias, stride=(1, sx), padding=(0, px))  # (B, O, H', W')


def parametrization_for(kind: str, k: int) -> nn.Module:
    """The parametrization of a k x k kernel of the given kind."""
    if kind in SYMMETRIES:
        return SubspaceKernel(symmetry_basis(k, kind), k)
    m = re.fullmatch(r"dct(\d+)", kind)
    if m:
        return SubspaceKernel(dct_basis(k, int(m.group(1))), k)
    m = re.fullmatch(r"rank(\d+)", kind)
    if m:
        r = int(m.group(1))
        if not 1 <= r <= k:
            raise ValueError(f"a {k}x{k} kernel has rank 1..{k}, got {kind!r}")
        return SeparableKernel(r)
    if re.fullmatch(r"lsep(\d+)", kind):
        raise ValueError(f"{kind!r} replaces the whole conv: use constrain_conv / constrain")
    if kind in GROUPS:
        raise ValueError(f"{kind!r} ties whole channels: use constrain_conv(..., lifting=) / constrain")
    raise ValueError(f"unknown kernel kind {kind!r}; known: {', '.join(kind_names())}")


def constrain_conv(conv: nn.Conv2d, kind: str, rescale: bool = False, lifting: bool = False) -> nn.Conv2d:
    """Constrain one conv (in place; `lsep<R>` returns a new `LayerSeparableConv2d` to put in its
    place): its weight becomes the projection of the current weight onto the kind, and from then
    on a transform of the free coefficients. For a group kind, `lifting` says the conv reads plain
    channels (the image) rather than group-structured ones. With `rescale` (for a fresh,
    untrained layer) the projection is scaled back to the original weight's norm, so that the
    initialisation keeps its variance; projecting a random kernel onto a symmetry loses energy."""
    kh, kw = conv.kernel_size
    if kh != kw:
        raise ValueError(f"constrained kernels are square; this conv has {kh}x{kw}")
    before = conv.weight.detach().norm()
    lsep = re.fullmatch(r"lsep(\d+)", kind)
    if lsep:
        r = int(lsep.group(1))
        if r < 1:
            raise ValueError(f"layer-separable rank must be >= 1, got {kind!r}")
        # the unfolded weight (O k) x (I k) has no higher rank: a thin layer (e.g. 1 input channel) gets less
        conv = LayerSeparableConv2d(conv, min(r, conv.in_channels * kh, conv.out_channels * kh))
    elif kind in GROUPS:
        if conv.groups != 1:
            raise ValueError(f"{kind!r} ties the channels of ordinary convs; this one has groups={conv.groups}")
        parametrize.register_parametrization(conv, "weight", GroupKernel(kind, lifting))
    else:
        parametrize.register_parametrization(conv, "weight", parametrization_for(kind, kh))
    if rescale and not conv.weight.is_meta:  # a model sized on the meta device has no values to rescale
        with torch.no_grad():
            originals = list(conv.parametrizations.weight.parameters())
            scale = float(before / conv.weight.norm().clamp_min(1e-12)) ** (1 / len(originals))
            for p in originals:  # weight is linear in coefficients, bilinear in (u, v)
                p.mul_(scale)
    return conv


def constrain(model: nn.Module, kind: str, min_size: int | None = None, rescale: bool = False) -> nn.Module:
    """Swap every conv of `model` with kernels of at least `min_size` for the constrained kind, in
    place. Returns the model. `min_size` defaults to 2 (a 1x1 kernel has nothing to tie), or 1 for
    the group kinds, which tie channels; for those the first conv in registration order lifts the
    image and every other conv must read group-structured channels."""
    if min_size is None:
        min_size = 1 if kind in GROUPS else 2
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Conv2d) and child.kernel_size[0] >= min_size]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no conv with kernels of {min_size}x{min_size} or more")
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    for parent, name, conv in targets:  # every conv checked on a copy first: a refusal leaves the model as it was
        try:
            constrain_conv(copy.deepcopy(conv), kind, rescale=rescale, lifting=conv is first)
        except ValueError as e:
            raise ValueError(f"cannot constrain conv {name!r} of {type(parent).__name__} to {kind!r}: {e}; the model "
                             "is unchanged") from None
    for parent, name, conv in targets:
        new = constrain_conv(conv, kind, rescale=rescale, lifting=conv is first)
        if new is not conv:  # a layer-separable conv is a new module in the old one's place
            setattr(parent, name, new)
    return model


def conv_free_parameters(model: nn.Module) -> int:
    """Free parameters of the conv kernels (coefficients for constrained convs, weights otherwise)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if parametrize.is_parametrized(m, "weight"):
                total += sum(p.numel() for p in m.parametrizations.weight.parameters())
            else:
                total += m.weight.numel()
    return total
