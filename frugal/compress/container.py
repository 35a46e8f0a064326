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

A file may come from anyone, so reading it costs what its model costs and no more: the header is
bounded before it is parsed (MAX_HEADER bytes, MAX_DEPTH deep, MAX_TENSORS entries), and the model
its spec describes is sized on the meta device before anything is allocated: at most `max_params`
floating-point entries (MAX_PARAMS unless the caller raises it), and about as many tensors and
modules as the header lists weights for. Every codec then decodes into the model's own shapes.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from frugal.coding.codecs import Codec, Raw, decode_tensor
from frugal.coding.entropy import CodecError, read_varint, write_varint
from frugal.measure import weight_tensors
from frugal.models import (ModelTooLarge, SizeLimits, import_path_of, is_import_path, model_factory,
                           trust_model_source)
from frugal.utils import atomic_write_bytes, json_extent

MAGIC = b"FRGL"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_HEADER = 1 << 20  # decompressed header bytes; a real header is a short entry per tensor, a few kB
MAX_DEPTH = 16  # JSON nesting of the header: spec options nest 4 deep inside it, tensor entries 2
MAX_TENSORS = SizeLimits.tensors  # entries in the header
MAX_PARAMS = 8_000_000  # floating-point entries of the model a file may build by default (32 MB as float32)


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
    if len(header) > MAX_HEADER or len(entries) > MAX_TENSORS:  # never write a file no reader would read
        raise ValueError(f"the header would be {len(header):,} bytes for {len(entries)} tensors (readers take at "
                         f"most {MAX_HEADER:,} bytes and {MAX_TENSORS} tensors); keep meta short")
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


