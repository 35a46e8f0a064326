"""Tasks generated from MNIST: the digit somewhere on a larger canvas, optionally among clutter.

From "Recurrent Models of Visual Attention" (Mnih et al., 2014): translated MNIST places each digit
at a random position on a blank canvas; cluttered MNIST adds distractors, random 8x8 crops of other
digits, so that a model must find the digit rather than merely read it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from frugal.data.cache import (check_overwritable, load_stamped_npz, normalised_stamp, save_stamped_npz,
                               stamp_matches)
from frugal.data.errors import DataError
from frugal.data.sources import MNIST, Arrays, PinnedSource, load_pinned

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever clutter() would produce different images for the same seed


@dataclass(frozen=True)
class Cluttered:
    """Images made by clutter(), with where each digit went."""

    x: np.ndarray  # (N, S, S) uint8
    pos: np.ndarray  # (N, 2) int64: top-left (row, col) of the digit on the canvas


def clutter(images: np.ndarray, canvas: int, distractors: int = 0, seed: int | Sequence[int] = 0,
            n: int | None = None, patch: int = 8) -> Cluttered:
    """Place images[i] (i < n) at a uniformly random position on a blank canvas x canvas, then add
    `distractors` random patch x patch crops of *other* images of the same set at random positions.
    Overlaps combine by max, so a distractor never erases the digit's strokes.

    images: (M, H, W) or (M, 1, H, W) uint8. Same seed -> same output, byte for byte.
    """
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]  # (M, 1, H, W) -> (M, H, W)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (M, H, W), got {images.dtype} {images.shape}")
    m, h, w = images.shape
    n = m if n is None else n
    if not 0 <= n <= m:
        raise ValueError(f"n={n} is outside 0..{m} (the number of images)")
    if canvas < max(h, w):
        raise ValueError(f"canvas={canvas} is smaller than the {h}x{w} images")
    if distractors > 0 and (m < 2 or patch > min(h, w)):
        raise ValueError(f"distractors need at least 2 images of at least {patch}x{patch}; "
                         f"got {m} of {h}x{w}")
    rng = np.random.default_rng(seed)
    out = np.zeros((n, canvas, canvas), np.uint8)
    pos = np.stack([rng.integers(0, canvas - h + 1, n), rng.integers(0, canvas - w + 1, n)], axis=1)
    _paste_max(out, images[:n], pos)
    for _ in range(distractors):
        # offset 1..m-1 modulo m: a uniformly random image that is never the digit itself
        src = (np.arange(n) + rng.integers(1, m, n)) % m
        crop = np.stack([rng.integers(0, h - patch + 1, n), rng.integers(0, w - patch + 1, n)], axis=1)
        at = rng.integers(0, canvas - patch + 1, (n, 2))
        dy = np.arange(patch)[None, :, None]
        dx = np.arange(patch)[None, None, :]
        patches = images[src[:, None, None], crop[:, 0, None, None] + dy, crop[:, 1, None, None] + dx]  # (n, p, p)
        _paste_max(out, patches, at)
    return Cluttered(out, pos.astype(np.int64))


def _paste_max(out: np.ndarray, patches: np.ndarray, at: np.ndarray, chunk: int = 4096) -> None:
    """out[i, r:r+ph, c:c+pw] = max(that, patches[i]) for every i, with (r, c) = at[i]. Vectorised
    per chunk: each image gets one patch per call, so the scattered indices never collide."""
    n, ph, pw = patches.shape
    dy = np.arange(ph)[None, :, None]
    dx = np.arange(pw)[None, None, :]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        i = np.arange(s, e)[:, None, None]  # (b, 1, 1)
        r = at[s:e, 0, None, None] + dy  # (b, ph, 1)
        c = at[s:e, 1, None, None] + dx  # (b, 1, pw)
        out[i, r, c] = np.maximum(out[i, r, c], patches[s:e])  # (b, ph, pw)


@dataclass(frozen=True)
class ClutterTask:
    """A derived task: which source, which canvas, how much clutter."""

    name: str
    description: str
    source: PinnedSource
    canvas: int  # pixels per side
    distractors: int  # 8x8 crops of other digits per image
    patch: int = 8  # distractor side, pixels
    seed: int = 0  # fixed: the task is the same everywhere

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.canvas, self.canvas)

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def source_text(self) -> str:
        return f"generated from {self.source.name} (seed {self.seed}); cached as npz"

    def stamp(self) -> dict:
        return {"generator": "clutter", "version": GENERATOR_VERSION, "canvas": self.canvas,
                "distractors": self.distractors, "patch": self.patch, "seed": self.seed,
                "source": self.source.name, "source_md5": dict(self.source.md5)}

    def path(self, root: Path) -> Path:
        return root / self.name / f"{self.name}.npz"


DERIVED = {t.name: t for t in (
    ClutterTask("translated-mnist-60", "an MNIST digit at a random position on a blank 60x60 canvas",
                MNIST, canvas=60, distractors=0),
    ClutterTask("cluttered-mnist-60", "an MNIST digit at a random position on 60x60 with 4 8x8 distractors",
                MNIST, canvas=60, distractors=4),
    ClutterTask("cluttered-mnist-100", "an MNIST digit at a random position on 100x100 with 8 8x8 distractors",
                MNIST, canvas=100, distractors=8),
)}


def generate(task: ClutterTask, src: Arrays) -> dict[str, np.ndarray]:
    """All of a derived task's arrays; train from the source's train split, test from its test."""
    out = {}
    for i, split in enumerate(("train", "test")):
        x = getattr(src, f"x_{split}")
        c = clutter(x, task.canvas, task.distractors, seed=(task.seed, i), patch=task.patch)
        out[f"x_{split}"] = c.x
        out[f"y_{split}"] = getattr(src, f"y_{split}")
    return out


def fetch_derived(task: ClutterTask, root: Path, force: bool = False) -> Path:
    """Generate the task's npz unless an up-to-date one is already there."""
    path = task.path(root)
    if force or not stamp_matches(path, task.stamp()):
        check_overwritable(path)  # before fetching the source and generating
        src = load_pinned(task.source, root)
        t0 = time.perf_counter()
        arrays = generate(task, src)
        save_stamped_npz(path, arrays, task.stamp())
        log.info("generated %s in %.1f s", task.name, time.perf_counter() - t0)
    return path.parent


def load_derived(task: ClutterTask, root: Path) -> Arrays:
    path = task.path(root)
    if not path.exists():
        fetch_derived(task, root)  # first use: generate (a few seconds)
    fix = f"frugal data fetch {task.name}"
    arrays, stamp = load_stamped_npz(path, fix)
    if stamp != normalised_stamp(task.stamp()):
        log.info("%s was made by another generator version or seed; regenerating", path)
        fetch_derived(task, root, force=True)
        arrays, stamp = load_stamped_npz(path, fix)
    try:
        return Arrays(arrays["x_train"][:, None], arrays["y_train"],  # (N, S, S) -> (N, 1, S, S)
                      arrays["x_test"][:, None], arrays["y_test"], num_classes=task.num_classes)
    except (KeyError, ValueError) as e:
        raise DataError(f"{path} is malformed ({e}): the cache is corrupt; run `{fix} --force`") from e

