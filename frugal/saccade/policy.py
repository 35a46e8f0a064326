"""The attention policy: a cheap net on a downsampled image that picks a level per block.

Levels are 0 = skip, 1.. = the kernel sizes of the sparse stages (3x3, 5x5, ...). Two ways to train
the discrete choice: a straight-through Gumbel-softmax estimator (Jang et al. 2017; the forward pass
uses the hard choice, the backward pass the soft one), or REINFORCE (Williams 1992) with a learned
baseline, as the location policy in "Recurrent Models of Visual Attention" (Mnih et al. 2014).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ESTIMATORS = ("gumbel", "reinforce")


class AttentionPolicy(nn.Module):
    """Downsample the image to 4 pixels per block, two conv-ReLU-pool steps down to the block grid,
    then a 1x1 conv to per-block logits over the levels, and optionally a value head (the REINFORCE
    baseline: the reward it predicts from the same features)."""

    def __init__(self, in_channels: int, grid: tuple[int, int], n_levels: int, width: int = 16,
                 value_head: bool = False):
        super().__init__()
        self.grid = grid
        # each ReLU after its pool (they commute): on a quarter of the values
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.MaxPool2d(2), nn.ReLU())
        self.logits = nn.Conv2d(width, n_levels + 1, 1)
        self.value = nn.Linear(width, 1) if value_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, C, H, W). Returns logits (B, L+1, gh, gw) and the baseline's predicted reward (B,),
        or None without a value head."""
        gh, gw = self.grid
        h, w = x.shape[-2:]
        if h % (4 * gh) == 0 and w % (4 * gw) == 0:  # the same average, several times faster on CPU
            small = mean_pool(x, h // (4 * gh), w // (4 * gw))  # (B, C, 4gh, 4gw)
        else:
            small = F.adaptive_avg_pool2d(x, (4 * gh, 4 * gw))
        # channels-last from the first conv's output on (a 1-channel input cannot carry the layout):
        # CPU max-pooling is ~3x faster in it than in NCHW
        f = self.body[0](small).contiguous(memory_format=torch.channels_last)
        f = self.body[1:](f)  # (B, width, gh, gw)
        value = self.value(f.mean(dim=(2, 3))).squeeze(1) if self.value is not None else None
        return self.logits(f), value


def mean_pool(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """F.avg_pool2d(x, (kh, kw)) on a map whose sides kh and kw divide, as a sum of its kh * kw strided
    views: each view adds a 1/(kh kw) share of the map, and on CPU this is ~3x faster than the pooling
    kernel on a map of few channels."""
    total = sum(x[..., i::kh, j::kw] for i in range(kh) for j in range(kw))
    return total / (kh * kw) if kh * kw > 1 else x


class BudgetSchedule:
    """A compute budget that falls from 1 (dense) to `budget` over a warm-up, so features form before
    the policy starts dropping blocks. Mixed into an nn.Module (call `init_budget` in its __init__).
    The warm-up is an int (training steps) or a float in (0, 1): that share of the run, whose
    length a training loop gives `begin_run` (frugal.train does)."""

    def init_budget(self, budget: float, budget_warmup: int | float) -> None:
        if isinstance(budget_warmup, float) and not 0 < budget_warmup < 1:
            raise ValueError(f"budget_warmup is steps (an int) or a share of the run in (0, 1), got {budget_warmup}")
        self.budget = budget  # target compute, as a share of the dense twin's
        self.budget_warmup = budget_warmup
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training steps seen, for the warm-up
        self.run_steps: int | None = None  # the run's training steps, once a loop has said (begin_run)

    def budget_applies(self) -> bool:
        return True

    def begin_run(self, total_steps: int) -> None:
        """A training loop's word on how many steps it will take: a warm-up given as a share of the
        run becomes that many steps."""
        self.run_steps = int(total_steps)

    def warmup_steps(self) -> int:
        if isinstance(self.budget_warmup, float):
            if self.run_steps is None:
                raise ValueError("budget_warmup is a share of the run, but no training loop said how long the run "
                                 "is: call begin_run(total_steps) on the model or gate before training "
                                 "(frugal.train does)")
            return round(self.budget_warmup * self.run_steps)
        return int(self.budget_warmup)

    def end_run(self) -> str | None:
        """A warning for the training loop to show, if the run ended before the budget came into force
        (the model then attends more blocks than the budget, maybe all of them)."""
        if not self.budget_applies() or int(self.steps) >= self.warmup_steps():
            return None
        return (f"the run ended after {int(self.steps)} training steps, before the compute budget came into force "
                f"(its warm-up is {self.warmup_steps()} steps): the policy was still asked for "
                f"{self.current_budget():.0%} of the dense compute, not {self.budget:.0%}. Train longer, or give "
                "budget_warmup as a share of the run, e.g. 0.3")

    def current_budget(self) -> float:
        """The budget of this training step: linear from 1 to `budget` over the warm-up."""
        warm = self.warmup_steps()
        if warm <= 0:
            return self.budget
        left = max(0.0, 1.0 - int(self.steps) / warm)
        return self.budget + (1.0 - self.budget) * left


@dataclass
class Attention:
    """What one forward pass chose, kept on the model for the losses and for explanations."""

    logits: torch.Tensor  # (B, L+1, gh, gw)
    levels: torch.Tensor  # (B, gh, gw) int64, 0 = skip
    weights: torch.Tensor  # (B, L+1, gh, gw) one-hot of `levels`; in Gumbel training it carries the
    # straight-through gradient of the soft choice (value exactly 0 or 1 in the forward pass)
    log_prob: torch.Tensor  # (B,) log-probability of the sampled levels (REINFORCE)
    value: torch.Tensor | None  # (B,) the baseline's predicted reward (REINFORCE only)
    expected_cost: torch.Tensor  # (B,) soft compute cost, as a fraction of the dense twin's


def choose_levels(logits: torch.Tensor, value: torch.Tensor | None, level_costs: torch.Tensor, estimator: str,
                  training: bool, tau: float = 1.0, fixed: torch.Tensor | None = None,
                  min_blocks: int = 0, top_blocks: int | None = None) -> Attention:
    """Pick a level per block. Training: sample (Gumbel-max or categorical); evaluation: argmax, or
    with `top_blocks` = k, each example's k least-skippable blocks at their best non-skip level (a
    compute budget chosen at test time, from the same policy).
    `level_costs` (L+1,) is each level's compute relative to the dense twin's level (skip = 0).
    An example that attends fewer than `min_blocks` blocks gets its `min_blocks` least-skippable
    blocks (highest margin of the best non-skip logit over the skip logit) at their best non-skip
    level: a net that sees nothing can only guess."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
    probs = logits.softmax(dim=1)  # (B, L+1, gh, gw)
    expected_cost = (probs * level_costs[None, :, None, None]).sum(1).mean(dim=(1, 2))  # (B,)
    log_p = logits.log_softmax(dim=1)
    if fixed is not None:
        levels = fixed
    elif not training and top_blocks is not None:
        levels = _top_blocks(logits, top_blocks)
    elif not training:
        levels = logits.argmax(dim=1)  # (B, gh, gw)
    elif estimator == "gumbel":
        g = -torch.empty_like(logits).exponential_().log()  # Gumbel(0, 1) noise
        levels = (logits + g).argmax(dim=1)
    else:
        levels = torch.distributions.Categorical(logits=logits.permute(0, 2, 3, 1)).sample()  # (B, gh, gw)
    if fixed is None and min_blocks > 0:
        levels = _ensure_min_blocks(levels, logits, min_blocks)
    weights = F.one_hot(levels, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)  # (B, L+1, gh, gw)
    if training and fixed is None and estimator == "gumbel":
        soft = ((logits + g) / tau).softmax(dim=1)  # (B, L+1, gh, gw)
        weights = weights + soft - soft.detach()  # hard value, soft gradient
    log_prob = log_p.gather(1, levels[:, None]).squeeze(1).sum(dim=(1, 2))  # (B,)
    return Attention(logits, levels, weights, log_prob, value, expected_cost)


def _top_blocks(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, gh, gw) levels: each example's k blocks of highest non-skip margin, at their best non-skip level."""
    b = logits.shape[0]
    lg = logits.reshape(b, logits.shape[1], -1)  # (B, L+1, n)
    best_val, best_lvl = lg[:, 1:].max(dim=1)  # (B, n)
    top = (best_val - lg[:, 0]).topk(min(k, lg.shape[2]), dim=1).indices  # (B, k)
    levels = torch.zeros_like(best_lvl)
    levels.scatter_(1, top, (best_lvl + 1).gather(1, top))
    return levels.reshape(b, *logits.shape[2:])


def _ensure_min_blocks(levels: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    n = levels[0].numel()
    short = (levels > 0).flatten(1).sum(1) < min(k, n)  # (B,) examples that attend too little
    if not bool(short.any()):
        return levels
    forced = torch.where(levels > 0, levels, _top_blocks(logits, k))  # attended blocks keep their own level
    return torch.where(short[:, None, None], forced, levels)
