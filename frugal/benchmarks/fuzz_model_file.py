"""Does any damaged or hostile `.frugal` file make `decode_model` crash, hang or exhaust memory?

Builds real model files in-process (lenet5 at 1x16x16, lenet300 at 1x8x8 and resnet of width 4 at
1x8x8, random initial weights, each written with every codec: raw, uniform, prune, structured,
kmeans, dct, units, and one mix), then decodes `--cases` mutants of them, each drawn from the seed:

- bytes: byte and bit flips, truncation, extension and splices of another file's bytes, each once
  with the file's CRC-32 left as it was (`-stale`: the checksum must refuse it) and once recomputed
  (`-crc`: the damage reaches the header and codec parsers);
- header: structural edits of the decompressed JSON header (spec values huge, negative, of the wrong
  type, unknown models and fields, deep nesting, huge lists; meta of the wrong types; tensor entries
  with other lengths, codec names and counts), recompressed and re-checksummed;
- payload: a tensor's leading codec parameters (its step, centroid count, cutoff, block code)
  overwritten, checksum recomputed.

Each case ends in one outcome: `ModelFileError` (refused with a message), `identical` (the model's
state dict is bitwise the original's and its spec and meta are the same), `different-model` (decoded
to another model: a file with a recomputed checksum is just another file, so a flip inside a
payload can decode to other finite weights), or `other-exception:<Type>` (a bug). A ModelFileError
that only the decoder's last-resort handler raised (a fault no check names) is counted apart under
`unnamed_errors`. Per case: wall time and extra memory (peak RSS above the RSS at its start, from
VmHWM after resetting it through /proc/self/clear_refs; elsewhere the process's peak, which only
grows). Prints JSON and, with --out, writes it.

    python -m frugal.benchmarks.fuzz_model_file --cases 10000 --seed 0 --out results/fuzz-model-file/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import sys
import time
import zlib
from collections import Counter

import torch
import zstandard

from frugal.benchmarks import add_where_args, where
from frugal.coding.codecs import DCT, KMeans, Prune, Raw, Structured, Uniform, Units
from frugal.compress.container import MAGIC, ModelFileError, decode_model, encode_model
from frugal.coding.entropy import read_varint, write_varint
from frugal.measure import weight_tensors
from frugal.models import create_model
from frugal.utils import atomic_write_json, versions

MODELS = {  # small, so that ten thousand decodes take minutes: the parsers do not care about size
    "lenet5": {"name": "lenet5", "in_channels": 1, "image_size": [16, 16], "num_classes": 10, "kw": {}},
    "lenet300": {"name": "lenet300", "in_channels": 1, "image_size": [8, 8], "num_classes": 10, "kw": {}},
    "resnet": {"name": "resnet", "in_channels": 1, "image_size": [8, 8], "num_classes": 10, "kw": {"width": 4}},
}
CODECS = {  # applied to every weight of 2 or more dimensions; 1-D tensors stay raw
    "raw": Raw(), "uniform": Uniform(0.02), "prune": Prune(0.7, 0.02), "structured": Structured(0.3, 0.2, 0.02),
    "kmeans": KMeans(8), "dct": DCT(0.02, 3), "units": Units(Prune(0.8, 0.02)),
}
SLOW_S, BIG_MB = 2.0, 200.0  # a case over either is a failure of the reader's bounds


class Base:
    """One real file, its parts, and what it decodes to."""

    def __init__(self, label: str, data: bytes):
        self.label, self.data = label, data
        n, pos = read_varint(data, 5)
        self.header = json.loads(zstandard.ZstdDecompressor().decompress(data[pos:pos + n], max_output_size=1 << 24))
        self.payloads = data[pos + n:-4]
        self.starts = []  # where each tensor's payload begins, relative to the payloads
        at = 0
        for _, length in self.header["tensors"]:
            self.starts.append(at)
            at += length
        model, header = decode_model(data)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.spec, self.meta = header["spec"], header["meta"]


def build_bases() -> list[Base]:
    bases = []
    for mname, spec in MODELS.items():
        torch.manual_seed(0)
        model = create_model(spec["name"], in_channels=spec["in_channels"], image_size=tuple(spec["image_size"]),
                             num_classes=spec["num_classes"], **spec["kw"])
        tensors = weight_tensors(model)
        big = sorted(k for k, t in tensors.items() if t.dim() >= 2)
        meta = {"task": "digits", "test_acc": 0.5}
        for cname, codec in CODECS.items():
            bases.append(Base(f"{mname}/{cname}", encode_model(model, spec, {k: codec for k in big}, meta)))
        mix = [CODECS[c] for c in ("uniform", "kmeans", "dct", "structured", "units", "prune")]
        bases.append(Base(f"{mname}/mix", encode_model(model, spec, {k: mix[i % len(mix)] for i, k in enumerate(big)},
                                                       meta)))
    return bases


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def assemble(header_json: bytes, payloads: bytes, version: int = 2) -> bytes:
    z = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(header_json)
    out = bytearray(MAGIC)
    out.append(version)
    write_varint(out, len(z))
    return with_crc(bytes(out + z) + payloads)


def nested(depth: int) -> str:
    """JSON text nested `depth` deep (built as text: json.dumps would recurse as deep)."""
    return "[" * depth + "0" + "]" * depth


# ---------------------------------------------------------------------------------------------------
# mutations: each takes (rng, base, bases) and returns the mutant's bytes


def _body_edit(rng: random.Random, base: Base, bases: list[Base], how: str) -> bytes:
    b = bytearray(base.data[:-4])
    i = rng.randrange(len(b))
    if how == "byte-flip":
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(len(b))
            b[j] = (b[j] + rng.randrange(1, 256)) % 256
    elif how == "bit-flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del b[rng.randrange(len(b)):]
    elif how == "extend":
        b += bytes(rng.randrange(256) for _ in range(rng.choice((1, 3, 16, 1000))))
    elif how == "splice":  # a run of bytes from another file (or this one) over or into this one
        other = rng.choice(bases).data
        j = rng.randrange(len(other))
        chunk = other[j:j + rng.randint(1, 256)]
        if rng.random() < 0.5:
            b[i:i + len(chunk)] = chunk
        else:
            b[i:i] = chunk
    return bytes(b)


def body_mutation(how: str, fix_crc: bool):
    def mutate(rng: random.Random, base: Base, bases: list[Base]) -> bytes:
        body = _body_edit(rng, base, bases, how)
        return with_crc(body) if fix_crc else body + base.data[-4:]
    return mutate


HUGE_INTS = [-1, 0, -(1 << 40), 1 << 16, 1 << 20, 1 << 31, 1 << 63, 1 << 70, 10 ** 30, 3000, 100_000]
ODD_VALUES = ["x", "", 1.5, -0.0, None, True, False, [], {}, [1, 2], {"a": 1}, "1e999"]


def _spec_edit(rng: random.Random, spec: dict) -> tuple[dict, str | None]:
    """(spec, raw JSON text to put in place of the string "__RAW__", if any)."""
    spec = json.loads(json.dumps(spec))
    kind = rng.choice(("value", "type", "name", "keys", "kw", "deep", "list"))
    raw = None
    if kind == "value":
        key = rng.choice(("in_channels", "num_classes", "image_size"))
        if key == "image_size":
            spec[key] = [rng.choice(HUGE_INTS + [8, 16, 1000]), rng.choice(HUGE_INTS + [8, 16, 1000])]
        else:
            spec[key] = rng.choice(HUGE_INTS + [3, 100])
    elif kind == "type":
        spec[rng.choice(("name", "in_channels", "num_classes", "image_size", "kw"))] = rng.choice(ODD_VALUES)
    elif kind == "name":
        spec["name"] = rng.choice(("lenet6", "", "resnet", "lenet5", "lenet300", "convnet", "saccadic", "ram",
                                   "constrained", "convae", "blockcnn", "genes_lenet5", "../x", "a" * 10_000))
    elif kind == "keys":
        if rng.random() < 0.5:
            spec.pop(rng.choice(list(spec)), None)
        else:
            spec[rng.choice(("extra", "__class__", "device"))] = 1
    elif kind == "kw":
        key = rng.choice(("width", "blocks", "depth", "hidden", "nope", "kernel_size"))
        spec["kw"] = {**spec.get("kw", {}), key: rng.choice(HUGE_INTS + ODD_VALUES + [20_000, 2, 64])}
    elif kind == "deep":
        spec["kw"] = {"width": "__RAW__"}
        raw = nested(rng.choice((5, 50, 1000, 100_000)))
    else:
        spec["kw"] = {"width": "__RAW__"}
        raw = "[" + ",".join(["1"] * rng.choice((1000, 100_000, 400_000))) + "]"
    return spec, raw


def header_mutation(what: str):
    def mutate(rng: random.Random, base: Base, bases: list[Base]) -> bytes:
        h = json.loads(json.dumps(base.header))
        raw = None
        payloads = base.payloads
        if what == "spec":
            h["spec"], raw = _spec_edit(rng, h["spec"])
        elif what == "meta":
            choice = rng.random()
            if choice < 0.4:
                h["meta"] = rng.choice(ODD_VALUES + [1, "digits"])
            elif choice < 0.7:
                h["meta"]["task"] = rng.choice(ODD_VALUES + [7, "mnist", "nope"])
            else:
                h["meta"]["test_acc"] = rng.choice(ODD_VALUES + [float("nan"), float("inf"), 1e308, 2, -1])
        elif what == "entry-length":
            e = rng.choice(h["tensors"])
            e[1] = rng.choice((e[1] + 1, e[1] - 1, 0, -1, 1 << 62, 10 ** 30, 1.5, "3", None))
        elif what == "entry-codec":
            e = rng.choice(h["tensors"])
            e[0] = rng.choice(("uniform", "prune", "kmeans", "dct", "structured", "units", "raw", "jpeg", "",
                               7, None, ["raw"]))
        elif what == "entry-count":
            choice = rng.random()
            if choice < 0.3:
                h["tensors"].pop(rng.randrange(len(h["tensors"])))
            elif choice < 0.5:
                h["tensors"].append(["raw", 0])
            elif choice < 0.7:
                rng.shuffle(h["tensors"])
            else:
                h["tensors"] = [["raw", 0]] * rng.choice((10_001, 50_000, 200_000))
        elif what == "header-shape":
            choice = rng.random()
            if choice < 0.5:
                h.pop(rng.choice(("spec", "meta", "tensors")))
            else:
                h = rng.choice(([h], "x", 1, None, {"spec": h["spec"]}))
        elif what == "header-deep":
            h = "__RAW__"
            raw = nested(rng.choice((17, 100, 1000, 5000, 200_000)))
        elif what == "version":
            return assemble(json.dumps(h).encode(), payloads, version=rng.choice((0, 1, 3, 255)))
        elif what == "header-length":
            body = bytearray(base.data[:-4])
            n, pos = read_varint(body, 5)
            lenbytes = bytearray()
            write_varint(lenbytes, max(0, rng.choice((n - 1, n + 1, 0, 1 << 40, n * 2))))
            body[5:pos] = lenbytes
            return with_crc(bytes(body))
        elif what == "zstd-size":  # a frame that states another decompressed size than it holds
            z = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(json.dumps(h).encode())
            return assemble_raw(z, payloads, rng.choice((1 << 40, (1 << 20) + 1, 1 << 19, 10)))
        text = json.dumps(h, separators=(",", ":"))
        if raw is not None:
            text = text.replace('"__RAW__"', raw, 1)
        return assemble(text.encode(), payloads)
    return mutate


def assemble_raw(z: bytes, payloads: bytes, claimed: int) -> bytes:
    """A file around a compressed header whose frame states `claimed` as its decompressed size: the
    frame header's content-size field rewritten as 8 bytes (zstd frame format, RFC 8878 3.1.1.1)."""
    desc = z[4]
    single, fcs_code = (desc >> 5) & 1, desc >> 6
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[desc & 3]  # after the window byte and dictionary id
    size_len = (1 if single else 0, 2, 4, 8)[fcs_code]
    frame = z[:4] + bytes([desc | 0xC0]) + z[5:at] + struct.pack("<Q", claimed) + z[at + size_len:]
    out = bytearray(MAGIC)
    out.append(2)
    write_varint(out, len(frame))
    return with_crc(bytes(out + frame) + payloads)