def decode_model(data: bytes, device=None, max_params: int = MAX_PARAMS,
                 model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model with the decoded weights, {"spec", "meta", "tensors"}) from a file's bytes. A model of
    more than `max_params` floating-point entries is refused before it is built; raise it for a
    larger model from a source you trust. With `model`, the weights are decoded into that module
    (which must have the file's tensors) and nothing is built. Every failure is a `ModelFileError`."""
    try:
        return _decode(data, device, max_params, model)
    except ModelFileError:
        raise
    except MemoryError:
        raise ModelFileError("decoding the file needs more memory than is free: it is damaged, or its model is "
                             "larger than this machine can hold") from None
    except Exception as e:  # a fault no check below names is still the file's: a message, never a traceback
        raise ModelFileError(f"the file does not decode ({type(e).__name__}: {str(e)[:200]}): it is damaged") from e


def _decode(data: bytes, device, max_params: int, model: nn.Module | None) -> tuple[nn.Module, dict[str, Any]]:
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
    header = _read_header(bytes(body[pos:pos + n]))
    pos += n
    short = _check_header(header, version)
    if pos + sum(e[-1] for e in short) != len(body):
        raise ModelFileError(f"payload lengths ({sum(e[-1] for e in short)} bytes) do not fill the "
                             f"{len(body) - pos} bytes after the header: damaged")
    spec = header["spec"]
    if model is not None:
        model = model.to(device) if device is not None else model
        spec = {**spec, "name": spec.get("name", type(model).__name__)}
    elif "name" not in spec:
        raise ModelFileError("the file records no model source (it was written from a model object whose class "
                             "cannot be imported); load it into your own module: frugal.compress.load(path, model=...)")
    # a model's weights are the tensors the header lists; a parametrization registers a few more, and
    # modules without weights (activations, pooling, input checks) are a few per weight at most
    limits = SizeLimits(entries=max_params, tensors=min(SizeLimits.tensors, 2 * len(short) + 64),
                        modules=min(SizeLimits.modules, 4 * len(short) + 64))
    try:
        if model is None:
            model = build_model(spec, device=device, limits=limits)
    except ModelTooLarge as e:
        fix = ("if the file comes from a source you trust, raise the bound: `frugal eval --max-params N`, or "
               "max_params=N in Python" if "tensor entries" in str(e) else "the file is damaged")
        raise ModelFileError(f"the file's model {spec['name']!r} is refused before it is built: {e}; {fix}") from None
    except Exception as e:  # any failure to rebuild means the spec is not usable
        raise ModelFileError(f"cannot rebuild the model from the file's spec ({type(e).__name__}: "
                             f"{str(e)[:300]})") from None
    expected = weight_tensors(model)
    if version >= 2:  # entries follow the model's own tensors: names and shapes come from it
        if len(short) != len(expected):
            raise ModelFileError(f"the file has {len(short)} tensors, the model {spec['name']!r} "
                                 f"{len(expected)}: damaged, or written for another model")
        entries = [[k, list(t.shape), c, n] for (k, t), (c, n) in zip(sorted(expected.items()), short)]
    else:
        entries = short
    header = {**header, "tensors": entries}
    names = [e[0] for e in entries]
    if sorted(names) != sorted(expected):
        raise ModelFileError(f"the file's tensors {sorted(set(names) ^ set(expected))[:10]} do not match the "
                             f"model {spec['name']!r}")
    state = {}
    for name, shape, codec_name, length in entries:
        if tuple(shape) != tuple(expected[name].shape):
            raise ModelFileError(f"tensor {name!r} has shape {tuple(shape)} in the file, "
                                 f"{tuple(expected[name].shape)} in the model")
        try:
            state[name] = decode_tensor(codec_name, bytes(body[pos:pos + length]), tuple(shape))
        except (CodecError, ValueError, TypeError, RuntimeError, OverflowError, IndexError) as e:
            raise ModelFileError(f"tensor {name!r} does not decode: {e}") from None
        if not bool(state[name].isfinite().all()):
            raise ModelFileError(f"tensor {name!r} decodes to non-finite values: the file is damaged")
        pos += length
    missing = model.load_state_dict({k: v.to(expected[k].device, expected[k].dtype) for k, v in state.items()},
                                    strict=False).missing_keys
    if set(missing) & set(expected):  # only integer book-keeping may be left at its initial value
        raise ModelFileError(f"tensors missing from the file: {sorted(set(missing) & set(expected))}")
    return model, header


def _read_header(zheader: bytes) -> Any:
    """The header's JSON value, decompressed and parsed within bounds: MAX_HEADER bytes (whatever size
    the frame claims), a zstd window no larger, MAX_DEPTH levels of nesting."""
    import zstandard

    try:
        size = zstandard.frame_content_size(zheader)  # -1: not stated (what encode_model writes)
        if size > MAX_HEADER:
            raise ModelFileError(f"the header claims {size:,} bytes, more than the {MAX_HEADER:,} a header may have: "
                                 "damaged")
        raw = zstandard.ZstdDecompressor(max_window_size=2 * MAX_HEADER).decompress(zheader, max_output_size=MAX_HEADER)
        header = json.loads(raw)
    except zstandard.ZstdError as e:
        raise ModelFileError(f"header does not decompress ({e}): the file is damaged") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"header is not JSON ({e}): the file is damaged") from None
    except RecursionError:
        raise ModelFileError("header nests its JSON too deeply to read: the file is damaged") from None
    if json_extent(header, max_depth=MAX_DEPTH)[0] > MAX_DEPTH:
        raise ModelFileError(f"header nests its JSON more than {MAX_DEPTH} deep: the file is damaged")
    return header


