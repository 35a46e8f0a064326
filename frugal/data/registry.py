"""Every data set by name: list, fetch, and load as a TaskData with a held-out validation split."""

from __future__ import annotations

import re
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frugal.data.cache import data_root, signature
from frugal.data.corrupt import CORRUPTIONS, SUITES, fetch_suite, suite_cached
from frugal.data.derived import DERIVED, fetch_derived, load_derived
from frugal.data.errors import DataError
from frugal.data.sources import (DIGITS_DESCRIPTION, DIGITS_SOURCE, FOLDER_PREFIX, PINNED, Arrays,
                                 digits_path, fetch_digits, fetch_pinned, folder_files, load_digits_arrays,
                                 load_folder, load_pinned, pinned_cached, pinned_files)
from frugal.data.types import Split, TaskData

KNOWN = ("digits", *PINNED, *DERIVED, *SUITES)


@dataclass(frozen=True)
class DatasetInfo:
    """One row of `frugal data list`."""

    name: str
    description: str
    source: str  # where it comes from, for people
    cached: bool  # present in the cache folder (fetch makes it so)
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    kind: str  # "source", "derived" (generated from a source) or "suite" (corrupted test sets)


def _unknown(name: str) -> DataError:
    return DataError(f"unknown data set {name!r}; known: {', '.join(KNOWN)}, or folder:/path/to/dir")


def list_datasets(data_dir: str | os.PathLike | None = None) -> list[DatasetInfo]:
    """Every named data set and whether it is in the cache (by presence; fetch checks content)."""
    root = data_root(data_dir)
    out = [DatasetInfo("digits", DIGITS_DESCRIPTION, DIGITS_SOURCE, digits_path(root).is_file(),
                       (1, 8, 8), 10, "source")]
    out += [DatasetInfo(s.name, s.description, s.source, pinned_cached(s, root), s.image_shape,
                        s.num_classes, "source") for s in PINNED.values()]
    out += [DatasetInfo(t.name, t.description, t.source_text, t.path(root).is_file(), t.image_shape,
                        t.num_classes, "derived") for t in DERIVED.values()]
    out += [DatasetInfo(name,
                        f"{src.name}'s test set under {len(CORRUPTIONS)} corruptions x 5 severities (MNIST-C layout)",
                        f"generated from {src.name}; all but the affine and stripe corruptions need "
                        f"`pip install 'frugal[corrupt]'`",
                        suite_cached(name, root), src.image_shape, src.num_classes, "suite")
            for name, src in SUITES.items()]
    return out


