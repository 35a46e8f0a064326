"""Hostile and broken `.frugal` model files, each built here, and crafted range-coder streams.

What frugal promises about a model file it is handed: reading it costs what its model costs and no
more (under 2 s and 200 MB for any crafted file), every fault is a `ModelFileError` naming what is
wrong (exit status 2 from `frugal eval`, with the file named), and nothing half-read is returned.
The issue's cases: a 135-byte resnet of 20,000 blocks (170 s, 2.2 GB before), lenet300 at
1000x1000 (1.15 GB) and 3000x3000 (10.8 GB asked for), meta of the wrong types, a deeply nested
header; and `decode_symbols` inputs that aborted the interpreter or asked for 64 GiB.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
import torch
import zstandard

from frugal.cli import main
from frugal.coding.codecs import Uniform
from frugal.compress.container import MAGIC, MAX_PARAMS, ModelFileError, decode_model, encode_model
from frugal.coding.entropy import decode_symbols, read_varint, write_varint, zigzag
from frugal.models import create_model

SMALL = {"name": "lenet300", "in_channels": 1, "image_size": [8, 8], "num_classes": 10, "kw": {}}


def craft(spec=None, meta=None, tensors=None, payloads=b"", header_text=None, version=2) -> bytes:
    """A model file around any header, with a valid checksum: only the reader's checks can refuse it."""
    text = header_text if header_text is not None else json.dumps(
        {"spec": spec, "meta": {} if meta is None else meta, "tensors": tensors or []}, separators=(",", ":"))
    z = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(text.encode())
    out = bytearray(MAGIC)
    out.append(version)
    write_varint(out, len(z))
    body = bytes(out + z) + payloads
    return body + struct.pack("<I", zlib.crc32(body))


def real_file(meta=None) -> tuple[bytes, dict, list]:
    """A valid lenet300 file at 8x8 (uniform-coded weights), its header, and its payloads split by tensor."""
    torch.manual_seed(0)
    model = create_model("lenet300", in_channels=1, image_size=(8, 8), num_classes=10)
    data = encode_model(model, SMALL, {k: Uniform(0.02) for k, v in model.state_dict().items() if v.dim() == 2},
                        meta=meta or {"task": "digits", "test_acc": 0.5})
    n, pos = read_varint(data, 5)
    header = json.loads(zstandard.ZstdDecompressor().decompress(data[pos:pos + n], max_output_size=1 << 20))
    return data, header, data[pos + n:-4]


def with_header(edit) -> bytes:
    """The real file with its header edited by `edit(header)` and the checksum made valid again."""
    _, header, payloads = real_file()
    edit(header)
    return craft(header_text=json.dumps(header), payloads=payloads)


def _entry(i, value):
    def edit(h):
        h["tensors"][0][i] = value
    return edit


CRAFTED = {  # name: (bytes, what the error must say)
    "resnet of 20,000 blocks": (craft({"name": "resnet", "in_channels": 1, "image_size": [28, 28], "num_classes": 10,
                                       "kw": {"width": 1, "blocks": 20000}}), "refused before it is built"),
    "lenet300 at 1000x1000": (craft({"name": "lenet300", "in_channels": 1, "image_size": [1000, 1000],
                                     "num_classes": 10}), "--max-params"),
    "lenet300 at 3000x3000": (craft({"name": "lenet300", "in_channels": 1, "image_size": [3000, 3000],
                                     "num_classes": 10}), "--max-params"),
    "meta not an object": (craft(SMALL, meta=[1, 2]), "meta is a list, not an object"),
    "meta.task not a string": (craft(SMALL, meta={"task": 7}), "meta.task is a number, not a task name"),
    "meta.test_acc not a number": (craft(SMALL, meta={"task": "digits", "test_acc": "0.9"}), "meta.test_acc"),
    "header nested 100,000 deep": (craft(header_text="[" * 100_000 + "]" * 100_000), "nests its JSON"),
    "header nested 500 deep": (craft(header_text="[" * 500 + "]" * 500), "nests its JSON more than"),
    "spec nested in kw": (craft(header_text=json.dumps({"spec": {**SMALL, "kw": {"width": "X"}}, "meta": {},
                                                        "tensors": []}).replace('"X"', "[" * 200 + "]" * 200)),
                          "nests its JSON more than"),
    "50,000 declared tensors": (craft(SMALL, tensors=[["raw", 0]] * 50_000), "more than the 10,000"),
    "a million declared tensors": (craft(SMALL, tensors=[["raw", 0]] * 1_000_000), "does not decompress"),
    "a tensor claiming 2**62 bytes": (with_header(_entry(1, 1 << 62)), "do not fill"),
    "a wrong codec name, valid checksum": (with_header(_entry(0, "jpeg")), "unknown codec 'jpeg'"),
    "a truncated file": (real_file()[0][:-100], "checksum mismatch"),
    "a truncated file, checksum fixed": (craft(header_text=json.dumps(real_file()[1]), payloads=real_file()[2][:-100]),
                                         "do not fill"),
    "a zstd frame that claims 2**40 bytes": (None, "claims 1,099,511,627,776 bytes"),  # built below
}


