"""Glimpse trajectories: the recurrent attention model of "Recurrent Models of Visual Attention"
(Mnih et al. 2014).

At each of N steps a retina-like sensor reads a few patches centred on the current location, each
twice the side of the one before and all resized to the same g x g (fine at the centre, coarse
around); a glimpse network merges what it saw with where it looked; a recurrent core updates its
state; a location network proposes the next place to look (a Gaussian around a learned mean,
trained with REINFORCE and a learned baseline); after the last glimpse a classifier answers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.models import InputCheck, register_model
from frugal.saccade.explain import draw_glimpses


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


class RecurrentAttentionModel(nn.Module):
    """RAM: glimpse sensor + glimpse network + GRU core + location policy + baseline + classifier."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, glimpses: int = 6,
                 patch: int = 12, scales: int = 3, hidden: int = 256, loc_std: float = 0.15,
                 start: torch.Tensor | None = None):
        super().__init__()
        self.check = InputCheck(in_channels, image_size)
        self.glimpses, self.loc_std = glimpses, loc_std
        self.sensor = GlimpseSensor(patch, scales)
        self.what = nn.Linear(scales * in_channels * patch * patch, 128)
        self.where = nn.Linear(2, 128)
        self.glimpse = nn.Linear(256, hidden)
        self.core = nn.GRUCell(hidden, hidden)
        self.locator = nn.Linear(hidden, 2)
        self.baseline = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, num_classes)
        self.trajectory: torch.Tensor | None = None  # (B, N, 2) where the last forward pass looked
        self._log_probs: torch.Tensor | None = None  # (B, N-1): of each next location proposed
        self._values: torch.Tensor | None = None  # (B, N) baseline per step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check(x)
        b = x.shape[0]
        h = x.new_zeros(b, self.core.hidden_size)
        loc = x.new_zeros(b, 2)  # the first glimpse looks at the centre
        locs, log_probs, values = [], [], []
        for _ in range(self.glimpses):
            locs.append(loc)
            seen = self.sensor(x, loc).flatten(1)  # (B, scales*C*g*g)
            gt = F.relu(self.glimpse(torch.cat([F.relu(self.what(seen)), F.relu(self.where(loc))], 1)))  # (B, hidden)
            h = self.core(gt, h)
            values.append(self.baseline(h.detach()).squeeze(1))
            mean = torch.tanh(self.locator(h.detach()))  # the policy learns only from REINFORCE
            if self.training:
                dist = torch.distributions.Normal(mean, self.loc_std)
                nxt = dist.sample()
                log_probs.append(dist.log_prob(nxt).sum(1))
            else:
                nxt = mean
            loc = nxt.clamp(-1, 1).detach()
        self.trajectory = torch.stack(locs, 1)  # (B, N, 2)
        # the last proposal is never looked at, so it takes no part in the reward
        self._log_probs = torch.stack(log_probs[:-1], 1) if len(log_probs) > 1 else None  # (B, N-1)
        self._values = torch.stack(values, 1)  # (B, N)
        return self.classifier(h)

    @torch.no_grad()
    def explain(self, x: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, path) -> Path:
        """Predict x (normalised) and draw each glimpse path over `images` (uint8)."""
        was_training = self.training
        self.eval()
        preds = self(x).argmax(1)
        self.train(was_training)
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
        advantage = reward - self._values[:, :-1].detach()  # (B, N-1)
        policy = -(advantage * self._log_probs).sum(1).mean()
        return policy + F.mse_loss(self._values, reward.expand_as(self._values))


@register_model
def ram(in_channels: int = 1, image_size: tuple[int, int] = (60, 60), num_classes: int = 10, glimpses: int = 6,
        patch: int = 12, scales: int = 3, hidden: int = 256, loc_std: float = 0.15) -> nn.Module:
    """Recurrent attention model (Mnih et al. 2014): N multi-resolution glimpses, a GRU core, REINFORCE."""
    patch = min(patch, max(2, min(image_size) // 2 ** (scales - 1)))  # small inputs: patches that fit
    return RecurrentAttentionModel(in_channels, image_size, num_classes, glimpses, patch, scales, hidden, loc_std)


def glimpse_boxes(trajectory: torch.Tensor, image_size: tuple[int, int], patch: int, scales: int) -> list:
    """Per step, the (x0, y0, side) in pixels of each scale's square, for drawing a glimpse path."""
    h, w = image_size
    boxes = []
    for lx, ly in trajectory.tolist():
        cx = round((max(-1, min(1, lx)) + 1) * w / 2)
        cy = round((max(-1, min(1, ly)) + 1) * h / 2)
        boxes.append([(cx - (patch * 2 ** k) // 2, cy - (patch * 2 ** k) // 2, patch * 2 ** k) for k in range(scales)])
    return boxes

