"""A teacher for the attention policy: the dense twin says where the evidence is.

Fine-tuned from its twin, the saccadic model's policy starts knowing nothing about where to look,
and the straight-through gradient teaches it slowly: if the budget falls before the policy has
learnt to tell the digit's blocks from the rest, blocks are dropped at random and the fine-tuning
can diverge (it did on one seed of cluttered-mnist-60; docs/ideas/saccade.md). `TwinTeacher` adds,
while training, a binary cross-entropy between each block's attend probability and whether the
frozen twin's block features peak there for at least one channel (after the last stage,
max-pooled per block: the blocks the twin's head reads its evidence from).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.train import Hook, TrainState, load_run


@torch.no_grad()
def block_evidence(twin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) 0/1: the blocks where at least one channel of the twin's last-stage block
    features takes its maximum over the grid. `twin` is a dense `SaccadicCNN` (`blockcnn`) and `x`
    its normalised input."""
    return peaks(twin.dense_blocks(F.pad(twin.check(x), twin.pad)))


def peaks(g: torch.Tensor) -> torch.Tensor:
    """Block vectors (B, C, gh, gw) -> (B, gh, gw) 0/1: where at least one channel peaks."""
    b, _, gh, gw = g.shape
    marked = torch.zeros(b, gh * gw, dtype=g.dtype, device=g.device)
    marked.scatter_(1, g.flatten(2).argmax(2), 1.0)  # the winning block of every channel
    return marked.view(b, gh, gw)


def frozen_twin(twin: nn.Module | str | Path) -> nn.Module:
    """A trained dense twin (or the folder of its finished run), in eval mode and frozen."""
    if isinstance(twin, (str, Path)):
        twin = load_run(twin, device="cpu")[0]
    if not getattr(twin, "dense", False):
        raise ValueError("the teacher must be a dense twin (model `blockcnn`), got "
                         f"{type(twin).__name__} with dense={getattr(twin, 'dense', None)}")
    return twin.eval().requires_grad_(False)


class TwinTeacher(Hook):
    """`weight` x BCE(attend probability, `block_evidence` of the twin) per block: in any loop,
    `teacher(model, x)` after the model's forward pass on `x` is a term to add to the loss;
    `frugal.train` adds it as a hook. `twin` is a trained dense twin, or the folder of its finished
    run; it is frozen."""

    def __init__(self, twin: nn.Module | str | Path, weight: float = 1.0):
        if not weight >= 0:
            raise ValueError(f"teacher weight must be >= 0, got {weight}")
        self.twin, self.weight = frozen_twin(twin), weight

    def extra_loss(self, state: TrainState, logits: torch.Tensor, x: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor | None:
        return self(state.model, x)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The term for the model's last forward pass (on `x`), or None where there is none to add
        (in eval mode, without a policy, at weight 0)."""
        att = getattr(model, "attention", None)
        if not model.training or att is None or not self.weight:
            return None
        p = next(self.twin.parameters())
        if p.device != x.device or p.dtype != x.dtype:
            self.twin.to(device=x.device, dtype=x.dtype)
        target = block_evidence(self.twin, x)
        if target.shape != att.logits.shape[:1] + att.logits.shape[2:]:
            raise ValueError(f"the twin's block grid {tuple(target.shape[1:])} differs from the policy's "
                             f"{tuple(att.logits.shape[2:])}: build both with the same block_size")
        attend = 1 - att.logits.softmax(dim=1)[:, 0]  # (B, gh, gw)
        return self.weight * F.binary_cross_entropy(attend.clamp(1e-6, 1 - 1e-6), target)

    def state_dict(self) -> dict[str, float]:
        return {"weight": self.weight}  # kept in the checkpoint: a resumed run keeps its teacher

    def load_state_dict(self, d: dict[str, float]) -> None:
        if d.get("weight") != self.weight:
            raise ValueError(f"cannot resume: the run was trained with teacher weight {d.get('weight')}, "
                             f"now {self.weight}; resume with the same weight")

    def __repr__(self) -> str:
        return f"TwinTeacher(weight={self.weight})"


__all__ = ["TwinTeacher", "block_evidence", "frozen_twin", "peaks"]
