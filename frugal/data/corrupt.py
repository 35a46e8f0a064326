"""Corrupted test suites in the layout of MNIST-C (Mu & Gilmer, 2019, "MNIST-C: A Robustness
Benchmark for Computer Vision"): <suite>/<corruption>-s<severity>/test_images.npy, (N, H, W, 1)
uint8, beside test_labels.npy, (N,) int64.

Noise, blur, weather and digital corruptions come from the optional package imagecorruptions
(Hendrycks & Dietterich, 2019, the ImageNet-C code; `pip install 'frugal[corrupt]'`). The affine
ones and stripe, which MNIST-C has and that package lacks, are written here with numpy and scipy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from frugal.data.bounded import read_npy
from frugal.data.cache import check_replaceable, data_root, replace_dir
from frugal.data.errors import DataError
from frugal.data.sources import FASHION_MNIST, FOLDER_PREFIX, MNIST, PinnedSource, folder_files, to_nchw
from frugal.data.types import Split
from frugal.utils import atomic_write_json

log = logging.getLogger(__name__)

SUITE_VERSION = 1  # bump whenever a corruption would produce different images for the same seed
SEVERITIES = (1, 2, 3, 4, 5)

# Seconds for 10k test images x 5 severities on one core of a shared 2-core machine, measured:
# gaussian/shot/impulse noise 7-10 each (run on mosaics, see _library), defocus_blur 27, fog 52,
# brightness 55, contrast 12, pixelate 7, jpeg_compression 13; the hand-written ones 0.4-4.5 each.
# About 3.5 minutes per suite.
LIBRARY_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "fog",
                       "brightness", "contrast", "pixelate", "jpeg_compression")
HAND_CORRUPTIONS = ("rotate", "shear", "scale", "translate", "stripe")
CORRUPTIONS = LIBRARY_CORRUPTIONS + HAND_CORRUPTIONS  # the default suite
# Built only when asked for by name: motion_blur 82 s, elastic_transform 62 s (measured alike).
# Left out entirely: glass_blur (~18 min), zoom_blur (~3 min); snow, frost, spatter and saturate
# are made for colour photos.
SLOW_CORRUPTIONS = ("motion_blur", "elastic_transform")
_ALL = CORRUPTIONS + SLOW_CORRUPTIONS

# These act on each pixel independently of its neighbours and of the rest of the image, so one
# call on a mosaic of many images gives the same distribution as one call per image, ~100x faster.
_POINTWISE = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "brightness"})
_MIN_SIDE = 32  # imagecorruptions refuses smaller images

# task -> the source whose test split it corrupts
SUITES: dict[str, PinnedSource] = {"mnist-c": MNIST, "fashion-mnist-c": FASHION_MNIST}


def library_available() -> bool:
    try:
        import imagecorruptions  # noqa: F401
    except ImportError:
        return False
    return True


# --- the hand-written corruptions -----------------------------------------------------------------
# Each: (N, H, W) uint8, severity 1..5, rng -> (N, H, W) uint8. Per-image randomness (sign,
# direction, position) comes from rng; the magnitude is fixed by severity so it grows with it.

_ROTATE_DEG = (10, 20, 30, 40, 50)
_SHEAR = (0.1, 0.2, 0.3, 0.4, 0.5)  # column offset per row from the centre
_SCALE = (0.1, 0.2, 0.3, 0.4, 0.5)  # zoom by 1 + a or 1 / (1 + a), picked per image
_TRANSLATE_PX = (2, 3, 4, 5, 6)  # shift length, in a random direction
_STRIPE_PX = (2, 4, 6, 8, 10)  # width of the inverted band


def _warp(images: np.ndarray, inv: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Bilinear affine warp about the image centre: output pixel p samples the input at
    inv[i] @ (p - centre) + centre + offset[i]; outside the image reads as 0 (background)."""
    from scipy import ndimage  # here, not at the top: it adds 0.4 s to importing frugal.data

    n, h, w = images.shape
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    rows, cols = np.meshgrid(np.arange(h) - centre[0], np.arange(w) - centre[1], indexing="ij")
    grid = np.stack([rows, cols])  # (2, H, W), relative to the centre
    out = np.empty_like(images)
    for s in range(0, n, 2048):  # chunks bound the float64 coordinate arrays to ~40 MB
        e = min(n, s + 2048)
        src = np.einsum("nij,jhw->nihw", inv[s:e], grid) + (centre + offset[s:e])[:, :, None, None]  # (b, 2, H, W)
        idx = np.broadcast_to(np.arange(e - s, dtype=np.float64)[:, None, None], (e - s, h, w))  # (b, H, W)
        # order=1 in a 3-D stack with integer image indices is exactly bilinear within each image
        coords = np.stack([idx, src[:, 0], src[:, 1]])  # (3, b, H, W)
        warped = ndimage.map_coordinates(images[s:e].astype(np.float32), coords, order=1, mode="constant", cval=0.0)
        out[s:e] = np.clip(np.rint(warped), 0, 255)
    return out


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), n)


