"""Saccades over time: a trajectory of glimpses over the block grid that stops once it has seen enough.

The model keeps a memory of the block grid: the block vectors it has computed so far and which
blocks it has seen. At each step it scores every block by how much it wants to see it (a cheap net
on a downsampled image, the coarse view, plus a 3x3 conv on the memory), picks a glimpse, runs the
backbone's block-sparse convs on the glimpse's unseen blocks only, and reads a prediction out of
every block seen so far. A glimpse is a window of k x k blocks moved to where the unseen blocks'
scores sum highest (`window`), or the n unseen blocks wanted most, wherever they are (`blocks`): a
fovea of fixed shape, or a glance free to follow an object's outline across block borders. At
inference it stops once that prediction is confident enough (`halt`), or after `glimpses` steps,
so an easy image costs fewer glimpses than a hard one.

The backbone (`stages`, `mix`, `fc`) has the names and shapes of the dense twin `blockcnn`'s, so the
model fine-tunes from a trained twin (`--init-from`). Where to look is learnt by imitation rather
than by REINFORCE: `GlimpseTeacher` pulls each unseen block's score towards the frozen twin's block
evidence (`block_evidence`: the blocks its head reads from) and, when weighted, each step's
prediction towards the twin's. The model picks its windows greedily from its own scores while it
trains, so the teacher labels the states the model itself reaches. A straight-through factor on
each new block's vector (1 in the forward pass) lets the task loss reach the scores as well.

Training and inference compute the same function, sparsely: a block is computed once, when its
first window arrives; at each stage its halo is read from the blocks computed before it or with
it (zeros where none was), and the head's conv is recomputed only at the blocks whose
neighbourhood changed. A test checks it against dense convs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.layers.sparse_conv import BlockSet, BlockSparseConv2d, Workspace, gather_tiles
from frugal.models import InputCheck, register_model
from frugal.saccade.model import N_STAGES, auto_block_size
from frugal.saccade.policy import AttentionPolicy
from frugal.saccade.teacher import frozen_twin, peaks
from frugal.train import Hook, TrainState


def _write_tiles(m: torch.Tensor, tiles: torch.Tensor, blocks: BlockSet) -> torch.Tensor:
    """The map m (B, H, W, C) with the blocks' tiles (n, s, s, C) written in: in place without
    gradients, into a copy with them."""
    b, h, w, c = m.shape
    (gh, gw), s = blocks.grid, tiles.shape[1]
    if not torch.is_grad_enabled():
        m.view(b, gh, s, gw, s, c).permute(0, 1, 3, 2, 4, 5)[blocks.bi, blocks.yi, blocks.xi] = tiles
        return m
    grid = m.view(b, gh, s, gw, s, c).permute(0, 1, 3, 2, 4, 5).index_put((blocks.bi, blocks.yi, blocks.xi), tiles)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


@dataclass
class Trajectory:
    """What one forward pass did, step by step, kept on the model for the losses and explanations.
    Step t concerns the examples `active[t]` (indices into the batch) only."""

    active: list[torch.Tensor] = field(default_factory=list)  # (n_t,) long
    scores: list[torch.Tensor] = field(default_factory=list)  # (n_t, gh, gw) want-logits, with gradients
    seen_before: list[torch.Tensor] = field(default_factory=list)  # (n_t, gh, gw) bool
    logits: list[torch.Tensor] = field(default_factory=list)  # (n_t, classes) after the step's glimpse
    anchors: torch.Tensor | None = None  # (B, T, 2) long: each window's top-left block, -1 where not taken;
    # None for glimpses of free blocks
    order: torch.Tensor | None = None  # (B, gh, gw) long: the glimpse (from 1) that computed each block, 0 none
    confidence: torch.Tensor | None = None  # (B, T): max class probability after each glimpse, nan where none
    glimpses: torch.Tensor | None = None  # (B,) long: glimpses each example took
    blocks_seen: torch.Tensor | None = None  # (B,) long: blocks each example computed


class TrajectoryCNN(nn.Module):
    """A glimpse trajectory on the block grid, with a learned where-to-look and a confidence halt."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 16,
                 block_size: int | None = None, window: int | None = None, glimpses: int = 8, policy_width: int = 8,
                 halt: float | None = None, anytime_weight: float = 1.0, train_glimpses: int | None = None,
                 blocks: int | None = None):
        super().__init__()
        s = block_size or auto_block_size(image_size)
        step = 2 ** (N_STAGES - 1)
        if s % step:
            raise ValueError(f"block_size must be a multiple of {step} ({N_STAGES} stages halve it), got {s}")
        self.check = InputCheck(in_channels, image_size)
        h, w = image_size
        self.pad = (0, math.ceil(w / s) * s - w, 0, math.ceil(h / s) * s - h)
        self.grid = (math.ceil(h / s), math.ceil(w / s))
        if window is not None and blocks is not None:
            raise ValueError(f"a glimpse is a window or free blocks, not both: got window={window}, blocks={blocks}")
        if blocks is None and window is None:
            window = 3
        if window is not None and not 1 <= window <= min(self.grid):
            raise ValueError(f"window is a side in blocks, 1..{min(self.grid)} for a {self.grid} grid, got {window}")
        if blocks is not None and not 1 <= blocks <= self.grid[0] * self.grid[1]:
            raise ValueError(f"blocks is a glimpse's count of blocks, 1..{self.grid[0] * self.grid[1]} for a "
                             f"{self.grid} grid, got {blocks}")
        if glimpses < 1 or (train_glimpses is not None and not 1 <= train_glimpses <= glimpses):
            raise ValueError(f"glimpses must be >= 1 and train_glimpses in 1..glimpses, got {glimpses} and "
                             f"{train_glimpses}")
        self.block_size, self.window, self.glimpses, self.anytime_weight = s, window, glimpses, anytime_weight
        self.blocks = blocks  # a glimpse's count of free blocks (None: a window)
        self.halt = halt  # stop an example once its top class probability reaches this (inference only)
        # glimpses per image while training (None: `glimpses`): the early steps are the ones a halt keeps,
        # and the later ones cost the most (each sees more of the grid)
        self.train_glimpses = train_glimpses
        widths = [width * 2 ** i for i in range(N_STAGES)]
        cins = [in_channels] + widths[:-1]
        self.stages = nn.ModuleList(BlockSparseConv2d(cin, cout, s // 2 ** i, (3,), coords=(i == 0))
                                    for i, (cin, cout) in enumerate(zip(cins, widths)))
        self.mix = nn.Conv2d(widths[-1], widths[-1], 3, padding=1)  # on the block grid, as the twin's
        self.fc = nn.Linear(widths[-1], num_classes)
        self.policy = AttentionPolicy(in_channels, self.grid, 0, policy_width)  # the coarse view: (B, 1, gh, gw)
        self.where = nn.Conv2d(widths[-1] + 1, 1, 3, padding=1)  # the memory's say: block vectors + seen mask
        with torch.no_grad():  # it starts from the coarse view alone
            self.where.weight.zero_()
            self.where.bias.zero_()
        self.trajectory: Trajectory | None = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_workspace"}  # scratch memory is not state

    def _zeros(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A zero tensor: fresh while autograd records, else in memory reused from call to call (a fresh
        map of megabytes costs its page faults on every call)."""
        if torch.is_grad_enabled():
            return like.new_zeros(shape)
        return self.__dict__.setdefault("_workspace", Workspace()).get(name, shape, like).zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.check(x), self.pad)
        b, (gh, gw), k = x.shape[0], self.grid, self.window
        # each stage's input as a map (B, H, W, C): the image, then the pooled outputs of the blocks
        # computed so far (zeros elsewhere), which a new block's halo reads
        maps = [x.permute(0, 2, 3, 1).contiguous()] + [
            self._zeros(f"map{i}", (b, gh * st.block_size, gw * st.block_size, st.in_channels), x)
            for i, st in enumerate(self.stages[1:], 1)]
        halt = None if self.training else self._halt()
        prior = self.policy(x)[0][:, 0]  # (B, gh, gw)
        c = self.fc.in_features
        # the block vectors computed so far, in a zero border of one block for the head's 3x3 conv
        gp = self._zeros("vectors", (b, gh + 2, gw + 2, c), x)
        seen = torch.zeros(b, gh, gw, dtype=torch.bool, device=x.device)
        mixed = self._zeros("mixed", (b, gh, gw, c), x)  # the head's conv at each seen block
        out = x.new_zeros(b, self.fc.out_features)
        idx = torch.arange(b, device=x.device)  # the examples still looking
        rec = Trajectory()
        # each window's top-left block (glimpses of free blocks have none)
        anchors = (torch.full((b, self.glimpses, 2), -1, dtype=torch.long, device=x.device)
                   if self.blocks is None else None)
        order = torch.zeros(b, gh, gw, dtype=torch.long, device=x.device)
        conf = torch.full((b, self.glimpses), float("nan"), device=x.device)
        taken = torch.zeros(b, dtype=torch.long, device=x.device)
        steps = self.train_glimpses if self.training and self.train_glimpses else self.glimpses
        for t in range(steps):
            seen_a = seen[idx]
            if t == 0:  # an empty memory: the conv of zeros is its bias
                score = prior + self.where.bias
            else:  # the memory is detached: what teaches the scores does not reach the backbone through it
                memory = torch.cat([gp[idx, 1:-1, 1:-1].detach().permute(0, 3, 1, 2), seen_a[:, None].to(x.dtype)], 1)
                score = prior[idx] + self.where(memory)[:, 0]  # (n, gh, gw)
            if self.blocks is None:
                anchor = self._choose(score.detach(), seen_a)  # (n, 2)
                new_a = self._window(anchor) & ~seen_a
                anchors[idx, t] = anchor
            else:
                new_a = self._free(score.detach(), seen_a)
            new = torch.zeros_like(seen)
            new[idx] = new_a
            blocks = BlockSet(new.long())
            vec, maps = self._block_vectors(maps, blocks)  # (n_blocks, C)
            if self.training and torch.is_grad_enabled():
                # straight through: each new block's vector times 1 (forward) + its want - itself, so
                # the task loss tells the scores which blocks paid (the teacher need not be there)
                row = torch.full((b,), -1, dtype=torch.long, device=x.device)
                row[idx] = torch.arange(idx.numel(), device=x.device)
                want = torch.sigmoid(score[row[blocks.bi], blocks.yi, blocks.xi])
                vec = vec * (1 + want - want.detach())[:, None]
            at = (blocks.bi, blocks.yi + 1, blocks.xi + 1)
            if torch.is_grad_enabled():
                gp = gp.index_put(at, vec)
            else:
                gp[at] = vec
            seen = seen | new
            order.masked_fill_(new, t + 1)
            mixed, logits = self._readout(gp, seen, new, mixed, idx)
            out = out.index_copy(0, idx, logits.to(out.dtype))
            p = logits.detach().float().softmax(1).amax(1)
            rec.active.append(idx)
            rec.scores.append(score)
            rec.seen_before.append(seen_a)
            rec.logits.append(logits)
            conf[idx, t] = p.to(conf.dtype)
            taken[idx] += 1
            go_on = (~seen[idx]).flatten(1).any(1)  # something left to see
            if halt is not None:
                go_on &= p < halt
            idx = idx[go_on]
            if idx.numel() == 0:
                break
        rec.anchors, rec.order, rec.confidence, rec.glimpses = anchors, order, conf, taken
        rec.blocks_seen = seen.flatten(1).sum(1)
        self.trajectory = rec
        return out

    def _halt(self) -> float | None:
        if self.halt is None:
            return None
        if not 0 < self.halt <= 1:
            raise ValueError(f"halt is a class probability in (0, 1], got {self.halt}")
        return self.halt

    def _choose(self, score: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """(n, 2) the top-left block of the window whose unseen blocks want most to be seen (the sum of
        their sigmoid scores). A window with nothing unseen is never chosen while another has some."""
        k = self.window
        want = (torch.sigmoid(score) * ~seen).to(torch.float32)[:, None]  # (n, 1, gh, gw)
        unseen = (~seen).to(torch.float32)[:, None]
        gain = F.avg_pool2d(want, k, stride=1).flatten(1)  # (n, A): per window, over its k x k blocks
        fresh = F.avg_pool2d(unseen, k, stride=1).flatten(1) > 0
        gain = torch.where(fresh, gain, torch.full_like(gain, -1.0))
        best = gain.argmax(1)
        cols = self.grid[1] - k + 1
        return torch.stack([best // cols, best % cols], 1)

    def _free(self, score: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """(n, gh, gw) bool: the `blocks` unseen blocks with the highest scores (all left, where fewer)."""
        flat = score.flatten(1).masked_fill(seen.flatten(1), float("-inf"))
        pick = torch.zeros_like(seen.flatten(1))
        pick.scatter_(1, flat.topk(self.blocks, 1).indices, True)
        return pick.view_as(seen) & ~seen

    def _window(self, anchor: torch.Tensor) -> torch.Tensor:
        """(n, gh, gw) bool: the k x k blocks from each anchor."""
        gh, gw = self.grid
        rows = torch.arange(gh, device=anchor.device)[None, :, None]
        cols = torch.arange(gw, device=anchor.device)[None, None, :]
        r, c = anchor[:, 0, None, None], anchor[:, 1, None, None]
        return (rows >= r) & (rows < r + self.window) & (cols >= c) & (cols < c + self.window)

    def _block_vectors(self, maps: list[torch.Tensor], blocks: BlockSet) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The backbone's stages on the chosen blocks only, each block's halo read from the stage's input
        map; each stage's pooled output written into the next one's map. Returns (a max per block (n, C),
        the maps)."""
        maps = list(maps)
        grad = torch.is_grad_enabled()
        for i, stage in enumerate(self.stages):
            bs = stage.block_size
            tiles = gather_tiles(maps[i], blocks.bi, blocks.yi, blocks.xi, bs, 1, stage.coords,
                                 None if grad else stage._workspace)  # (n, C', T, T)
            h = F.conv2d(tiles, stage.weight[0], stage.bias[0] if stage.bias is not None else None)
            h = F.relu(h) if grad else h.relu_()
            if i + 1 == len(self.stages):
                return h.amax(dim=(2, 3)), maps
            pooled = F.max_pool2d(h, 2).permute(0, 2, 3, 1)  # (n, s/2, s/2, C)
            maps[i + 1] = _write_tiles(maps[i + 1], pooled, blocks)
        raise AssertionError("unreachable: a backbone has stages")

    def _readout(self, gp: torch.Tensor, seen: torch.Tensor, new: torch.Tensor, mixed: torch.Tensor,
                 idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed, the prediction of the examples `idx`): the head's conv recomputed only at the seen
        blocks next to a new one (no other block's neighbourhood changed) into `mixed` (B, gh, gw, C),
        then a max over the seen blocks and the classifier. `gp` (B, gh+2, gw+2, C) holds the block
        vectors in a zero border. In place without gradients."""
        near = F.max_pool2d(new[:, None].to(gp.dtype), 3, stride=1, padding=1)[:, 0] > 0
        bi, yi, xi = (near & seen).nonzero(as_tuple=True)
        _, hp, wp, c = gp.shape
        off = torch.arange(3, device=gp.device)
        # each block's 3x3 neighbourhood as rows of the flat (B*(gh+2)*(gw+2), C) store: one index_select
        rows = ((bi * hp + yi)[:, None, None] + off[:, None]) * wp + (xi[:, None, None] + off)  # (n, 3, 3)
        hood = gp.reshape(-1, c).index_select(0, rows.view(-1))  # (n*9, C)
        w = self.mix.weight.permute(0, 2, 3, 1).reshape(self.mix.out_channels, 9 * c)
        m = F.relu(F.linear(hood.view(-1, 9 * c), w, self.mix.bias))
        if torch.is_grad_enabled():
            mixed = mixed.index_put((bi, yi, xi), m)
        else:
            mixed[bi, yi, xi] = m
        # the max over the seen blocks: the others hold zeros, and a ReLU's output is never below zero
        return mixed, self.fc(mixed[idx].amax(dim=(1, 2)))

    def extra_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Anytime training: the mean cross-entropy of the prediction after every glimpse, so an early
        stop is a good one (the loop's own loss takes the last)."""
        rec = self.trajectory
        if not self.training or rec is None or not self.anytime_weight:
            return None
        losses = [F.cross_entropy(lg, y[i]) for i, lg in zip(rec.active, rec.logits)]
        return self.anytime_weight * torch.stack(losses).mean()

    @torch.no_grad()
    def explain(self, x: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, path) -> Path:
        """Predict x (normalised) and draw each image's windows in order, with the confidence after each."""
        from frugal.saccade.explain import draw_trajectories, eval_predictions

        preds = eval_predictions(self, x)
        rec = self.trajectory
        return draw_trajectories(images.cpu(), rec.order.cpu(), rec.confidence.cpu(), self.block_size, labels.cpu(),
                                 preds.cpu(), path)

    def extra_repr(self) -> str:
        glimpse = f"window={self.window}" if self.blocks is None else f"blocks={self.blocks}"
        return f"grid={self.grid}, block_size={self.block_size}, {glimpse}, glimpses={self.glimpses}"


def stopping_rule(halt: float | None = None, most: int | None = None) -> tuple[str, dict[str, Any]]:
    """A trained trajectory model's test-time stopping rule: its label ("halt 0.99", "halt 0.99 max 3",
    "glimpses 2") and the attributes that set it. At `halt` (a top class probability), after at most
    `most` glimpses (None: the model's own most), or with no halt after exactly `most` glimpses."""
    if halt is None:
        if most is None:
            raise ValueError("a stopping rule needs a halt, a number of glimpses, or both")
        return f"glimpses {most}", {"halt": None, "glimpses": most}
    if most is None:
        return f"halt {halt:g}", {"halt": halt}
    return f"halt {halt:g} max {most}", {"halt": halt, "glimpses": most}


@torch.no_grad()
def glimpses_taken(model: TrajectoryCNN, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(glimpses, blocks): per image of x (normalised), the glimpses the model took and the blocks it
    computed, at its current halt."""
    model.eval()
    glimpses, blocks = [], []
    for xb in x.split(batch):
        model(xb)
        glimpses.append(model.trajectory.glimpses.cpu())
        blocks.append(model.trajectory.blocks_seen.cpu())
    return torch.cat(glimpses), torch.cat(blocks)


class GlimpseTeacher(Hook):
    """Where to look, taught by the frozen dense twin: at every step, a binary cross-entropy between
    each unseen block's want-score and the twin's `block_evidence` there; with `distill` > 0, also the
    KL divergence from the twin's prediction to each step's. `twin` is a trained `blockcnn` with the
    model's block size, or the folder of its finished run."""

    def __init__(self, twin: nn.Module | str | Path, weight: float = 1.0, distill: float = 0.0,
                 temperature: float = 2.0):
        if not (weight >= 0 and distill >= 0 and temperature > 0):
            raise ValueError(f"weights must be >= 0 and the temperature > 0, got {weight}, {distill}, {temperature}")
        self.twin = frozen_twin(twin)
        self.weight, self.distill, self.temperature = weight, distill, temperature

    def extra_loss(self, state: TrainState, logits: torch.Tensor, x: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor | None:
        return self(state.model, x)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        rec = getattr(model, "trajectory", None)
        if not model.training or rec is None or not (self.weight or self.distill):
            return None
        p = next(self.twin.parameters())
        if p.device != x.device or p.dtype != x.dtype:
            self.twin.to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            blocks = self.twin.dense_blocks(F.pad(self.twin.check(x), self.twin.pad))  # (B, C, gh, gw)
            evidence = peaks(blocks)  # as block_evidence
            soft = (self.twin.fc(self.twin._head(blocks)) / self.temperature).softmax(1)
        if evidence.shape[1:] != rec.scores[0].shape[1:]:
            raise ValueError(f"the twin's block grid {tuple(evidence.shape[1:])} differs from the model's "
                             f"{tuple(rec.scores[0].shape[1:])}: build both with the same block_size")
        terms = []
        for i, score, before, lg in zip(rec.active, rec.scores, rec.seen_before, rec.logits):
            unseen = ~before
            if self.weight and bool(unseen.any()):
                bce = F.binary_cross_entropy_with_logits(score[unseen], evidence[i][unseen])
                terms.append(self.weight * bce)
            if self.distill:
                kl = F.kl_div((lg / self.temperature).log_softmax(1), soft[i], reduction="batchmean")
                terms.append(self.distill * self.temperature ** 2 * kl)
        return torch.stack(terms).sum() / len(rec.active) if terms else None

    def state_dict(self) -> dict[str, float]:
        return {"weight": self.weight, "distill": self.distill, "temperature": self.temperature}

    def load_state_dict(self, d: dict[str, float]) -> None:
        if d != self.state_dict():
            raise ValueError(f"cannot resume: the run was trained with the teacher {d}, now {self.state_dict()}; "
                             "resume with the same settings")

    def __repr__(self) -> str:
        return f"GlimpseTeacher(weight={self.weight}, distill={self.distill})"


@register_model
def trajectory(in_channels: int = 1, image_size: tuple[int, int] = (60, 60), num_classes: int = 10,
               width: int = 16, block_size: int | None = None, window: int | None = None, glimpses: int = 8,
               policy_width: int = 8, halt: float | None = None, anytime_weight: float = 1.0,
               train_glimpses: int | None = None, blocks: int | None = None) -> nn.Module:
    """Saccades over time: glimpses of blocks (a window, 3x3 by default, or `blocks` free ones), one
    after another, until the prediction is confident."""
    return TrajectoryCNN(in_channels, image_size, num_classes, width=width, block_size=block_size, window=window,
                         glimpses=glimpses, policy_width=policy_width, halt=halt, anytime_weight=anytime_weight,
                         train_glimpses=train_glimpses, blocks=blocks)


__all__ = ["GlimpseTeacher", "Trajectory", "TrajectoryCNN", "trajectory"]