def _claims_huge() -> bytes:
    data, header, payloads = real_file()
    z = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(json.dumps(header).encode())
    desc = z[4]  # frame header descriptor; rewrite its content-size field as 8 bytes (RFC 8878 3.1.1.1)
    at = 5 + (0 if desc >> 5 & 1 else 1) + (0, 1, 2, 4)[desc & 3]
    size_len = (1 if desc >> 5 & 1 else 0, 2, 4, 8)[desc >> 6]
    frame = z[:4] + bytes([desc | 0xC0]) + z[5:at] + struct.pack("<Q", 1 << 40) + z[at + size_len:]
    out = bytearray(MAGIC + b"\x02")
    write_varint(out, len(frame))
    body = bytes(out + frame) + payloads
    return body + struct.pack("<I", zlib.crc32(body))


CRAFTED["a zstd frame that claims 2**40 bytes"] = (_claims_huge(), CRAFTED["a zstd frame that claims 2**40 bytes"][1])


def test_the_real_file_behind_the_crafted_ones_decodes():
    # so that what the crafted files lack is only what each one changes
    data, header, payloads = real_file()
    model, h = decode_model(data)
    assert h["meta"] == {"task": "digits", "test_acc": 0.5}
    same, _ = decode_model(craft(header_text=json.dumps(header), payloads=payloads))
    for k, v in model.state_dict().items():
        assert torch.equal(v, same.state_dict()[k])


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_file_is_refused_fast_with_what_is_wrong(case):
    data, says = CRAFTED[case]
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError, match=_escape(says)):
        decode_model(data)
    assert time.perf_counter() - t0 < 2.0


def _escape(s: str) -> str:
    import re
    return re.escape(s)


def test_the_size_bound_can_be_raised_for_a_trusted_file():
    torch.manual_seed(0)
    model = create_model("lenet300", in_channels=1, image_size=(8, 8), num_classes=10)
    data = encode_model(model, SMALL)
    n = sum(p.numel() for p in model.parameters())  # 50,610
    with pytest.raises(ModelFileError, match=r"more than 50,000 tensor entries.*--max-params N.*max_params=N"):
        decode_model(data, max_params=50_000)
    decoded, _ = decode_model(data, max_params=n)
    assert all(torch.equal(v, decoded.state_dict()[k]) for k, v in model.state_dict().items())
    assert MAX_PARAMS == 8_000_000  # what `frugal eval` takes without --max-params


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from frugal.compress.container import ModelFileError, decode_model

    def peak_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    decode_model(open(sys.argv[1], "rb").read())  # warm: imports, the allocator, a first build
    out = {}
    for case, path in json.loads(sys.argv[2]).items():
        data = open(path, "rb").read()
        open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from now
        base, t0 = peak_kb(), time.perf_counter()
        try:
            if case == "control: 300 MB touched":
                held = bytearray(300 << 20)  # proves the meter sees what a case allocates
                what = "allocated"
            else:
                decode_model(data)
                what = "decoded"
        except ModelFileError:
            what = "refused"
        out[case] = dict(outcome=what, seconds=time.perf_counter() - t0, extra_mb=(peak_kb() - base) / 1024)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-memory reset")
