import random
import struct
import time
import zlib

import pytest
import torch

from frugal.coding.codecs import DCT, KMeans, Prune, Uniform, Units
from frugal.compress.container import FORMAT_VERSION, ModelFileError, decode_model, encode_model
from frugal.models import create_model

SPEC = {"name": "convnet", "in_channels": 1, "image_size": [8, 8], "num_classes": 10, "kw": {}}


def model_and_codecs():
    torch.manual_seed(0)
    model = create_model("convnet", in_channels=1, image_size=(8, 8), num_classes=10).eval()
    convs = [k for k, v in model.state_dict().items() if v.dim() == 4]
    fc = [k for k, v in model.state_dict().items() if v.dim() == 2]
    codecs = {convs[0]: DCT(0.02, 3), convs[1]: KMeans(16), fc[0]: Units(Prune(0.5, 0.01))}
    return model, codecs


def test_a_file_decodes_to_the_codec_outputs_and_identical_logits():
    model, codecs = model_and_codecs()
    data = encode_model(model, SPEC, codecs, meta={"test_acc": 0.5})
    decoded, header = decode_model(data)
    assert header["meta"] == {"test_acc": 0.5}
    expected = create_model("convnet", in_channels=1, image_size=(8, 8), num_classes=10).eval()
    state = model.state_dict()
    for name, codec in codecs.items():
        state[name] = codec.roundtrip(state[name])[0]  # what each codec gives back on its own
    expected.load_state_dict(state)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(decoded.eval()(x), expected(x))
    raw, _ = decode_model(encode_model(model, SPEC))  # no codecs: every tensor raw, lossless
    with torch.no_grad():
        assert torch.equal(raw.eval()(x), model(x))
    assert len(data) < len(encode_model(model, SPEC))


def _refix_crc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def test_bad_files_are_refused_with_what_is_wrong():
    model, codecs = model_and_codecs()
    data = encode_model(model, SPEC, codecs)
    cases = [
        (data[:3], "too short"),
        (b"PK\x03\x04" + data[4:], "not a frugal model file"),
        (data[:4] + bytes([FORMAT_VERSION + 1]) + data[5:], f"format version {FORMAT_VERSION + 1}"),
        (data[:-10], "checksum mismatch"),
        (data[:40] + bytes([data[40] ^ 1]) + data[41:], "checksum mismatch"),
    ]
    for bad, msg in cases:
        with pytest.raises(ModelFileError, match=msg):
            decode_model(bad)
    other = create_model("lenet300", in_channels=1, image_size=(8, 8), num_classes=10)
    with pytest.raises(ModelFileError, match="written for another model"):
        decode_model(encode_model(other, SPEC))  # lenet300's weights under convnet's spec
    with pytest.raises(ValueError, match="codecs given for tensors the model does not have"):
        encode_model(model, SPEC, {"nope.weight": Uniform(0.1)})