def fetch(name: str, data_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Fetch and verify a data set into the cache (generating it, for derived ones) and return its
    folder. Does nothing when it is already there, unless `force`."""
    root = data_root(data_dir)
    if name == "digits":
        return fetch_digits(root, force)
    if name in PINNED:
        return fetch_pinned(PINNED[name], root, force)
    if name in DERIVED:
        return fetch_derived(DERIVED[name], root, force)
    if name in SUITES:
        return fetch_suite(name, root, force)
    if name.startswith(FOLDER_PREFIX):
        folder = Path(name.removeprefix(FOLDER_PREFIX)).expanduser()
        load_folder(folder)  # nothing to fetch; check it loads
        return folder
    raise _unknown(name)


def load_arrays(name: str, data_dir: str | os.PathLike | None = None) -> Arrays:
    """A data set's raw train and test splits as numpy (fetching or generating it on first use)."""
    root = data_root(data_dir)
    if name == "digits":
        return load_digits_arrays(root)
    if name in PINNED:
        return load_pinned(PINNED[name], root)
    if name in DERIVED:
        return load_derived(DERIVED[name], root)
    if name.startswith(FOLDER_PREFIX):
        return load_folder(Path(name.removeprefix(FOLDER_PREFIX)).expanduser())
    if name in SUITES:
        raise DataError(f"{name} is a corrupted test suite, not a task; "
                        f"load it with load_corrupted({name.removesuffix('-c')!r})")
    raise _unknown(name)


def _files(name: str, root: Path) -> list[Path]:
    """The files a data set loads from, for the in-process memo's change check."""
    if name == "digits":
        return [digits_path(root)]
    if name in PINNED:
        return pinned_files(PINNED[name], root)
    if name in DERIVED:
        return [DERIVED[name].path(root)]
    if name.startswith(FOLDER_PREFIX):
        return folder_files(Path(name.removeprefix(FOLDER_PREFIX)).expanduser())
    return []


def default_val_size(n_train: int) -> int:
    """10% of the training set, at most 5000 (so 5000 for MNIST's 60k, 150 for digits' 1497)."""
    return min(5000, round(n_train / 10))


def split_indices(n_train: int, val_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into the source's training set: one fixed permutation of seed, the
    first val_size for validation, the rest (already shuffled) for training."""
    if not 0 <= val_size < n_train:
        raise ValueError(f"val_size={val_size} must be in 0..{n_train - 1} (the training set has {n_train} images)")
    perm = np.random.default_rng(seed).permutation(n_train)
    return perm[val_size:], perm[:val_size]


def _pixel_stats(x: torch.Tensor) -> tuple[float, float]:
    """Mean and std of uint8 pixels in [0, 1] units, exact, from a 256-bin histogram (fast, and
    no float copy of a 650 MB training set)."""
    counts = torch.bincount(x.reshape(-1), minlength=256).double()  # (256,)
    v = torch.arange(256, dtype=torch.float64) / 255
    total = counts.sum()
    mean = (counts * v).sum() / total
    var = (counts * v * v).sum() / total - mean * mean
    return float(mean), float(var.clamp_min(0).sqrt())


def _refuse_empty_splits(name: str, n_train: int, n_test: int, size: int, val_size: int | None) -> None:
    """A DataError when a split would come out empty: its accuracy would read 0 rather than fail."""
    for split, n in (("training", n_train), ("test", n_test)):
        if n == 0:
            raise DataError(f"{name}: the {split} split is empty; a task needs at least one training and one "
                            f"test image")
    if size != 0:
        return  # a val_size too large for the training set is split_indices' ValueError
    if n_train < 2:
        raise DataError(f"{name} has {n_train} training image: too few to hold out a validation split; a task "
                        f"needs at least 2 (one to train on, one to validate)")
    pass_it = f"pass val_size between 1 and {n_train - 1} (`--val-size 1` on the command line)"
    if val_size is None:
        raise DataError(f"{name} has only {n_train} training images, too few for the default validation split "
                        f"(10%, which rounds to 0): add training images, or {pass_it}")
    raise DataError(f"val_size=0 leaves {name}'s validation split empty, so its accuracy would read 0; {pass_it}")


# (name, root, val_size, seed) -> (file signature, TaskData). A few entries: the largest task is
# ~700 MB, and loading it again from disk takes ~2 s.
_MEMO: OrderedDict[tuple, tuple[tuple, TaskData]] = OrderedDict()
_MEMO_SIZE = 3


def load_task(name: str, data_dir: str | os.PathLike | None = None, val_size: int | None = None,
              seed: int = 0) -> TaskData:
    """A task as uint8 train / val / test splits. Validation is held out of the source's training
    set by a fixed permutation of `seed` (which affects nothing else); train comes out shuffled by
    the same permutation, test in source order. Sources that are cheap to get are fetched on first
    use and derived tasks generated; a corrupt cache raises DataError naming the fix, and so does an
    empty training or test split, or a validation split that would come out empty (val_size=0, or too
    few training images for the default): an empty split would report an accuracy of 0.

    Repeated calls in one process return the same TaskData (from memory, while its files are
    unchanged): treat its tensors as read-only."""
    root = data_root(data_dir)
    key = (name, str(root), val_size, seed)
    files = _files(name, root)
    hit = _MEMO.get(key)
    if hit is not None and None not in hit[0] and hit[0] == signature(files):
        _MEMO.move_to_end(key)
        return hit[1]

    arrays = load_arrays(name, root)
    n = len(arrays.y_train)
    size = default_val_size(n) if val_size is None else val_size
    _refuse_empty_splits(name, n, len(arrays.y_test), size, val_size)
    train_idx, val_idx = split_indices(n, size, seed)

    def take(x: np.ndarray, y: np.ndarray, idx: np.ndarray | None) -> Split:
        if idx is not None:
            x, y = np.take(x, idx, axis=0), np.take(y, idx, axis=0)
        return Split(torch.from_numpy(x), torch.from_numpy(y))

    train = take(arrays.x_train, arrays.y_train, train_idx)
    mean, std = _pixel_stats(train.x)
    task = TaskData(name=name, train=train, val=take(arrays.x_train, arrays.y_train, val_idx),
                    test=take(arrays.x_test, arrays.y_test, None), num_classes=arrays.num_classes,
                    mean=mean, std=std)
    _MEMO[key] = (signature(_files(name, root)), task)
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return task


def task_slug(name: str) -> str:
    """A task's name as one file-name part: a registered name as it is; a `folder:` task as
    folder-<last part>-<8 hex of its path>, so that two folders of the same name stay apart and no
    path separator or colon reaches a file name."""
    if not name.startswith(FOLDER_PREFIX):
        return re.sub(r"[^A-Za-z0-9._-]", "-", name)
    path = name.removeprefix(FOLDER_PREFIX)
    tail = re.sub(r"[^A-Za-z0-9._-]", "-", Path(path).expanduser().name or "root")[:40]
    return f"folder-{tail}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def format_dataset_table(infos: list[DatasetInfo]) -> str:
    """The table `frugal data list` prints: one line per data set, its source on the line below."""
    rows = [("name", "kind", "shape", "classes", "cached", "description")]
    rows += [(i.name, i.kind, "x".join(map(str, i.image_shape)), str(i.num_classes),
              "yes" if i.cached else "no", i.description) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    indent = sum(widths) + 2 * 5

    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2]),
                 r[3].rjust(widths[3]), r[4].ljust(widths[4]), r[5]]
        return "  ".join(cells).rstrip()

    out = [line(rows[0])]
    for r, info in zip(rows[1:], infos):
        out.append(line(r))
        out.append(" " * indent + f"from: {info.source}")
    return "\n".join(out)