def test_crafted_files_cost_under_2_s_and_200_mb_each(tmp_path):
    files = {}
    for i, (case, (data, _)) in enumerate(sorted(CRAFTED.items())):
        (tmp_path / f"{i}.frugal").write_bytes(data)
        files[case] = str(tmp_path / f"{i}.frugal")
    files["control: 300 MB touched"] = files[case]
    (tmp_path / "real.frugal").write_bytes(real_file()[0])
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "real.frugal"), json.dumps(files)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    control = results.pop("control: 300 MB touched")
    assert control["extra_mb"] > 250, control
    assert set(results) == set(CRAFTED)
    for case, r in results.items():
        assert r["outcome"] == "refused", case
        assert r["seconds"] < 2.0 and r["extra_mb"] < 200, (case, r)


@pytest.mark.parametrize("case", ["resnet of 20,000 blocks", "lenet300 at 3000x3000", "meta not an object",
                                  "meta.task not a string", "header nested 100,000 deep",
                                  "a wrong codec name, valid checksum"])
def test_frugal_eval_names_the_file_and_exits_2(case, tmp_path, capsys):
    path = tmp_path / "shared.frugal"
    path.write_bytes(CRAFTED[case][0])
    assert main(["eval", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("frugal eval: error: ") and str(path) in err and "Traceback" not in err


def test_frugal_eval_refuses_a_task_whose_images_do_not_fit_the_model(tmp_path, capsys):
    torch.manual_seed(0)
    spec = {**SMALL, "image_size": [16, 16]}
    model = create_model("lenet300", in_channels=1, image_size=(16, 16), num_classes=10)
    path = tmp_path / "m.frugal"
    path.write_bytes(encode_model(model, spec, meta={"task": "digits"}))  # digits is 1x8x8
    assert main(["eval", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "1x16x16 images" in err and "'digits' has 1x8x8 images" in err
    assert main(["eval", str(path), "--max-params", "0"]) == 2
    assert "--max-params must be a positive" in capsys.readouterr().err


def test_frugal_eval_max_params_lets_a_trusted_larger_file_in(tmp_path, capsys):
    data, _, _ = real_file()
    path = tmp_path / "m.frugal"
    path.write_bytes(data)
    assert main(["eval", str(path), "--device", "cpu", "--max-params", "1000"]) == 2
    assert "--max-params N" in capsys.readouterr().err
    assert main(["eval", str(path), "--device", "cpu", "--max-params", "60000"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "digits"


def test_compress_names_an_output_it_cannot_write_and_the_codec_flag(tmp_path, capsys, monkeypatch):
    # -o is checked before the run is read: no run is needed to see these errors
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "sub" / "m.frugal"
    assert main(["compress", str(tmp_path / "no-run"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write -o {out}" in err and "is a file, not a folder" in err and ".tmp" not in err
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    assert main(["compress", str(tmp_path / "no-run"), "-o", str(locked / "m.frugal")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write -o {locked / 'm.frugal'}" in err and "not writable" in err and "-o a path" in err
    monkeypatch.undo()
    assert main(["compress", str(tmp_path / "no-run"), "-o", str(tmp_path / "m.frugal"),
                 "--codec", '{"codec": "jpeg"}']) == 2
    assert "--codec: unknown codec 'jpeg'" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "no-run"), "-o", str(tmp_path / "m.frugal"),
                 "--other-codec", '{"codec": "uniform"']) == 2
    assert "--other-codec must be a JSON object" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "no-run"), "-o", str(tmp_path / "m.frugal"),
                 "--codec", '{"codec": "uniform", "step": "big"}']) == 2
    assert "--codec: bad parameters for codec 'uniform'" in capsys.readouterr().err


# --- decode_symbols without `expected`: crafted streams -------------------------------------------


def stream(n, counts, n_words=None, lo=0) -> bytes:
    out = bytearray()
    write_varint(out, n)
    write_varint(out, zigzag(lo))
    write_varint(out, len(counts))
    for c in counts:
        write_varint(out, c)
    if n_words is not None:
        write_varint(out, n_words)
    return bytes(out)


STREAMS = {  # name: (bytes, what the error must say)
    # 12 bytes: 2**28 - 1 symbols of one value in a 2-symbol alphabet, no words: before, the range
    # coder was asked for all of them; at 2**40 symbols it aborted the interpreter (16 bytes here)
    "12 bytes, 2**28 - 1 symbols from no words": (stream((1 << 28) - 1, [(1 << 28) - 1, 0], 0), "no symbol at an end"),
    "16 bytes, 2**40 symbols": (stream(1 << 40, [1 << 40, 0], 0), "more than the 268435456"),
    # 13 bytes: one value repeated 2**33 times (np.full of 64 GiB before)
    "13 bytes, 2**33 copies of one value": (stream(1 << 33, [1 << 33], lo=-100), "more than the 268435456"),
    "an empty payload for a million symbols": (stream(1 << 20, [1 << 19, 1 << 19], 0), "0 words cannot hold"),
    "an empty payload for 5 symbols": (stream(5, [2, 3], 0), "0 words cannot hold"),
    "one word for 2**27 even symbols": (stream(1 << 27, [1 << 26, 1 << 26], 1) + b"\1\2\3\4", "1 words cannot hold"),
    "a value range past 64 bits": (stream(2, [1, 1], 1, lo=(1 << 63) - 1) + b"\0" * 4, "do not fit 64 bits"),
}


def test_the_crafted_streams_are_well_formed():
    for name, (data, _) in STREAMS.items():  # the lengths the issue gives
        if name[0].isdigit():
            assert len(data) == int(name.split()[0]), name


STREAM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from frugal.coding.entropy import CodecError, decode_symbols

    def peak_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    out = {}
    for name, hexdata in json.loads(sys.argv[1]).items():
        open("/proc/self/clear_refs", "w").write("5")
        base, t0 = peak_kb(), time.perf_counter()
        try:
            decode_symbols(bytes.fromhex(hexdata))
            what = "decoded"
        except CodecError as e:
            what = str(e)
        out[name] = dict(outcome=what, seconds=time.perf_counter() - t0, extra_mb=(peak_kb() - base) / 1024)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-memory reset")
def test_crafted_streams_are_refused_before_anything_is_allocated():
    # in a child process: an input that aborts the interpreter must not take the test run with it
    out = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, json.dumps({k: v[0].hex() for k, v in STREAMS.items()})],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    for name, r in json.loads(out.stdout).items():
        assert STREAMS[name][1] in r["outcome"], (name, r)
        assert r["seconds"] < 0.5 and r["extra_mb"] < 20, (name, r)


def test_an_empty_stream_is_zero_symbols_and_reads_one_byte():
    out, end = decode_symbols(b"\x00" + b"rest")
    assert out.size == 0 and end == 1
    assert np.array_equal(decode_symbols(stream(3, [3], lo=-2))[0], [-2, -2, -2])  # one value: no words needed


def test_the_fuzz_benchmark_finds_no_crash_and_no_case_over_its_bounds(capsys):
    from frugal.benchmarks.fuzz_model_file import main as fuzz

    out = fuzz(["--cases", "300", "--seed", "3"])
    capsys.readouterr()
    assert sum(out["outcomes"].values()) == 300
    assert not [k for k in out["outcomes"] if k.startswith("other-exception")], out["other_exception_examples"]
    assert out["unnamed_errors"] == {}  # every refusal came from a check that names the fault
    assert out["outcomes"]["ModelFileError"] > 200 and out["outcomes"].get("identical", 0) > 0
    assert out["cases_over_2_s"] == 0 and out["cases_over_200_mb"] == 0
    for kind, counts in out["by_kind"].items():  # a file whose checksum was not recomputed is always refused
        if kind.endswith("-stale"):
            assert set(counts) == {"ModelFileError"}, (kind, counts)
