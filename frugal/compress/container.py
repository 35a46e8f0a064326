"""The compressed model file: one self-contained `.frugal` file a model can be rebuilt from.

Layout (all integers little-endian):

    b"FRGL"            magic
    u8                 format version (FORMAT_VERSION)
    varint + bytes     header: zstd-compressed JSON {"spec": model spec, "meta": {...},
                       "tensors": [[codec name, payload length], ...]}, one entry per weight
                       tensor of the model the spec builds, sorted by name (names and
                       shapes come from the model, so they cost nothing; each payload carries its
                       code's parameters). Version 1 files, whose entries were
                       [name, shape, codec name, payload length], are still read.
    bytes              the tensors' payloads, in header order (each codec's own bytes)
    u32                CRC-32 of everything before it

Reading checks, in order, the size, the magic, the version and the checksum, then the header's
structure, then that every tensor matches the rebuilt model's shape, then decodes each tensor. Any
failure raises `ModelFileError` naming what was wrong; nothing half-read is ever returned.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import torch.nn as nn

from frugal.compress.codecs import Codec, Raw, decode_tensor
from frugal.compress.entropy import CodecError, read_varint, write_varint
from frugal.measure import weight_tensors
from frugal.utils import atomic_write_bytes

MAGIC = b"FRGL"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_HEADER = 1 << 24  # decompressed header bytes: bounds what a damaged file can make us allocate


class ModelFileError(ValueError):
    """A file that is not a readable frugal model file."""


def encode_model(model: nn.Module, spec: dict[str, Any], codecs: dict[str, Codec] | None = None,
                 meta: dict[str, Any] | None = None) -> bytes:
    """The file's bytes. `codecs` maps state-dict names to codecs; tensors not named are stored raw."""
    import zstandard

    codecs = codecs or {}
    tensors = weight_tensors(model)
    unknown = set(codecs) - set(tensors)
    if unknown:
        raise ValueError(f"codecs given for tensors the model does not have: {sorted(unknown)}")
    entries, payloads = [], []
    for name, t in sorted(tensors.items()):  # by name: registration order can differ between equal models
        codec = codecs.get(name, Raw())
        data = codec.encode(t)
        entries.append([codec.name, len(data)])
        payloads.append(data)
    header = json.dumps({"spec": spec, "meta": meta or {}, "tensors": entries}, separators=(",", ":")).encode()
    # no content size in the frame: the reader bounds the output itself (MAX_HEADER)
    zheader = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(header)
    out = bytearray(MAGIC)
    out.append(FORMAT_VERSION)
    write_varint(out, len(zheader))
    out += zheader
    for p in payloads:
        out += p
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


def write_model_file(path: str | Path, model: nn.Module, spec: dict[str, Any],
                     codecs: dict[str, Codec] | None = None, meta: dict[str, Any] | None = None) -> int:
    """Write atomically; returns the file's size in bytes."""
    data = encode_model(model, spec, codecs, meta)
    atomic_write_bytes(Path(path), data)
    return len(data)