def payload_param(rng: random.Random, base: Base, bases: list[Base]) -> bytes:
    """A tensor's leading bytes (its codec's parameters) overwritten: odd floats, counts, codes."""
    i = rng.randrange(len(base.starts))
    start = len(base.data) - 4 - len(base.payloads) + base.starts[i]
    b = bytearray(base.data[:-4])
    choice = rng.random()
    if choice < 0.5:
        value = struct.pack("<f", rng.choice((math.nan, math.inf, -math.inf, 0.0, -0.02, 1e38, 1e-45, 3.0)))
    elif choice < 0.8:
        value = struct.pack("<H", rng.choice((0, 1, 2, 255, 65535)))
    else:
        value = bytes([rng.randrange(256)])
    b[start:start + len(value)] = value[:max(0, len(b) - start)]
    return with_crc(bytes(b))


MUTATIONS = {
    **{f"{how}-{'crc' if fix else 'stale'}": body_mutation(how, fix)
       for how in ("byte-flip", "bit-flip", "truncate", "extend", "splice") for fix in (True, False)},
    **{f"header-{what}" if not what.startswith("header") else what: header_mutation(what)
       for what in ("spec", "meta", "entry-length", "entry-codec", "entry-count", "header-shape", "header-deep",
                    "version", "header-length", "zstd-size")},
    "payload-param": payload_param,
}


