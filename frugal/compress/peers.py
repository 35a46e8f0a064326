"""Post-hoc coding of trained weights, frugal's and the standard's, as fronts of (bytes, accuracy).

- `frugal_front`: every weight tensor coded by the learned code at one step shared by all of them
  (the standard's choice too: equal steps are the rate-distortion optimum when every weight's error
  counts alike), each step with rate-distortion optimised quantisation at a few strengths
  (`Learned.rd_coded`); biases at a sixteenth of the step; buffers (batch-norm statistics) raw.
  Bytes are those of the whole `.frugal` file, header included.
- `nncodec_front`: NNCodec 2.1.3 (Fraunhofer's implementation of ISO/IEC 15938-17, neural network
  coding: DeepCABAC, dependent (trellis) quantisation, parameter optimisation) at a sweep of its
  quantisation parameter, on the same tensors (its bitstream: no architecture, so a little in its
  favour). It is optional: `nncodec_status()` says how to install it when it is missing.

NNCodec's package imports its application framework (data-set loaders importing torchvision and
cv2) when its compression module loads; the coding path does not use it, so the framework is kept
out while that module loads and taken out of `sys.modules` again after.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from frugal.coding.learned import Learned
from frugal.compress.container import encode_model
from frugal.data import TaskData
from frugal.train import evaluate

NNCODEC_VERSION = "2.1.3"
NNCODEC_INSTALL = ("pip install pybind11 && pip install --no-deps --no-build-isolation nncodec==2.1.3 "
                   "(it builds a C++ extension: needs g++); the repository's .ci/install-nncodec does this")
STEPS = tuple(2.0 ** (-k / 2) for k in range(6, 19))  # 0.125 .. 0.002: one step for every weight tensor
ALPHAS = (0.0, 0.25, 1.0)  # RDOQ strengths: lam = alpha x step^2 per bit
QPS = tuple(range(-56, -3, 2))  # NNCodec's quantisation parameter (step 2^(qp / 4) at qp_density 2), to coarse ones
BIAS_STEP_FACTOR = 1 / 16


def _nncodec():
    """(compress, decompress) of NNCodec, or ImportError with the install command."""
    name = "nncodec.framework"
    stubbed = name not in sys.modules
    if stubbed:
        fw = types.ModuleType(name)
        fw.__path__ = []
        for sub in ("pytorch_model", "tensorflow_model", "use_case_init"):
            m = types.ModuleType(f"{name}.{sub}")
            setattr(fw, sub, m)
            sys.modules[m.__name__] = m
        sys.modules[name] = fw
    try:
        from nncodec.nnc import compress, decompress
    except ImportError as e:
        raise ImportError(f"NNCodec {NNCODEC_VERSION} is not installed ({e}); install it with: {NNCODEC_INSTALL}") from e
    finally:
        if stubbed:
            for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                if isinstance(sys.modules[k], types.ModuleType) and not getattr(sys.modules[k], "__file__", None):
                    del sys.modules[k]
    return compress, decompress


def nncodec_status() -> str | None:
    """None when NNCodec can be used; otherwise why not and how to install it."""
    try:
        _nncodec()
    except ImportError as e:
        return str(e)
    return None


def nncodec_encode(tensors: dict[str, torch.Tensor], qp: int) -> bytes:
    """NNCodec's bitstream of the tensors (float32) at quantisation parameter `qp`, its defaults otherwise."""
    compress, _ = _nncodec()
    params = {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in tensors.items()}
    with tempfile.TemporaryDirectory() as tmp:  # it writes the bitstream to a file as well
        bs = compress(params, bitstream_path=str(Path(tmp) / "model.nnc"), qp=int(qp), return_bitstream=True,
                      verbose=False)
    return bytes(bs)


def nncodec_decode(bitstream: bytes) -> dict[str, torch.Tensor]:
    _, decompress = _nncodec()
    out = decompress(bytearray(bitstream))
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in out.items()}


def _loaded(model: nn.Module, state: dict[str, torch.Tensor], device) -> nn.Module:
    """A copy of the model holding `state` (coded tensors) in place of its own."""
    m = copy.deepcopy(model)
    m.load_state_dict({**m.state_dict(), **{k: v.to(device) for k, v in state.items()}})
    return m


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def frugal_front(model: nn.Module, spec: dict[str, Any], data: TaskData, device, steps=STEPS, alphas=ALPHAS,
                 transform: str = "none") -> list[dict[str, Any]]:
    """(bytes, test accuracy) of the model's `.frugal` file at each (step, RDOQ strength); `transform`:
    "none", or "conv" to code kernels in their DCT."""
    params = dict(model.named_parameters())
    points = []
    for step in steps:
        for alpha in alphas:
            codecs, state = {}, {}
            for name, p in params.items():
                kind = "dct" if transform == "conv" and p.dim() >= 3 else "none"
                s = step if p.dim() >= 2 else step * BIAS_STEP_FACTOR
                codec, decoded = Learned.rd_coded(p, s, alpha if p.dim() >= 2 else 0.0, kind,
                                                  "frequency" if kind == "dct" else "tensor")
                codecs[name], state[name] = codec, decoded
            m = _loaded(model, state, device)
            points.append({"tool": "frugal", "step": step, "alpha": alpha, "transform": transform,
                           "bytes": len(encode_model(m, spec, codecs)),
                           "test_acc": evaluate(m, data.test, data.mean, data.std, device)[0]})
    return points


def nncodec_front(model: nn.Module, data: TaskData, device, qps=QPS) -> list[dict[str, Any]]:
    """(bytes, test accuracy) of NNCodec's bitstream of every floating-point tensor at each qp."""
    tensors = _tensors(model)
    points = []
    for qp in qps:
        bs = nncodec_encode(tensors, qp)
        decoded = nncodec_decode(bs)
        if set(decoded) != set(tensors):
            raise RuntimeError(f"NNCodec gave back tensors {sorted(decoded)} for {sorted(tensors)}")
        points.append({"tool": "nncodec", "qp": qp, "bytes": len(bs),
                       "test_acc": evaluate(_loaded(model, decoded, device), data.test, data.mean, data.std,
                                            device)[0]})
    return points


def smallest_within(points: list[dict[str, Any]], reference: float, points_lost: float) -> dict[str, Any] | None:
    """The point with the fewest bytes whose accuracy is within `points_lost` percentage points of
    `reference` (an accuracy in [0, 1]); None if none is."""
    ok = [p for p in points if p["test_acc"] >= reference - points_lost / 100 - 1e-12]
    return min(ok, key=lambda p: p["bytes"]) if ok else None


__all__ = ["ALPHAS", "NNCODEC_INSTALL", "QPS", "STEPS", "frugal_front", "nncodec_decode", "nncodec_encode",
           "nncodec_front", "nncodec_status", "smallest_within"]