def test_version_1_files_with_names_and_shapes_in_the_header_are_still_read():
    import json

    import zstandard

    from frugal.measure import weight_tensors
    model, codecs = model_and_codecs()
    v2 = encode_model(model, SPEC, codecs)
    entries, payloads = [], []
    for name, t in weight_tensors(model).items():
        codec = codecs.get(name)
        blob = codec.encode(t) if codec else encode_model.__globals__["Raw"]().encode(t)
        entries.append([name, list(t.shape), codec.name if codec else "raw", len(blob)])
        payloads.append(blob)
    header = zstandard.ZstdCompressor(level=19).compress(
        json.dumps({"spec": SPEC, "meta": {}, "tensors": entries}).encode())
    out = bytearray(b"FRGL\x01")
    out.append(len(header)) if len(header) < 128 else out.extend([len(header) & 127 | 128, len(header) >> 7])
    v1 = _refix_crc(bytes(out + header + b"".join(payloads)) + b"\0\0\0\0")
    a, _ = decode_model(v1)
    b, header2 = decode_model(v2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert [e[0] for e in header2["tensors"]] == sorted(e[0] for e in entries)  # v2 names its tensors from the model
    assert len(v2) < len(v1)  # what the names and shapes cost


def test_a_model_whose_parameters_were_registered_in_another_order_round_trips():
    # torch.nn.utils.prune.remove re-registers `weight` after `bias`: the file must not depend on that order
    import torch.nn.utils.prune as prune
    model, codecs = model_and_codecs()
    fc = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    prune.l1_unstructured(fc, "weight", amount=0.5)
    prune.remove(fc, "weight")
    decoded, _ = decode_model(encode_model(model, SPEC))
    for k, v in model.state_dict().items():
        assert torch.equal(v, decoded.state_dict()[k]), k


def test_fuzzed_files_give_a_clear_error_or_a_model_never_a_crash_or_a_hang():
    # mutations with the checksum fixed up, so they reach the header and codec parsers
    model, codecs = model_and_codecs()
    data = encode_model(model, SPEC, codecs)
    rng = random.Random(0)
    outcomes = {"error": 0, "decoded": 0}
    slowest = 0.0
    for _ in range(1500):
        b = bytearray(data[:-4])
        for _ in range(rng.randint(1, 4)):
            kind, i = rng.random(), rng.randrange(5, len(b))
            if kind < 0.6:
                b[i] ^= 1 << rng.randrange(8)  # bit flip
            elif kind < 0.8:
                b[i] = rng.randrange(256)  # byte replaced
            elif kind < 0.9:
                del b[i:i + rng.randint(1, 16)]  # bytes dropped
            else:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))  # bytes inserted
        t0 = time.perf_counter()
        try:
            decode_model(_refix_crc(bytes(b) + b"\0\0\0\0"))
            outcomes["decoded"] += 1  # a payload bit flip can still decode: to other, finite weights
        except ModelFileError:
            outcomes["error"] += 1
        slowest = max(slowest, time.perf_counter() - t0)
    assert outcomes["error"] > 500 and slowest < 2.0, (outcomes, slowest)
    print(outcomes, f"slowest {slowest:.3f} s")


def test_compress_and_eval_commands_reproduce_the_accuracy(tmp_path, capsys):
    import json

    from frugal.cli import main

    run = tmp_path / "run"
    assert main(["train", "--task", "digits", "--model", "convnet", "--epochs", "1", "--device", "cpu",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    f = tmp_path / "m.frugal"
    assert main(["compress", str(run), "-o", str(f), "--codec", '{"codec": "dct", "step": 0.02, "cutoff": 3}',
                 "--device", "cpu"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["bytes"] == f.stat().st_size
    assert main(["eval", str(f), "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["reproduced"] is True and ev["test_acc"] == written["test_acc"]
    f.write_bytes(f.read_bytes()[:-7])
    assert main(["eval", str(f)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["compress", str(run), "-o", str(f), "--codec", "dct"]) == 2
    assert "--codec must be a JSON object" in capsys.readouterr().err
    # a folder no one can create files in (even root: /proc): the message names -o, not a temp file
    assert main(["compress", str(run), "-o", "/proc/frugal-test/m.frugal", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot write -o /proc/frugal-test/m.frugal" in err and ".tmp" not in err and "Traceback" not in err


@pytest.mark.parametrize("name", __import__("frugal.models", fromlist=["list_models"]).list_models())
def test_every_registered_model_round_trips_within_the_reader_s_bounds(name):
    # the bounds a file's header sets (tensors, modules) must never refuse a model frugal wrote
    torch.manual_seed(0)
    spec = {"name": name, "in_channels": 1, "image_size": [28, 28], "num_classes": 10, "kw": {}}
    model = create_model(name)
    decoded, _ = decode_model(encode_model(model, spec))
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, decoded.state_dict()[k]), k


def test_a_header_no_reader_would_take_is_not_written(tmp_path):
    from frugal.compress.container import MAX_HEADER, read_model_file, write_model_file

    model, _ = model_and_codecs()
    with pytest.raises(ValueError, match="keep meta short"):
        encode_model(model, SPEC, meta={"notes": "x" * MAX_HEADER})
    path = tmp_path / "m.frugal"
    write_model_file(path, model, SPEC)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ModelFileError, match=f"^{path}: checksum mismatch"):
        read_model_file(path)


def test_a_fault_no_check_names_is_still_a_model_file_error(monkeypatch):
    # the last-resort handler: whatever a rebuilt model's loading raises, the caller gets a ModelFileError
    from frugal.compress import container

    model, codecs = model_and_codecs()
    data = encode_model(model, SPEC, codecs)

    def broken(*a, **k):
        raise KeyError("inside")
    monkeypatch.setattr(container, "weight_tensors", broken)
    with pytest.raises(ModelFileError, match="the file does not decode .KeyError: 'inside'.") as e:
        decode_model(data)
    assert isinstance(e.value.__cause__, KeyError)