def _json_type(v: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    return {dict: "an object", list: "a list", str: "a string"}.get(type(v), "a number")


def _check_header(h: Any, version: int) -> list[list]:
    from frugal.train import check_spec  # the spine says what a model spec may hold

    if not isinstance(h, dict) or not {"spec", "meta", "tensors"} <= h.keys():
        raise ModelFileError("header lacks spec, meta or tensors: not a frugal model file")
    if not isinstance(h["spec"], dict) or not isinstance(h["tensors"], list):
        raise ModelFileError("header spec or tensor list has the wrong type: damaged")
    meta = h["meta"]
    if not isinstance(meta, dict):
        raise ModelFileError(f"header meta is {_json_type(meta)}, not an object: damaged")
    if "task" in meta and not isinstance(meta["task"], str):
        raise ModelFileError(f"header meta.task is {_json_type(meta['task'])}, not a task name: damaged")
    acc = meta.get("test_acc")
    if "test_acc" in meta and not (type(acc) in (int, float) and math.isfinite(acc)):
        raise ModelFileError(f"header meta.test_acc is {_json_type(acc)} ({str(acc)[:40]}), not a finite number: "
                             "damaged")
    if len(h["tensors"]) > MAX_TENSORS:
        raise ModelFileError(f"header lists {len(h['tensors']):,} tensors, more than the {MAX_TENSORS:,} a model "
                             "file may have: damaged")
    for e in h["tensors"]:
        if version >= 2:  # [codec name, payload length]
            ok = isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int and e[1] >= 0
        else:  # [name, shape, codec name, payload length]
            ok = (isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and isinstance(e[1], list)
                  and all(type(d) is int and 0 <= d < 1 << 31 for d in e[1]) and isinstance(e[2], str)
                  and type(e[3]) is int and e[3] >= 0 and math.prod(e[1]) < 1 << 31)
        if not ok:
            raise ModelFileError(f"tensor entry {str(e)[:80]} is malformed: damaged")
    norm = meta.get("normalize")
    if "normalize" in meta and not (isinstance(norm, list) and len(norm) == 2
                                    and all(type(v) in (int, float) and math.isfinite(v) for v in norm) and norm[1] > 0):
        raise ModelFileError(f"header meta.normalize is {str(norm)[:40]}, not [mean, std > 0]: damaged")
    try:
        if h["spec"]:  # {}: written from a model object with no importable class; it loads into a module given
            check_spec(h["spec"])
    except ValueError as e:
        raise ModelFileError(f"header spec: {e}") from None
    return h["tensors"]


def read_model_file(path: str | Path, device=None, max_params: int = MAX_PARAMS) -> tuple[nn.Module, dict[str, Any]]:
    """`decode_model` of the file at `path`; a `ModelFileError` names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}; write one with `frugal compress RUN -o {path}`")
    try:
        return decode_model(path.read_bytes(), device=device, max_params=max_params)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None


def save(model: nn.Module, path: str | Path, codecs: dict[str, Codec] | None = None,
         meta: dict[str, Any] | None = None, normalize: tuple[float, float] | None = None) -> int:
    """Write any module as one `.frugal` file; returns its bytes. What rebuilds it is recorded: the
    spec of a model frugal built (a registered name or an import path, with its options), else its
    class's import path (rebuilt with the class's defaults), else nothing (then `load(path, model=)`
    reads it into a module you give). `normalize`: the (mean, std) the model's inputs are
    standardised with (pixels in [0, 1]), so that `frugal eval` needs nothing else."""
    spec = getattr(model, "frugal_spec", None)
    if spec is None:
        path_of = import_path_of(model)
        spec = {"name": path_of} if path_of is not None and _defaults_rebuild(path_of, model) else {}
        if path_of is not None and not spec:
            warnings.warn(f"{path_of}() with its default options does not build this model (other shapes), so the "
                          f"file records no source: load it with load(path, model=...), or build the model with "
                          f"frugal.models.create_model({path_of!r}, **options) so that its options are recorded",
                          stacklevel=2)
    if is_import_path(spec.get("name", "")):  # the user holds this code: their process may read it back
        trust_model_source(spec["name"])
    meta = dict(meta or {})
    if normalize is not None:
        meta["normalize"] = [float(normalize[0]), float(normalize[1])]
    return write_model_file(path, model, spec, codecs, meta)


def _defaults_rebuild(path_of: str, model: nn.Module) -> bool:
    """Whether the class at `path_of`, called without arguments, has `model`'s tensors (sized on the
    meta device: nothing allocated)."""
    try:
        with torch.device("meta"):
            other = model_factory(path_of)()
    except Exception:  # needs arguments, or cannot be built on the meta device: not rebuildable as it is
        return False
    shapes = [{k: tuple(v.shape) for k, v in weight_tensors(m).items()} for m in (model, other)]
    return shapes[0] == shapes[1]


def load(path: str | Path, model: nn.Module | None = None, device=None, max_params: int = MAX_PARAMS) -> nn.Module:
    """The model of a `.frugal` file: rebuilt from what the file records, or `model` with the file's
    weights loaded into it. A file naming a model by an import path builds it only from a trusted
    module (`frugal.models.trust_model_source`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}; write one with frugal.compress.save(model, {str(path)!r})")
    try:
        return decode_model(path.read_bytes(), device=device, max_params=max_params, model=model)[0]
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None


def model_file_size(model: nn.Module, spec: dict[str, Any], codecs: dict[str, Codec] | None = None) -> int:
    return len(encode_model(model, spec, codecs))


__all__ = ["FORMAT_VERSION", "MAGIC", "MAX_PARAMS", "ModelFileError", "decode_model", "encode_model", "load",
           "model_file_size", "read_model_file", "save", "write_model_file"]
