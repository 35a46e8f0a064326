"""The in-memory form every task takes: uint8 images and int64 labels, split three ways."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """One split of a task. Images stay uint8 in memory; the training loop normalises per batch."""

    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64
    w: torch.Tensor | None = None  # (N,) float, >= 0: each example's weight in the training loss; None: all 1

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"Split.x must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"Split.y must be int64 (N,) matching x, got {self.y.dtype} {tuple(self.y.shape)}")
        if self.w is not None and (not self.w.is_floating_point() or self.w.shape != self.y.shape
                                   or not bool(torch.isfinite(self.w).all() and (self.w >= 0).all())):
            raise ValueError(f"Split.w must be finite float weights >= 0, shape (N,) matching y; got "
                             f"{self.w.dtype} {tuple(self.w.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, n: int | None) -> "Split":
        """The first n examples (splits are already shuffled when built), or all when n is None."""
        if n is None or n >= len(self):
            return self
        return Split(self.x[:n], self.y[:n], None if self.w is None else self.w[:n])


@dataclass(frozen=True)
class TaskData:
    """A task: train / validation / test splits. Validation is held out of the training set;
    the test split is never used for selection."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: float  # pixel mean of the training split, in [0, 1] units
    std: float  # pixel std of the training split, in [0, 1] units

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.train.x.shape[2], self.train.x.shape[3])

    def __repr__(self) -> str:
        c, (h, w) = self.in_channels, self.image_size
        return (f"TaskData({self.name!r}, {c}x{h}x{w}, classes={self.num_classes}, "
                f"train={len(self.train)}, val={len(self.val)}, test={len(self.test)})")
