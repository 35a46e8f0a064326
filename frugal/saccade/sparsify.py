"""Saccades on a user's network: `sparsify(model, block_size, budget)` gates its stride-1 convs.

A `SaccadeGate` (a cheap policy on a downsampled input, as the saccadic CNN's) picks, per example,
the blocks of the input's block grid worth computing; every gated conv of the net then computes
only those blocks, each at its own resolution (a 28x28 input with 4-pixel blocks is a 7x7 grid:
4-pixel blocks on the 28x28 maps, 2-pixel blocks after a 2x2 pool). Training runs each gated conv
densely with its output masked by the straight-through Gumbel choice, so a skipped block still
tells the policy what skipping cost, and the gate's `loss()` pulls the share of blocks computed to
the budget; at inference the convs gather the chosen blocks with their halo, run one dense conv on
them and scatter the result into a zero map (dense map in and out: a drop-in for each conv).

A conv is gated when it is an nn.Conv2d with stride 1, dilation 1, an odd square kernel, zero
'same' padding, and no parametrization; at run time a map the grid does not divide runs dense.
Everything else in the net (norms, activations, pools, the head) is left as it is, so a skipped
block reads as zero only at the gated convs' outputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.layers.sparse_conv import BlockSet, Workspace, gather_tiles
from frugal.saccade.policy import BudgetSchedule, choose_levels

GATE = "saccade_gate"  # the attribute of a sparsified net that holds its gate


class GatePolicy(nn.Module):
    """The gate's policy, sized to stay cheap beside the net it gates: the input averaged to 2x2
    pixels per block (never above its own size), a 3x3 conv-ReLU, a max-pool to the block grid, a
    3x3 conv-ReLU on the grid, and a 1x1 conv to skip / compute logits per block."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.grid = (1, 1)  # set by the gate for each input
        self.body = nn.Conv2d(in_channels, width, 3, padding=1)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.logits = nn.Conv2d(width, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        (gh, gw), (h, w) = self.grid, x.shape[-2:]
        size = (min(2 * gh, h), min(2 * gw, w))
        small = F.avg_pool2d(x, (h // size[0], w // size[1])) if h % size[0] == 0 and w % size[1] == 0 \
            else F.adaptive_avg_pool2d(x, size)
        f = F.adaptive_max_pool2d(F.relu(self.body(small)), (gh, gw))  # (B, width, gh, gw)
        return self.logits(F.relu(self.mix(f))), None


class SaccadeGate(BudgetSchedule, nn.Module):
    """The policy of a sparsified net: reads the net's input, picks the blocks every gated conv
    computes. `loss()` is the budget term of the last forward pass (add it to the task loss);
    `attention` is what that pass chose (levels (B, gh, gw): 1 = computed, 0 = skipped). At
    inference each image computes the budget's share of its blocks, the ones the policy ranks
    highest; `inference_fraction` sets another share, `adaptive = True` the policy's own choice."""

    def __init__(self, in_channels: int, block_size: int, budget: float = 0.25, width: int = 8, tau: float = 1.0,
                 cost_weight: float = 1.0, budget_warmup: int | float = 0.3, attend_init: float = 0.9,
                 min_blocks: int = 1):
        nn.Module.__init__(self)
        if type(block_size) is not int or not 1 <= block_size <= 4096:
            raise ValueError(f"block_size must be a whole number from 1 to 4096, got {block_size!r}")
        if type(width) is not int or not 1 <= width <= 1024:
            raise ValueError(f"the policy's width must be a whole number from 1 to 1024, got {width!r}")
        if not 0 < budget <= 1:
            raise ValueError(f"budget is the share of blocks computed, in (0, 1], got {budget}")
        if not 0 < attend_init < 1:
            raise ValueError(f"attend_init is a probability in (0, 1), got {attend_init}")
        self.init_budget(budget, budget_warmup)
        self.block_size, self.tau, self.cost_weight, self.min_blocks = block_size, tau, cost_weight, min_blocks
        self.policy = GatePolicy(in_channels, width)
        with torch.no_grad():  # start attending nearly everywhere: the policy learns what it can drop
            self.policy.logits.bias.zero_()
            self.policy.logits.bias[1] = math.log(attend_init / (1 - attend_init))
        self.register_buffer("level_costs", torch.tensor([0.0, 1.0]), persistent=False)
        self.enabled = True  # False: every conv runs dense (the dense twin, same weights)
        self.inference_fraction: float | None = None  # attend this share of each image's blocks at inference
        self.fixed_levels: torch.Tensor | None = None  # (B, gh, gw) 0/1: forced blocks, the policy not run
        # inference: each image computes the budget's share of its blocks, those the policy wants most
        # (the budget term trains the expected share, which a policy can meet with every block at
        # p = budget: its argmax would then skip them all); adaptive: the policy's own argmax per block
        self.adaptive = False
        self.attention = None
        self._blocks: BlockSet | None = None
        self.options = dict(block_size=block_size, budget=budget, width=width, tau=tau, cost_weight=cost_weight,
                            budget_warmup=budget_warmup, attend_init=attend_init, min_blocks=min_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A pass-through: a sparsified nn.Sequential runs its modules in turn, this one last."""
        return x

    def __getstate__(self):  # a copy or pickle carries no batch's choice (autograd tensors do not copy)
        return {**self.__dict__, "attention": None, "_blocks": None}

    def look(self, x: torch.Tensor) -> None:
        """Choose the blocks for input x (B, C, H, W); the gated convs read the choice."""
        self.attention, self._blocks = None, None
        if not self.enabled:
            return
        s, (h, w) = self.block_size, x.shape[-2:]
        if h % s or w % s:
            raise ValueError(f"block size {s} does not divide the {h}x{w} input; sparsify with a block size "
                             "that divides both sides")
        self.policy.grid = (h // s, w // s)
        if self.fixed_levels is not None:  # tests, ablations, timing: a given choice, no policy
            lv = self.fixed_levels.to(device=x.device, dtype=torch.long)
            if lv.shape != (x.shape[0], h // s, w // s) or lv.numel() and not 0 <= int(lv.min()) <= int(lv.max()) <= 1:
                raise ValueError(f"fixed_levels must be 0/1 of shape {(x.shape[0], h // s, w // s)}, got "
                                 f"{tuple(lv.shape)}")
            logits = torch.where(lv[:, None] == torch.arange(2, device=x.device)[None, :, None, None], 10.0, -10.0)
            self.attention = choose_levels(logits.to(x.dtype), None, self.level_costs, "gumbel", False, fixed=lv)
            return
        logits, _ = self.policy(x)
        top = None
        share = self.inference_fraction if self.inference_fraction is not None else \
            None if self.adaptive else self._trained_share()
        if share is not None and not self.training:
            if not 0 < share <= 1:
                raise ValueError(f"inference_fraction is a share of the blocks in (0, 1], got {share}")
            top = max(1, round(share * (h // s) * (w // s)))
        self.attention = choose_levels(logits, None, self.level_costs, "gumbel", self.training, self.tau,
                                       min_blocks=self.min_blocks, top_blocks=top)

    def _trained_share(self) -> float:
        """The share of blocks inference computes: this step's budget (1 early in the warm-up)."""
        try:
            return self.current_budget()
        except ValueError:  # a warm-up given as a share of a run no loop has described
            return self.budget

    def blocks(self) -> BlockSet:
        """The chosen blocks of the last input, shared by every gated conv."""
        if self._blocks is None:
            self._blocks = BlockSet(self.attention.levels)
        return self._blocks

    def loss(self) -> torch.Tensor:
        """The budget term for the last forward pass: cost_weight x |expected share of blocks -
        this step's budget|. Call it once per training step (it advances the warm-up)."""
        if self.attention is None:
            raise ValueError("the gate has not seen an input: call the net on a batch first (or the gate is disabled)")
        budget = self.current_budget()
        if self.training:
            self.steps += 1
        return self.cost_weight * (self.attention.expected_cost.mean() - budget).abs()

    def extra_loss(self, x, logits, y) -> torch.Tensor | None:
        """frugal.train's hook: the budget term while training."""
        return self.loss() if self.training and self.attention is not None else None

    def attended(self) -> float:
        """Share of blocks the last forward pass computed."""
        return float((self.attention.levels > 0).float().mean()) if self.attention is not None else 1.0

    @torch.no_grad()
    def explain(self, net: nn.Module, x: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, path) -> Path:
        """Predict x (normalised) with `net` and draw which blocks it computed over `images` (uint8)."""
        from frugal.saccade.explain import draw_block_attention, eval_predictions

        preds = eval_predictions(net, x)
        return draw_block_attention(images.cpu(), self.attention.levels.cpu(), self.block_size, labels.cpu(),
                                    preds.cpu(), path, (3,))

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, budget={self.budget}"


class GatedConv2d(nn.Conv2d):
    """An nn.Conv2d that computes only the blocks its gate chose (its class is swapped in place by
    `sparsify`, so its parameters, their names and any hooks stay)."""

    gate: SaccadeGate

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_workspace"}  # scratch memory is not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.__dict__.get("gate")
        att = None if gate is None else gate.attention
        if att is None:
            return super().forward(x)
        (gh, gw), (h, w) = att.levels.shape[1:], x.shape[-2:]
        if h % gh or w % gw or h // gh != w // gw or x.shape[0] != att.levels.shape[0]:
            return super().forward(x)  # a map the block grid does not tile: dense
        s = h // gh
        if att.weights.requires_grad:  # training: dense, masked by the straight-through choice
            m = att.weights[:, 1].repeat_interleave(s, 1).repeat_interleave(s, 2)[:, None]  # (B, 1, H, W)
            return super().forward(x) * m
        blocks = gate.blocks()
        if blocks.n == 0:
            return x.new_zeros(x.shape[0], self.out_channels, h, w)
        x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # free for a channels-last map
        workspace = None if torch.is_grad_enabled() else self.__dict__.setdefault("_workspace", Workspace())
        tiles = gather_tiles(x_nhwc, blocks.bi, blocks.yi, blocks.xi, s, self.kernel_size[0] // 2, False, workspace)
        y = F.conv2d(tiles, self.weight, self.bias, groups=self.groups).permute(0, 2, 3, 1)  # (n, s, s, out)
        return blocks.to_map(y)


def gateable(conv: nn.Module) -> str | None:
    """Why a module cannot be gated, or None when it can."""
    from torch.nn.utils import parametrize

    if not isinstance(conv, nn.Conv2d):
        return "not an nn.Conv2d"
    if parametrize.is_parametrized(conv):
        return "parametrized (its kernels are constrained): sparsify before constraining"
    if type(conv) is not nn.Conv2d:
        return "a subclass of nn.Conv2d (its forward may differ)"
    k = conv.kernel_size
    if conv.stride != (1, 1) or conv.dilation != (1, 1):
        return "strided or dilated"
    if k[0] != k[1] or k[0] % 2 == 0:
        return f"kernel {k[0]}x{k[1]} is not odd and square"
    if conv.padding not in ((k[0] // 2, k[1] // 2), "same") or conv.padding_mode != "zeros":
        return "not zero 'same' padding"
    return None


def sparsify(model: nn.Module, block_size: int = 4, budget: float = 0.25, convs: Sequence[str] | None = None,
             in_channels: int | None = None, **gate_options) -> SaccadeGate:
    """Gate the stride-1 'same' convs of `model` (in place) by a policy on its input; return the gate.

    `convs`: names of the convs to gate (default: every one that can be, see `gateable`).
    `in_channels`: the input's channels (default: the first conv's). Other options go to
    `SaccadeGate` (budget_warmup: steps, or a share of the run given by gate.begin_run(total_steps);
    width: the policy's channels, by default the first gated conv's, within 4..16).
    In your own loop: `loss = task_loss + gate.loss()`; frugal.train adds it by itself."""
    if isinstance(getattr(model, GATE, None), SaccadeGate):
        raise ValueError(f"{type(model).__name__} is sparsified already (it has a {GATE})")
    named = dict(model.named_modules())
    if convs is None:
        chosen = [n for n, m in named.items() if gateable(m) is None]
    else:
        missing = [n for n in convs if n not in named]
        if missing:
            raise ValueError(f"{missing} are not modules of {type(model).__name__}")
        bad = {n: gateable(named[n]) for n in convs if gateable(named[n]) is not None}
        if bad:
            raise ValueError(f"cannot gate {bad}: a gated conv is a stride-1, undilated conv with an odd square "
                             "kernel and zero 'same' padding")
        chosen = list(convs)
    if not chosen:
        raise ValueError(f"no conv of {type(model).__name__} can be gated (stride 1, odd square kernel, 'same' "
                         "zero padding); nothing to sparsify")
    if in_channels is None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        in_channels = first.in_channels
    if gate_options.get("width") is None:  # the policy no wider than the net's first gated conv: it must stay cheap
        gate_options["width"] = min(16, max(4, named[chosen[0]].out_channels))
    ref = next(model.parameters())
    gate = SaccadeGate(in_channels, block_size, budget, **gate_options).to(device=ref.device, dtype=ref.dtype)
    for n in chosen:
        conv = named[n]
        conv.__class__ = GatedConv2d
        conv.__dict__["gate"] = gate  # not a submodule: the gate is registered once, on the model
    model.add_module(GATE, gate)
    model.register_forward_pre_hook(_look)
    # what rebuilds it: the model, then this (frugal.train and frugal.compress.save record it)
    step = {"name": "sparsify", "kw": dict(gate.options, convs=chosen, in_channels=in_channels)}
    model.frugal_transforms = [*getattr(model, "frugal_transforms", []), step]
    spec = getattr(model, "frugal_spec", None)
    if isinstance(spec, dict):
        model.frugal_spec = {**spec, "transforms": [*spec.get("transforms", []), step]}
    gate.gated = chosen
    return gate


def _look(model: nn.Module, args: tuple) -> None:
    """The net's forward pre-hook: its gate sees the input first (a module-level function, so that a
    deep copy of the net calls its own gate)."""
    gate_of(model).look(args[0])


def gate_of(model: nn.Module) -> SaccadeGate | None:
    """The gate of a sparsified net, or None."""
    g = getattr(model, GATE, None)
    return g if isinstance(g, SaccadeGate) else None
