"""The saccadic CNN: attention policy + block-sparse feature stages + a classifier on the block grid.

Three sparse stages (conv-ReLU, 2x2 max-pool between them) run only on the blocks the policy chose,
each block with the kernel of its level; each block's features are then max-pooled to one vector,
a small conv mixes neighbouring blocks on the grid, and a global max-pool feeds the classifier.
The dense twin (`blockcnn`) is the same backbone with every block at level 1 and no policy, run as
ordinary convolutions: the control the saccadic model must beat on speed at equal error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.models import InputCheck, register_model
from frugal.saccade.explain import draw_block_attention
from frugal.saccade.policy import ESTIMATORS, Attention, AttentionPolicy, choose_levels
from frugal.saccade.sparse_conv import BlockSparseConv2d

N_STAGES = 3  # the block size halves with each stage, so it must be a multiple of 2 ** (N_STAGES - 1)


def auto_block_size(image_size: tuple[int, int]) -> int:
    """About five blocks across the longer side, rounded to a multiple of 4 (28 -> 4, 60 -> 12, 100 -> 20)."""
    return 4 * max(1, round(max(image_size) / 20))


class SaccadicCNN(nn.Module):
    """Hard attention that skips compute: a policy picks skip / 3x3 / 5x5 per block."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 16,
                 block_size: int | None = None, kernel_sizes: Sequence[int] = (3, 5), estimator: str = "gumbel",
                 tau: float = 1.0, dense: bool = False, policy_width: int = 16, budget: float = 0.3,
                 cost_weight: float = 1.0, consistency_weight: float = 0.0, noise_std: float = 0.5):
        super().__init__()
        s = block_size or auto_block_size(image_size)
        step = 2 ** (N_STAGES - 1)
        if s % step:
            raise ValueError(f"block_size must be a multiple of {step} ({N_STAGES} stages halve it), got {s}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
        self.check = InputCheck(in_channels, image_size)
        h, w = image_size
        self.pad = (0, math.ceil(w / s) * s - w, 0, math.ceil(h / s) * s - h)  # right and bottom
        self.grid = (math.ceil(h / s), math.ceil(w / s))
        self.block_size, self.estimator, self.tau, self.dense = s, estimator, tau, dense
        self.budget = budget  # target compute of the sparse stages, as a fraction of the dense twin's
        self.cost_weight = cost_weight  # weight of the compute above budget in the loss
        self.consistency_weight = consistency_weight  # weight of clean-vs-noisy agreement
        self.noise_std = noise_std  # Gaussian noise (normalised pixel units) for the consistency term
        kernel_sizes = tuple(kernel_sizes[:1]) if dense else tuple(kernel_sizes)
        widths = [width * 2 ** i for i in range(N_STAGES)]
        cins = [in_channels] + widths[:-1]
        self.stages = nn.ModuleList(
            BlockSparseConv2d(cin, cout, s // 2 ** i, kernel_sizes, coords=(i == 0))
            for i, (cin, cout) in enumerate(zip(cins, widths)))
        self.policy = None if dense else AttentionPolicy(in_channels, self.grid, len(kernel_sizes), policy_width,
                                                         value_head=(estimator == "reinforce"))
        # compute of each level relative to the dense twin's 3x3 (level 1): skip = 0
        costs = [0.0] + [k * k / kernel_sizes[0] ** 2 for k in kernel_sizes]
        self.register_buffer("level_costs", torch.tensor(costs), persistent=False)
        self.mix = nn.Conv2d(widths[-1], widths[-1], 3, padding=1)  # on the block grid
        self.fc = nn.Linear(widths[-1], num_classes)
        self.attention: Attention | None = None  # what the last forward pass chose
        self.fixed_levels: torch.Tensor | None = None  # set to force a level map (tests, ablations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.check(x), self.pad)  # (B, C, gh*s, gw*s)
        if self.dense:
            h = x
            for i, stage in enumerate(self.stages):
                h = F.relu(stage.forward_dense(F.max_pool2d(h, 2) if i else h))
        else:
            logits, value = self.policy(x)
            att = choose_levels(logits, value, self.level_costs, self.estimator, self.training, self.tau,
                                fixed=self.fixed_levels)
            self.attention = att
            h = x
            for i, stage in enumerate(self.stages):
                h = F.relu(stage(F.max_pool2d(h, 2) if i else h, att.levels))
                if att.gate.requires_grad:  # straight-through: value 1, gradient to the policy
                    bs = stage.block_size
                    h = h * att.gate.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, None]
        g = F.max_pool2d(h, self.stages[-1].block_size)  # (B, C, gh, gw): one vector per block
        g = F.relu(self.mix(g))
        return self.fc(g.amax(dim=(2, 3)))  # global max over blocks -> (B, classes)

    def extra_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The policy's losses, added to the task loss by the training loop: compute above the
        budget; for REINFORCE, the policy gradient with the learned baseline and the baseline's own
        error; and, when weighted, agreement between the clean and a noisy view of the batch."""
        att = self.attention
        if self.dense or att is None:
            return None
        loss = self.cost_weight * F.relu(att.expected_cost.mean() - self.budget)
        if self.estimator == "reinforce":
            with torch.no_grad():
                hard_cost = self.level_costs[att.levels].mean(dim=(1, 2))  # (B,) compute actually chosen
                reward = -F.cross_entropy(logits, y, reduction="none") - self.cost_weight * F.relu(hard_cost - self.budget)
            advantage = reward - att.value.detach()
            loss = loss - (advantage * att.log_prob).mean() + F.mse_loss(att.value, reward)
        if self.consistency_weight > 0:
            noisy_logits = self(x + self.noise_std * torch.randn_like(x))
            noisy_att, self.attention = self.attention, att
            agree = F.kl_div(noisy_logits.log_softmax(1), logits.softmax(1), reduction="batchmean")
            agree_att = F.kl_div(noisy_att.logits.log_softmax(1), att.logits.softmax(1),
                                 reduction="none").sum(1).mean()  # per block, averaged
            loss = loss + self.consistency_weight * (agree + agree_att)
        return loss

    @torch.no_grad()
    def explain(self, x: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, path) -> Path:
        """Predict x (normalised) and draw which blocks got which kernel over `images` (uint8)."""
        if self.dense:
            raise ValueError("the dense twin attends to every block; there is no attention map to draw")
        self.eval()
        preds = self(x).argmax(1)
        return draw_block_attention(images.cpu(), self.attention.levels.cpu(), self.block_size, labels.cpu(),
                                    preds.cpu(), path, self.stages[0].kernel_sizes)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, block_size={self.block_size}, estimator={self.estimator!r}, dense={self.dense}"


@register_model
def saccadic(in_channels: int = 1, image_size: tuple[int, int] = (60, 60), num_classes: int = 10,
             width: int = 16, block_size: int | None = None, estimator: str = "gumbel", tau: float = 1.0,
             budget: float = 0.3, cost_weight: float = 1.0, consistency_weight: float = 0.0,
             noise_std: float = 0.5) -> nn.Module:
    """Saccadic CNN: a policy picks skip / 3x3 / 5x5 per block; convs run only on chosen blocks."""
    return SaccadicCNN(in_channels, image_size, num_classes, width=width, block_size=block_size,
                       estimator=estimator, tau=tau, budget=budget, cost_weight=cost_weight,
                       consistency_weight=consistency_weight, noise_std=noise_std)


@register_model
def blockcnn(in_channels: int = 1, image_size: tuple[int, int] = (60, 60), num_classes: int = 10,
             width: int = 16, block_size: int | None = None) -> nn.Module:
    """Dense twin of `saccadic`: the same backbone with every block at 3x3 and no policy."""
    return SaccadicCNN(in_channels, image_size, num_classes, width=width, block_size=block_size, dense=True)
