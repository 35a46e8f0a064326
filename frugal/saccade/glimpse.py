"""Glimpse trajectories: the recurrent attention model of "Recurrent Models of Visual Attention"
(Mnih et al. 2014).

At each of N steps a retina-like sensor reads a few patches centred on the current location, each
twice the side of the one before and all resized to the same g x g (fine at the centre, coarse
around); a glimpse network merges what it saw with where it looked; a recurrent core updates its
state; a location network proposes the next place to look (a Gaussian around a learned mean,
trained with REINFORCE and a learned baseline); after the last glimpse a classifier answers.

Two options from the follow-up "Multiple Object Recognition with Visual Attention" (Ba et al. 2015):
a small conv net as the glimpse network (`glimpse_net="conv"`) in place of the linear one, and a
context network (`context=True`) that reads a coarse view of the whole image and sets the core's
first state, so the first glimpse goes where the coarse view suggests instead of to the centre.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.models import InputCheck, register_model
from frugal.saccade.explain import draw_glimpses, eval_predictions


class GlimpseSensor(nn.Module):
    """Reads `scales` square patches centred on a location, of sides g, 2g, 4g, ... pixels, each
    average-pooled down to g x g. Locations are (x, y) in [-1, 1]; outside the image reads zeros."""

    def __init__(self, patch: int = 12, scales: int = 3):
        super().__init__()
        if patch < 1 or scales < 1:
            raise ValueError(f"patch and scales must be >= 1, got {patch}, {scales}")
        self.patch, self.scales = patch, scales

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); loc: (B, 2). Returns (B, scales, C, g, g)."""
        b, c, h, w = x.shape
        g = self.patch
        biggest = g * 2 ** (self.scales - 1)
        half = biggest // 2 + 1
        xp = F.pad(x, (half, half, half, half))  # room for a patch centred at the border
        # pixel centre of the glimpse in the unpadded image (align_corners=False convention)
        cx = ((loc[:, 0].clamp(-1, 1) + 1) * w / 2).round().long()  # (B,)
        cy = ((loc[:, 1].clamp(-1, 1) + 1) * h / 2).round().long()  # (B,)
        out = []
        for k in range(self.scales):
            side = g * 2 ** k
            ar = torch.arange(side, device=x.device)
            rows = (cy - side // 2 + half)[:, None] + ar  # (B, side) rows of the padded map
            cols = (cx - side // 2 + half)[:, None] + ar  # (B, side)
            bi = torch.arange(b, device=x.device)[:, None, None]
            crop = xp[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, side, side)
            out.append(F.avg_pool2d(crop, 2 ** k) if k else crop)  # (B, C, g, g)
        return torch.stack(out, dim=1)  # (B, scales, C, g, g)


GLIMPSE_NETS = ("linear", "conv")


class ConvGlimpseNet(nn.Module):
    """The scales of a glimpse stacked as channels, two conv-ReLU-pool steps, a linear map to `out`."""

    def __init__(self, in_channels: int, patch: int, out: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.out = nn.Linear(2 * width * (patch // 4) ** 2, out)

    def forward(self, seen: torch.Tensor) -> torch.Tensor:
        """seen: (B, scales, C, g, g) -> (B, out)."""
        b, k, c, g, _ = seen.shape
        return self.out(self.body(seen.reshape(b, k * c, g, g)).flatten(1))  # (B, out)


class ContextNet(nn.Module):
    """A coarse view of the whole image (average-pooled to `side` x `side`) -> the core's first state."""

    def __init__(self, in_channels: int, hidden: int, side: int = 16, width: int = 16):
        super().__init__()
        self.side = side
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.out = nn.Linear(2 * width * (side // 4) ** 2, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coarse = F.adaptive_avg_pool2d(x, self.side)  # (B, C, side, side)
        return torch.tanh(self.out(self.body(coarse).flatten(1)))  # (B, hidden)


class RecurrentAttentionModel(nn.Module):
    """RAM: glimpse sensor + glimpse network + GRU core + location policy + baseline + classifier."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, glimpses: int = 6,
                 patch: int = 12, scales: int = 3, hidden: int = 256, loc_std: float = 0.15,
                 glimpse_net: str = "linear", context: bool = False):
        super().__init__()
        if glimpse_net not in GLIMPSE_NETS:
            raise ValueError(f"unknown glimpse_net {glimpse_net!r}; known: {', '.join(GLIMPSE_NETS)}")
        if glimpse_net == "conv" and patch < 4:
            raise ValueError(f"a conv glimpse net pools twice: patch must be >= 4, got {patch}")
        self.check = InputCheck(in_channels, image_size)
        self.glimpses, self.loc_std = glimpses, loc_std
        self.sensor = GlimpseSensor(patch, scales)
        self.glimpse_net = glimpse_net
        self.what = (ConvGlimpseNet(scales * in_channels, patch, 128) if glimpse_net == "conv"
                     else nn.Linear(scales * in_channels * patch * patch, 128))
        self.where = nn.Linear(2, 128)
        self.glimpse = nn.Linear(256, hidden)
        self.core = nn.GRUCell(hidden, hidden)
        self.context = ContextNet(in_channels, hidden) if context else None
        self.locator = nn.Linear(hidden, 2)
        self.baseline = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, num_classes)
        self.trajectory: torch.Tensor | None = None  # (B, N, 2) where the last forward pass looked
        self._log_probs: torch.Tensor | None = None  # (B, N-1) or with context (B, N): of each location sampled
        self._values: torch.Tensor | None = None  # (B, N) or with context (B, N+1): baseline per state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check(x)
        b = x.shape[0]
        locs, log_probs, values = [], [], []
        if self.context is None:
            h = x.new_zeros(b, self.core.hidden_size)
            loc = x.new_zeros(b, 2)  # the first glimpse looks at the centre
        else:
            h = self.context(x)  # (B, hidden): the coarse view picks the first location
            values.append(self.baseline(h.detach()).squeeze(1))
            loc = self._next_location(h, log_probs)
        for _ in range(self.glimpses):
            locs.append(loc)
            seen = self.sensor(x, loc)  # (B, scales, C, g, g)
            if self.glimpse_net == "linear":
                seen = seen.flatten(1)  # (B, scales*C*g*g)
            gt = F.relu(self.glimpse(torch.cat([F.relu(self.what(seen)), F.relu(self.where(loc))], 1)))  # (B, hidden)
            h = self.core(gt, h)
            values.append(self.baseline(h.detach()).squeeze(1))
            loc = self._next_location(h, log_probs)
        self.trajectory = torch.stack(locs, 1)  # (B, N, 2)
        # the last proposal is never looked at, so it takes no part in the reward
        self._log_probs = torch.stack(log_probs[:-1], 1) if len(log_probs) > 1 else None  # (B, N-1 [+1])
        self._values = torch.stack(values, 1)  # (B, N [+1])
        return self.classifier(h)

    def _next_location(self, h: torch.Tensor, log_probs: list) -> torch.Tensor:
        """The location policy: a Gaussian around tanh(W h) while training, its mean at test time."""
        mean = torch.tanh(self.locator(h.detach()))  # the policy learns only from REINFORCE
        if not self.training:
            return mean
        dist = torch.distributions.Normal(mean, self.loc_std)
        nxt = dist.sample()
        log_probs.append(dist.log_prob(nxt).sum(1))
        return nxt.clamp(-1, 1).detach()

    @torch.no_grad()
    def explain(self, x: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, path) -> Path:
        """Predict x (normalised) and draw each glimpse path over `images` (uint8)."""
        preds = eval_predictions(self, x)
        size = tuple(x.shape[2:])
        boxes = [glimpse_boxes(t, size, self.sensor.patch, self.sensor.scales) for t in self.trajectory.cpu()]
        return draw_glimpses(images.cpu(), boxes, labels.cpu(), preds.cpu(), path)

    def extra_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """REINFORCE for the locations (reward 1 when the answer is right) with the learned baseline,
        and the baseline's squared error."""
        if self._log_probs is None:
            return None
        reward = (logits.detach().argmax(1) == y).to(logits.dtype)[:, None]  # (B, 1)
        # the location chosen after step t is judged against the baseline read from step t's state
        advantage = reward - self._values[:, :-1].detach()  # (B, N-1), with context (B, N)
        policy = -(advantage * self._log_probs).sum(1).mean()
        return policy + F.mse_loss(self._values, reward.expand_as(self._values))


@register_model
def ram(in_channels: int = 1, image_size: tuple[int, int] = (60, 60), num_classes: int = 10, glimpses: int = 6,
        patch: int = 12, scales: int = 3, hidden: int = 256, loc_std: float = 0.15, glimpse_net: str = "linear",
        context: bool = False) -> nn.Module:
    """Recurrent attention model (Mnih et al. 2014): N multi-resolution glimpses, a GRU core, REINFORCE;
    optionally a conv glimpse net and a context net for the first glimpse (Ba et al. 2015)."""
    patch = min(patch, max(2, min(image_size) // 2 ** (scales - 1)))  # small inputs: patches that fit
    if glimpse_net == "conv":
        patch = max(4, patch - patch % 4)  # pooled twice
    return RecurrentAttentionModel(in_channels, image_size, num_classes, glimpses, patch, scales, hidden, loc_std,
                                   glimpse_net, context)


def glimpse_boxes(trajectory: torch.Tensor, image_size: tuple[int, int], patch: int, scales: int) -> list:
    """Per step, the (x0, y0, side) in pixels of each scale's square, for drawing a glimpse path."""
    h, w = image_size
    boxes = []
    for lx, ly in trajectory.tolist():
        cx = round((max(-1, min(1, lx)) + 1) * w / 2)
        cy = round((max(-1, min(1, ly)) + 1) * h / 2)
        boxes.append([(cx - (patch * 2 ** k) // 2, cy - (patch * 2 ** k) // 2, patch * 2 ** k) for k in range(scales)])
    return boxes