def rotate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    theta = np.deg2rad(_ROTATE_DEG[severity - 1]) * _signs(rng, len(images))
    cos, sin = np.cos(theta), np.sin(theta)
    # (N, 2, 2) rotations; their direction does not matter, as the sign of theta is random
    inv = np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1)
    return _warp(images, inv, np.zeros((len(images), 2)))


def shear(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    k = _SHEAR[severity - 1] * _signs(rng, len(images))
    inv = np.zeros((len(images), 2, 2))
    inv[:, 0, 0] = inv[:, 1, 1] = 1.0
    inv[:, 1, 0] = -k  # the forward map adds k * row to the column; its inverse subtracts it
    return _warp(images, inv, np.zeros((len(images), 2)))


def scale(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    zoom = (1 + _SCALE[severity - 1]) ** _signs(rng, len(images))
    inv = np.eye(2)[None] / zoom[:, None, None]  # (N, 2, 2)
    return _warp(images, inv, np.zeros((len(images), 2)))


def translate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi, len(images))
    # whole pixels, so the shifted digit stays as sharp as the original
    shift = np.rint(_TRANSLATE_PX[severity - 1] * np.stack([np.sin(angle), np.cos(angle)], 1))  # (N, 2)
    inv = np.broadcast_to(np.eye(2), (len(images), 2, 2))
    return _warp(images, inv, -shift)


def stripe(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Invert a vertical or horizontal band through the middle of the image."""
    n, h, w = images.shape
    width = _STRIPE_PX[severity - 1]
    vertical = rng.random(n) < 0.5
    side = np.where(vertical, w, h)
    start = (side - width) // 2 + rng.integers(-3, 4, n)  # near the middle, where the strokes are
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    pos = np.where(vertical[:, None, None], cols, rows)  # (N, H, W): coordinate across the band
    band = (pos >= start[:, None, None]) & (pos < start[:, None, None] + width)
    return np.where(band, 255 - images, images).astype(np.uint8)


_HAND: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "rotate": rotate, "shear": shear, "scale": scale, "translate": translate, "stripe": stripe}


# --- the library corruptions ----------------------------------------------------------------------

def _library(name: str, images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Run imagecorruptions on gray images: pad to >= 32x32, corrupt (the package replicates gray
    to RGB), keep channel 0, crop back. Channel 0 rather than the mean keeps per-channel noise at
    its nominal strength instead of averaging three draws down by sqrt(3)."""
    from imagecorruptions import corrupt

    n, h, w = images.shape
    ph, pw = max(0, _MIN_SIDE - h), max(0, _MIN_SIDE - w)
    top, left = ph // 2, pw // 2
    padded = np.pad(images, ((0, 0), (top, ph - top), (left, pw - left)))  # (N, H', W')
    hp, wp = padded.shape[1:]
    out = np.empty_like(padded)
    state = np.random.get_state()  # the package draws from numpy's global generator
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the package's dependencies warn about deprecations
            if name in _POINTWISE:
                g = 32  # tiles per mosaic side
                for s in range(0, n, g * g):
                    tiles = padded[s:s + g * g]
                    b = len(tiles)
                    rows = -(-b // g)
                    full = np.zeros((rows * g, hp, wp), np.uint8)
                    full[:b] = tiles
                    # (rows*g, H', W') -> (rows, g, H', W') -> (rows, H', g, W') -> (rows*H', g*W')
                    mosaic = full.reshape(rows, g, hp, wp).transpose(0, 2, 1, 3).reshape(rows * hp, g * wp)
                    seed = int(rng.integers(2**31))
                    np.random.seed(seed)
                    kw = {"seed": seed} if name == "impulse_noise" else {}  # it draws from its own generator
                    res = corrupt(mosaic, corruption_name=name, severity=severity, **kw)[:, :, 0]
                    # and back: (rows*H', g*W') -> (rows, H', g, W') -> (rows, g, H', W') -> (rows*g, H', W')
                    out[s:s + b] = res.reshape(rows, hp, g, wp).transpose(0, 2, 1, 3).reshape(rows * g, hp, wp)[:b]
            else:
                np.random.seed(int(rng.integers(2**31)))
                for i in range(n):
                    out[i] = corrupt(padded[i], corruption_name=name, severity=severity)[:, :, 0]
    finally:
        np.random.set_state(state)
    return out[:, top:top + h, left:left + w]


def corrupt_images(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """One corruption at one severity on gray images (N, H, W) uint8 -> (N, H, W) uint8.
    Deterministic in (seed, name, severity)."""
    if name not in _ALL:
        raise DataError(f"unknown corruption {name!r}; known: {', '.join(_ALL)}")
    if severity not in SEVERITIES:
        raise DataError(f"severity {severity} for {name} is outside 1..5")
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), severity])
    if name in _HAND:
        return _HAND[name](images, severity, rng)
    if not library_available():
        raise DataError(f"{name} needs the optional package imagecorruptions; "
                        f"run `pip install 'frugal[corrupt]'`")
    return _library(name, images, severity, rng)


# --- suites on disk -------------------------------------------------------------------------------

def _clean_test(task: str | Split, data_dir: str | os.PathLike | None, limit: int | None
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """(images (N, H, W), labels (N,), a label for the stamp) of what the suite corrupts."""
    if isinstance(task, Split):
        x, y, label = task.x.numpy(), task.y.numpy(), "<split>"
    else:
        from frugal.data.registry import load_arrays  # the registry imports this module

        arrays = load_arrays(task, data_dir)
        x, y, label = arrays.x_test, arrays.y_test, task
    if x.shape[1] != 1:
        raise DataError(f"corrupted suites are defined for gray images; {label} has {x.shape[1]} channels")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return np.ascontiguousarray(x[:, 0]), y.astype(np.int64), label  # (N, 1, H, W) -> (N, H, W)


def _resolve(corruptions: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(names to build, library names skipped because the package is absent)."""
    have = library_available()
    if corruptions is None:
        names = [c for c in CORRUPTIONS if have or c in _HAND]
        return names, [c for c in CORRUPTIONS if c not in names]
    names = list(dict.fromkeys(corruptions))
    unknown = [c for c in names if c not in _ALL]
    if unknown:
        raise DataError(f"unknown corruption {unknown[0]!r}; known: {', '.join(_ALL)}")
    if not have and any(c not in _HAND for c in names):
        raise DataError(f"{', '.join(c for c in names if c not in _HAND)} need the optional package "
                        f"imagecorruptions; run `pip install 'frugal[corrupt]'` or ask only for "
                        f"{', '.join(HAND_CORRUPTIONS)}")
    return names, []


def build_corrupted_suite(task: str | Split, out_dir: str | os.PathLike,
                          corruptions: Sequence[str] | None = None,
                          severities: Sequence[int] = SEVERITIES, limit: int | None = None,
                          data_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Corrupt a task's test split (or a given Split of gray images) into out_dir, MNIST-C style.

    corruptions=None builds every one of CORRUPTIONS available; without imagecorruptions installed
    that is the hand-written ones, with a warning naming the rest. SLOW_CORRUPTIONS are built only
    when named. limit keeps only the first n test images.
    The suite is built in a staging folder and swapped in whole, so out_dir is never half-built.
    out_dir must be new, empty, or a suite built here before (its suite.json, and nothing frugal did
    not write): a folder holding anything else, say the data folder itself, is refused with a
    DataError, never deleted.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, suite_foreign)  # before minutes of work; replace_dir checks again
    names, skipped = _resolve(corruptions)
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise DataError(f"severities must be among {SEVERITIES}, got {tuple(severities)}")
    if skipped:
        warnings.warn(f"skipped corruptions {', '.join(skipped)}: they need the optional package "
                      f"imagecorruptions; run `pip install 'frugal[corrupt]'`, then rebuild "
                      f"(e.g. `frugal data fetch mnist-c --force`)", stacklevel=2)
    images, labels, label = _clean_test(task, data_dir, limit)
    # a fresh name: mkdir fails rather than reuse (and later delete) a folder that was already there
    staging = out_dir.with_name(f".{out_dir.name}.staging-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir(parents=True)
    seconds = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            for s in severities:
                d = staging / f"{name}-s{s}"
                d.mkdir()
                np.save(d / "test_images.npy", corrupt_images(images, name, s, seed)[..., None])  # (N, H, W, 1)
                np.save(d / "test_labels.npy", labels)
            seconds[name] = round(time.perf_counter() - t0, 2)
            log.info("%s: %s x %d severities in %.1f s", label, name, len(severities), seconds[name])
        atomic_write_json(staging / "suite.json", {
            **suite_stamp(label, seed, limit, names, severities), "skipped": skipped, "seconds": seconds,
            "versions": _versions()})
        replace_dir(staging, out_dir, suite_foreign)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _versions() -> dict[str, str | None]:
    """The libraries whose behaviour the images depend on, for the record."""
    import scipy

    try:
        ic = importlib.metadata.version("imagecorruptions-imaug")
    except importlib.metadata.PackageNotFoundError:
        ic = None
    return {"imagecorruptions-imaug": ic, "numpy": np.__version__, "scipy": scipy.__version__}


def suite_stamp(task: str, seed: int, limit: int | None, names: Sequence[str],
                severities: Sequence[int]) -> dict:
    source = SUITES.get(f"{task}-c")
    return {"generator": "corrupted-suite", "version": SUITE_VERSION, "task": task, "seed": seed,
            "limit": limit, "source_md5": dict(source.md5) if source else None,
            "corruptions": list(names), "severities": list(severities)}


_SUITE_FILES = ("test_images.npy", "test_labels.npy")
_SUITE_STAMP_MAX = 1 << 20  # bytes; a suite.json is well under 10 kB


def _suite_stamp_at(path: Path) -> dict | None:
    """The suite.json that build_corrupted_suite writes, read bounded; None when `path` is absent or
    anything else."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _SUITE_STAMP_MAX:
            return None
        stamp = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("generator") == "corrupted-suite" else None


def suite_foreign(folder: Path) -> str | None:
    """The first thing in `folder` that build_corrupted_suite did not write, or None when it holds
    only a suite's own files: its suite.json stamp and <corruption>-s<severity>/ folders of
    test_images.npy and test_labels.npy. A folder without that stamp is never frugal's."""
    entries = sorted(folder.iterdir())
    for e in entries:
        if e.name == "suite.json":
            if _suite_stamp_at(e) is None:
                return "a suite.json that is not the stamp of a suite frugal built"
            continue
        m = _SEVERITY_SUFFIX.match(e.name)
        if e.is_symlink() or not e.is_dir() or m is None or m["name"] not in _ALL:
            return f"{e.name}{'/' if e.is_dir() else ''}"
        for f in sorted(e.iterdir()):
            if f.name not in _SUITE_FILES or f.is_symlink() or not f.is_file():
                return f"{e.name}/{f.name}"
    if entries and not any(e.name == "suite.json" for e in entries):
        return f"{entries[0].name} (and no suite.json: frugal did not build a suite here)"
    return None


def folder_suite_dir(folder: Path, root: Path) -> Path:
    """Where the corrupted suite of a folder: task lives: in frugal's cache (root), never in or
    beside the user's folder, one per folder (by its resolved path)."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return root / "folder-c" / f"{folder.resolve().name or 'root'}-{key}"


def suite_cached(name: str, root: Path) -> bool:
    return (root / name / "suite.json").is_file()


def fetch_suite(name: str, root: Path, force: bool = False) -> Path:
    """Build <root>/<name> (e.g. mnist-c) from its source's test split unless an up-to-date suite
    with every corruption available now is already there."""
    source = SUITES[name]
    out = root / name
    want_names, _ = _resolve(None)
    want = suite_stamp(source.name, 0, None, want_names, SEVERITIES)
    if not force:
        have = _suite_stamp_at(out / "suite.json")
        # up to date: same recipe, and at least every corruption that can be built here now
        if (isinstance(have, dict) and all(have.get(k) == v for k, v in want.items() if k != "corruptions")
                and set(want["corruptions"]) <= set(have.get("corruptions") or [])):
            return out
    log.info("building %s in %s (a few minutes, once)", name, out)
    return build_corrupted_suite(source.name, out, data_dir=root)


_SEVERITY_SUFFIX = re.compile(r"^(?P<name>.+)-s(?P<severity>[1-9][0-9]*)$")


def _order(key: str) -> tuple:
    m = _SEVERITY_SUFFIX.match(key)
    name, sev = (m["name"], int(m["severity"])) if m else (key, 0)
    return (_ALL.index(name) if name in _ALL else len(_ALL), name, sev)


def load_corrupted(task: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict[str, Split]:
    """A corrupted test suite as {"<corruption>-s<severity>": Split}.

    task: "mnist" or "mnist-c" (likewise fashion-mnist) for the suite in the cache, built on first
    use; or a folder in MNIST-C layout ("folder:/path", or a path), where sub-folders without an
    -s<severity> suffix, as in the released MNIST-C, keep their plain names as keys.
    A folder: task's data folder itself (one with data files and no suite in it) stands for its
    suite in the cache, folder_suite_dir(folder, root); when that is not built yet, the DataError
    gives the exact build_corrupted_suite call that builds it there.
    """
    text = os.fspath(task)
    if isinstance(task, os.PathLike) or text.startswith(FOLDER_PREFIX) or os.sep in text:
        folder = Path(text.removeprefix(FOLDER_PREFIX)).expanduser()
        fix = ("rebuild it with build_corrupted_suite(task, out_dir) into a new or empty folder "
               "(it refuses a folder that holds anything it did not write)")
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder; give a folder in MNIST-C layout "
                            f"(<corruption>[-s<severity>]/test_images.npy and test_labels.npy)")
        if not _suite_dirs(folder) and folder_files(folder):  # a folder: task's data, not a suite
            own = folder_suite_dir(folder, data_root(data_dir))
            call = (f"python -c \"from frugal.data import build_corrupted_suite; "
                    f"build_corrupted_suite({FOLDER_PREFIX + str(folder)!r}, {str(own)!r})\"")
            if not _suite_dirs(own):
                raise DataError(f"{folder} is a data folder, not a corrupted suite, and its suite is not built "
                                f"yet; build it once into frugal's cache (never into the data folder) with "
                                f"`{call}`, then measure again")
            folder, fix = own, f"rebuild it with `{call}`"
    else:
        name = text if text.endswith("-c") else f"{text}-c"
        if name not in SUITES:
            known = ", ".join(s.removesuffix("-c") for s in SUITES)
            raise DataError(f"no corrupted suite for {text!r}; known: {known}, or a folder:/path "
                            f"in MNIST-C layout")
        root = data_root(data_dir)
        folder = root / name
        fix = f"run `frugal data fetch {name} --force`"
        if not folder.exists():
            fetch_suite(name, root)
    out = {}
    for d in _suite_dirs(folder):
        xi, yi = d / "test_images.npy", d / "test_labels.npy"
        # bounded: each header is checked against its file's size before anything is read
        x, y = read_npy(xi, f"the suite is corrupt; {fix}"), read_npy(yi, f"the suite is corrupt; {fix}")
        x = to_nchw(x, str(xi))
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.shape[0] != x.shape[0]:
            raise DataError(f"{yi} must hold {x.shape[0]} integer labels, got {y.dtype} {y.shape}; {fix}")
        if len(y) == 0 or (y < 0).any():
            what = "no images (its accuracy would read 0)" if len(y) == 0 else f"a negative label ({y.min()})"
            raise DataError(f"{d} holds {what}; {fix}")
        out[d.name] = Split(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    if not out:
        raise DataError(f"{folder} holds no corrupted test sets (<corruption>[-s<severity>]/"
                        f"test_images.npy and test_labels.npy); {fix}")
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _suite_dirs(folder: Path) -> list[Path]:
    """The sub-folders of a suite folder that hold a corrupted test set (either of its two files)."""
    if not folder.is_dir():
        return []
    return [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and any((d / f).exists() for f in _SUITE_FILES)]
