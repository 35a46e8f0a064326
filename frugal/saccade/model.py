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
from frugal.saccade.explain import draw_block_attention, eval_predictions
from frugal.saccade.policy import ESTIMATORS, Attention, AttentionPolicy, BudgetSchedule, choose_levels
from frugal.layers.sparse_conv import BlockSet, BlockSparseConv2d

BUDGET_MODES = ("target", "cap")
N_STAGES = 3  # the block size halves with each stage, so it must be a multiple of 2 ** (N_STAGES - 1)


def auto_block_size(image_size: tuple[int, int]) -> int:
    """About five blocks across the longer side, rounded to a multiple of 4 (28 -> 4, 60 -> 12, 100 -> 20)."""
    return 4 * max(1, round(max(image_size) / 20))


class SaccadicCNN(BudgetSchedule, nn.Module):
    """Hard attention that skips compute: a policy picks skip / 3x3 / 5x5 per block."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 16,
                 block_size: int | None = None, kernel_sizes: Sequence[int] = (3, 5), estimator: str = "gumbel",
                 tau: float = 1.0, dense: bool = False, policy_width: int = 16, budget: float = 0.3,
                 cost_weight: float = 1.0, consistency_weight: float = 0.0, noise_std: float = 0.5,
                 budget_warmup: int | float = 1000, attend_init: float = 0.9, min_blocks: int = 1,
                 budget_mode: str = "target"):
        super().__init__()
        if budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got {budget_mode!r}")
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
        # "target": the cost term pulls the expected compute to the budget from both sides; "cap": only
        # compute above it costs. With a cap, the straight-through gradient drifts below the budget,
        # and accuracy with it
        self.budget_mode = budget_mode
        self.cost_weight = cost_weight  # weight of the compute above budget in the loss
        self.consistency_weight = consistency_weight  # weight of clean-vs-noisy agreement
        self.noise_std = noise_std  # Gaussian noise (normalised pixel units) for the consistency term
        self.min_blocks = min_blocks  # blocks every example attends at least (its least skippable ones)
        self.init_budget(budget, budget_warmup)
        kernel_sizes = tuple(kernel_sizes[:1]) if dense else tuple(kernel_sizes)
        widths = [width * 2 ** i for i in range(N_STAGES)]
        cins = [in_channels] + widths[:-1]
        self.stages = nn.ModuleList(
            BlockSparseConv2d(cin, cout, s // 2 ** i, kernel_sizes, coords=(i == 0))
            for i, (cin, cout) in enumerate(zip(cins, widths)))
        self.policy = None if dense else AttentionPolicy(in_channels, self.grid, len(kernel_sizes), policy_width,
                                                         value_head=(estimator == "reinforce"))
        if self.policy is not None:
            if not 0 < attend_init < 1:
                raise ValueError(f"attend_init is a probability in (0, 1), got {attend_init}")
            # start attending nearly everywhere at 3x3 (the dense twin), so the policy learns what it can
            # drop rather than having to discover blocks worth computing from a random start
            n = len(kernel_sizes) + 1
            with torch.no_grad():
                self.policy.logits.bias.zero_()
                self.policy.logits.bias[1] = math.log(attend_init * (n - 1) / (1 - attend_init))
        # compute of each level relative to the dense twin's 3x3 (level 1): skip = 0
        costs = [0.0] + [k * k / kernel_sizes[0] ** 2 for k in kernel_sizes]
        self.register_buffer("level_costs", torch.tensor(costs), persistent=False)
        self.mix = nn.Conv2d(widths[-1], widths[-1], 3, padding=1)  # on the block grid
        self.fc = nn.Linear(widths[-1], num_classes)
        self.attention: Attention | None = None  # what the last forward pass chose
        self.fixed_levels: torch.Tensor | None = None  # set to force a level map (tests, ablations)
        # set to attend this share of each image's blocks at inference (its most wanted ones) instead
        # of the policy's argmax: one trained model, a curve of accuracy against compute
        self.inference_fraction: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.check(x), self.pad)  # (B, C, gh*s, gw*s)
        h = x
        if self.dense:
            return self.fc(self._head(self.dense_blocks(x)))
        logits, value = self.policy(x)
        att = choose_levels(logits, value, self.level_costs, self.estimator, self.training, self.tau,
                            fixed=self.fixed_levels, min_blocks=self.min_blocks, top_blocks=self._top_blocks())
        self.attention = att
        if att.weights.requires_grad:  # Gumbel training: masked dense stages (see _masked_stage)
            for i, stage in enumerate(self.stages):
                h = self._masked_stage(stage, F.max_pool2d(h, 2) if i else h, att.weights)
            attended = 1 - att.weights[:, 0]  # (B, gh, gw): 1 where a block was attended, with the ST gradient
            return self.fc(self._head(F.max_pool2d(h, self.stages[-1].block_size), attended))
        # only the chosen blocks are computed, handed from stage to stage as tiles
        blocks = BlockSet(att.levels)
        return self.fc(self._sparse_head(self._sparse_stages(x, blocks), blocks))

    def dense_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The dense path's block vectors (B, C, gh, gw): every stage at level 1 over the whole padded
        input `x`, then a max per block."""
        h = x.contiguous(memory_format=torch.channels_last)  # the faster layout for CPU convs: a fair control
        for i, stage in enumerate(self.stages):
            h = F.relu(stage.forward_dense(F.max_pool2d(h, 2) if i else h))
        return F.max_pool2d(h, self.stages[-1].block_size)

    def _top_blocks(self) -> int | None:
        f = self.inference_fraction
        if f is None:
            return None
        if not 0 < f <= 1:
            raise ValueError(f"inference_fraction is a share of the blocks in (0, 1], got {f}")
        n = self.grid[0] * self.grid[1]
        return max(1, round(f * n))

    def _sparse_stages(self, x: torch.Tensor, blocks: BlockSet) -> torch.Tensor:
        """The stages on the chosen blocks only: (B, C, gh, gw) block vectors, zero where skipped."""
        t = x  # the image; from the first stage on, tiles (n, s, s, C)
        for i, stage in enumerate(self.stages):
            if i:
                t = _max_pool_tiles(t)
            t = F.relu(stage.forward_tiles(t, blocks), inplace=True)  # (n, s_i, s_i, C_i)
        g = t.new_zeros(blocks.levels.shape[0], *blocks.grid, t.shape[3])  # (B, gh, gw, C)
        g[blocks.bi, blocks.yi, blocks.xi] = t.amax(dim=(1, 2))  # a vector per block
        return g.permute(0, 3, 1, 2)  # (B, C, gh, gw), channels-last in memory

    def _head(self, g: torch.Tensor, attended: torch.Tensor | None = None) -> torch.Tensor:
        """Block vectors (B, C, gh, gw) -> mixed with neighbours on the grid -> max over the attended
        blocks (B, C). `attended` (B, gh, gw) masks the rest (after the ReLU, so the max is the
        attended blocks' max); None = every block (the dense twin)."""
        m = F.relu(self.mix(g))  # (B, C, gh, gw)
        if attended is not None:
            m = m * attended[:, None]
        return m.amax(dim=(2, 3))

    def _sparse_head(self, g: torch.Tensor, blocks: BlockSet) -> torch.Tensor:
        """`_head` evaluated at the attended blocks only: the mix conv as one matrix product over the
        3x3 neighbourhoods of the chosen grid cells, then a max per example."""
        b, c, gh, gw = g.shape
        gp = F.pad(g.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, gh+2, gw+2, C), a zero border
        off = torch.arange(3, device=g.device)
        rows = (blocks.yi[:, None] + off)[:, :, None]  # (n, 3, 1): the neighbourhood's rows in gp
        cols = (blocks.xi[:, None] + off)[:, None, :]  # (n, 1, 3)
        hood = gp[blocks.bi[:, None, None], rows, cols].reshape(-1, 9 * c)  # (n, 3*3*C), only attended cells
        w = self.mix.weight.permute(0, 2, 3, 1).reshape(self.mix.out_channels, -1)  # (C', 3*3*C), same order
        m = F.relu(F.linear(hood, w, self.mix.bias))  # (n, C')
        out = m.new_zeros(b, m.shape[1])  # an example with no attended block gets 0 (ReLU's floor)
        return out.scatter_reduce_(0, blocks.bi[:, None].expand_as(m), m, "amax")  # (B, C')

    @staticmethod
    def _masked_stage(stage: BlockSparseConv2d, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Gumbel training: every level's conv-ReLU over the whole map, each block keeping the level it
        chose. The forward value equals the sparse stage's (the weights are exactly 0 or 1), but a
        skipped block still sees what each kernel would have given it, so the straight-through
        gradient tells the policy what skipping cost; with the sparse stage a skipped block's
        output is 0 whatever its weight, and the policy learns nothing but the compute term (and
        collapses to skipping everything). The mask comes after the ReLU: ReLU's gradient at a
        masked 0 would be 0 again. As in DynConv (Verelst & Tuytelaars 2020): dense while
        training, sparse at inference."""
        s = stage.block_size
        out = 0
        for lvl in range(1, stage.n_levels + 1):
            m = weights[:, lvl].repeat_interleave(s, 1).repeat_interleave(s, 2)[:, None]  # (B, 1, H, W)
            out = out + m * F.relu(stage.forward_dense(h, lvl))
        return out

    def extra_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The policy's losses, added to the task loss by the training loop: compute above the
        budget; for REINFORCE, the policy gradient with the learned baseline and the baseline's own
        error; and, when weighted, agreement between the clean and a noisy view of the batch."""
        att = self.attention
        if self.dense or att is None:
            return None
        budget = self.current_budget()
        self.steps += 1
        over = att.expected_cost.mean() - budget
        loss = self.cost_weight * (over.abs() if self.budget_mode == "target" else F.relu(over))
        if self.estimator == "reinforce":
            with torch.no_grad():
                hard_cost = self.level_costs[att.levels].mean(dim=(1, 2))  # (B,) compute actually chosen
                gap = hard_cost - budget
                penalty = gap.abs() if self.budget_mode == "target" else F.relu(gap)
                reward = -F.cross_entropy(logits, y, reduction="none") - self.cost_weight * penalty
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

    def budget_applies(self) -> bool:
        return not self.dense

    @torch.no_grad()
    def explain(self, x: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, path) -> Path:
        """Predict x (normalised) and draw which blocks got which kernel over `images` (uint8)."""
        if self.dense:
            raise ValueError("the dense twin attends to every block; there is no attention map to draw")
        preds = eval_predictions(self, x)
        return draw_block_attention(images.cpu(), self.attention.levels.cpu(), self.block_size, labels.cpu(),
                                    preds.cpu(), path, self.stages[0].kernel_sizes)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, block_size={self.block_size}, estimator={self.estimator!r}, dense={self.dense}"


def _max_pool_tiles(t: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool inside each tile, (n, s, s, C) -> (n, s/2, s/2, C), as two pairwise maxima:
    ~50x faster on CPU than amax over the two strided axes of a 6-d view."""
    n, s, _, c = t.shape
    a = t.view(n, s, s // 2, 2, c)
    a = torch.maximum(a[:, :, :, 0], a[:, :, :, 1])  # (n, s, s/2, C): pairs of columns
    a = a.view(n, s // 2, 2, s // 2, c)
    return torch.maximum(a[:, :, 0], a[:, :, 1])  # (n, s/2, s/2, C): pairs of rows


@register_model
def saccadic(in_channels: int = 1, image_size: tuple[int, int] = (60, 60), num_classes: int = 10,
             width: int = 16, block_size: int | None = None, estimator: str = "gumbel", tau: float = 1.0,
             budget: float = 0.3, cost_weight: float = 1.0, consistency_weight: float = 0.0,
             noise_std: float = 0.5, budget_warmup: int | float = 1000, attend_init: float = 0.9,
             min_blocks: int = 1, budget_mode: str = "target", kernel_sizes: Sequence[int] = (3, 5)) -> nn.Module:
    """Saccadic CNN: a policy picks skip / 3x3 / 5x5 per block; convs run only on chosen blocks."""
    return SaccadicCNN(in_channels, image_size, num_classes, width=width, block_size=block_size,
                       kernel_sizes=kernel_sizes, estimator=estimator, tau=tau, budget=budget, cost_weight=cost_weight,
                       consistency_weight=consistency_weight, noise_std=noise_std,
                       budget_warmup=budget_warmup, attend_init=attend_init, min_blocks=min_blocks,
                       budget_mode=budget_mode)


@register_model
def blockcnn(in_channels: int = 1, image_size: tuple[int, int] = (60, 60), num_classes: int = 10,
             width: int = 16, block_size: int | None = None) -> nn.Module:
    """Dense twin of `saccadic`: the same backbone with every block at 3x3 and no policy."""
    return SaccadicCNN(in_channels, image_size, num_classes, width=width, block_size=block_size, dense=True)