# ---------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (VmHWM: the peak, VmRSS: now), in kB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS starts again from the RSS now
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux; only grows


def outcome_of(data: bytes, base: Base, device=None) -> tuple[str, str | None]:
    """(outcome, detail): the reason a model differs, or the type an unnamed error wraps."""
    try:
        model, header = decode_model(data, device=device)
    except ModelFileError as e:
        return "ModelFileError", type(e.__cause__).__name__ if e.__cause__ is not None else None
    except Exception as e:  # what the fuzzer is looking for: the decoder let something else out
        return f"other-exception:{type(e).__name__}", str(e)[:200]
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    same = state.keys() == base.state.keys() and all(
        state[k].dtype == v.dtype and state[k].shape == v.shape and torch.equal(state[k], v)
        for k, v in base.state.items())
    if not same:
        return "different-model", "weights"
    if header["spec"] != base.spec:
        return "different-model", "spec"
    if header["meta"] != base.meta:
        return "different-model", "meta"
    return "identical", None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    add_where_args(p, data_dir=False)
    a = p.parse_args(argv)
    device = where(a)  # the mutants are decoded onto it; the originals, to compare with, on CPU
    rng = random.Random(a.seed)
    torch.manual_seed(a.seed)
    bases = build_bases()
    kinds = sorted(MUTATIONS)
    by_outcome, by_kind = Counter(), {k: Counter() for k in kinds}
    unnamed, different, examples = Counter(), Counter(), {}
    max_s, max_mb, slow, big = 0.0, 0.0, 0, 0
    worst_s = worst_mb = None
    peak_reset = _reset_peak()
    for base in bases:  # warm: imports, allocator, first builds
        decode_model(base.data, device=device)
    t_start = time.perf_counter()
    for case in range(a.cases):
        kind = kinds[case % len(kinds)] if case < len(kinds) else rng.choice(kinds)
        base = rng.choice(bases)
        data = MUTATIONS[kind](rng, base, bases)
        if peak_reset:
            _reset_peak()
            start_kb = _status_kb("VmRSS")
        else:
            start_kb = _maxrss_kb()
        t0 = time.perf_counter()
        outcome, detail = outcome_of(data, base, device)
        seconds = time.perf_counter() - t0
        extra_mb = max(0, ((_status_kb("VmHWM") if peak_reset else _maxrss_kb()) or 0) - (start_kb or 0)) / 1024
        by_outcome[outcome] += 1
        by_kind[kind][outcome] += 1
        if outcome == "ModelFileError" and detail:
            unnamed[detail] += 1
        if outcome == "different-model":
            different[f"{kind}: {detail}"] += 1
        if outcome.startswith("other-exception") and outcome not in examples:
            examples[outcome] = {"case": case, "kind": kind, "base": base.label, "message": detail}
        if seconds > max_s:
            max_s, worst_s = seconds, {"case": case, "kind": kind, "base": base.label, "outcome": outcome}
        if extra_mb > max_mb:
            max_mb, worst_mb = extra_mb, {"case": case, "kind": kind, "base": base.label, "outcome": outcome}
        slow += seconds > SLOW_S
        big += extra_mb > BIG_MB
    out = {
        "benchmark": "fuzz_model_file",
        "command": " ".join(["python -m frugal.benchmarks.fuzz_model_file", *(sys.argv[1:] if argv is None else argv)]),
        "seed": a.seed, "cases": a.cases, "bases": [b.label for b in bases], "mutation_kinds": kinds,
        "outcomes": dict(sorted(by_outcome.items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in by_kind.items()},
        "unnamed_errors": dict(sorted(unnamed.items())),  # ModelFileError from the last-resort handler, by cause
        "different_model": dict(sorted(different.items())),  # kind: what differs (weights, spec or meta)
        "other_exception_examples": examples,
        "max_seconds": round(max_s, 4), "slowest_case": worst_s,
        "max_extra_mb": round(max_mb, 1), "most_memory_case": worst_mb,
        "memory_measure": "VmHWM after clear_refs" if peak_reset else "ru_maxrss growth (only grows)",
        f"cases_over_{SLOW_S:g}_s": slow, f"cases_over_{BIG_MB:g}_mb": big,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "device": str(device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "versions": versions(),
    }
    print(json.dumps(out, indent=2))
    if a.out:
        atomic_write_json(a.out, out)
    return out


if __name__ == "__main__":
    main()