def decode_model(data: bytes, device=None) -> tuple[nn.Module, dict[str, Any]]:
    """(model with the decoded weights, {"spec", "meta", "tensors"}) from a file's bytes."""
    import zstandard

    from frugal.train import build_model  # the spine rebuilds architectures from their spec

    if len(data) < len(MAGIC) + 1 + 1 + 4:
        raise ModelFileError(f"{len(data)} bytes is too short to be a frugal model file")
    if data[:4] != MAGIC:
        raise ModelFileError(f"not a frugal model file (starts with {data[:4]!r}, expected {MAGIC!r})")
    version = data[4]
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"format version {version} is not one this frugal reads {READABLE_VERSIONS}; "
                             "use the frugal version that wrote it")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise ModelFileError("checksum mismatch: the file is damaged or truncated")
    body = memoryview(data)[:-4]
    try:
        n, pos = read_varint(body, 5)
    except CodecError as e:
        raise ModelFileError(f"header length unreadable: {e}") from None
    if pos + n > len(body):
        raise ModelFileError(f"header of {n} bytes runs past the end of the file: damaged")
    try:
        raw = zstandard.ZstdDecompressor().decompress(bytes(body[pos:pos + n]), max_output_size=MAX_HEADER)
        header = json.loads(raw)
    except (zstandard.ZstdError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"header does not decode ({e}): the file is damaged") from None
    pos += n
    short = _check_header(header, version)
    if pos + sum(e[-1] for e in short) != len(body):
        raise ModelFileError(f"payload lengths ({sum(e[-1] for e in short)} bytes) do not fill the "
                             f"{len(body) - pos} bytes after the header: damaged")
    try:
        model = build_model(header["spec"], device=device)
    except Exception as e:  # any failure to rebuild means the spec is not usable
        raise ModelFileError(f"cannot rebuild the model from the file's spec ({e})") from None
    expected = weight_tensors(model)
    if version >= 2:  # entries follow the model's own tensors: names and shapes come from it
        if len(short) != len(expected):
            raise ModelFileError(f"the file has {len(short)} tensors, the model {header['spec'].get('name')!r} "
                                 f"{len(expected)}: damaged, or written for another model")
        entries = [[k, list(t.shape), c, n] for (k, t), (c, n) in zip(sorted(expected.items()), short)]
    else:
        entries = short
    header = {**header, "tensors": entries}
    names = [e[0] for e in entries]
    if sorted(names) != sorted(expected):
        raise ModelFileError(f"the file's tensors {sorted(set(names) ^ set(expected))} do not match the "
                             f"model {header['spec'].get('name')!r}")
    state = {}
    for name, shape, codec_name, length in entries:
        if tuple(shape) != tuple(expected[name].shape):
            raise ModelFileError(f"tensor {name!r} has shape {tuple(shape)} in the file, "
                                 f"{tuple(expected[name].shape)} in the model")
        try:
            state[name] = decode_tensor(codec_name, bytes(body[pos:pos + length]), tuple(shape))
        except (CodecError, ValueError, TypeError) as e:
            raise ModelFileError(f"tensor {name!r} does not decode: {e}") from None
        if not bool(state[name].isfinite().all()):
            raise ModelFileError(f"tensor {name!r} decodes to non-finite values: the file is damaged")
        pos += length
    missing = model.load_state_dict({k: v.to(expected[k].device, expected[k].dtype) for k, v in state.items()},
                                    strict=False).missing_keys
    if set(missing) & set(expected):  # only integer book-keeping may be left at its initial value
        raise ModelFileError(f"tensors missing from the file: {sorted(set(missing) & set(expected))}")
    return model, header


def _check_header(h: Any, version: int) -> list[list]:
    if not isinstance(h, dict) or not {"spec", "meta", "tensors"} <= h.keys():
        raise ModelFileError("header lacks spec, meta or tensors: not a frugal model file")
    if not isinstance(h["spec"], dict) or not isinstance(h["tensors"], list):
        raise ModelFileError("header spec or tensor list has the wrong type: damaged")
    for e in h["tensors"]:
        if version >= 2:  # [codec name, payload length]
            ok = isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int) and e[1] >= 0
        else:  # [name, shape, codec name, payload length]
            ok = (isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and isinstance(e[1], list)
                  and all(isinstance(d, int) and 0 <= d < 1 << 31 for d in e[1]) and isinstance(e[2], str)
                  and isinstance(e[3], int) and e[3] >= 0 and math.prod(e[1]) < 1 << 31)
        if not ok:
            raise ModelFileError(f"tensor entry {str(e)[:80]} is malformed: damaged")
    return h["tensors"]


def read_model_file(path: str | Path, device=None) -> tuple[nn.Module, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}; write one with `frugal compress RUN -o {path}`")
    return decode_model(path.read_bytes(), device=device)


def model_file_size(model: nn.Module, spec: dict[str, Any], codecs: dict[str, Codec] | None = None) -> int:
    return len(encode_model(model, spec, codecs))


__all__ = ["FORMAT_VERSION", "MAGIC", "ModelFileError", "decode_model", "encode_model", "model_file_size",
           "read_model_file", "write_model_file"]
