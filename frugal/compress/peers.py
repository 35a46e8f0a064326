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
import math
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from frugal.coding.codecs import Units
from frugal.coding.entropy import MAX_ALPHABET
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
OWN_GRID_ALPHAS = (4.0, 16.0)  # stronger RDOQ around a tensor's own grid: pruning further what a loop pruned


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
                 transform: str = "none", extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """(bytes, test accuracy) of the model's `.frugal` file at each (step, RDOQ strength); `transform`:
    "none", or "conv" to code kernels in their DCT; `extra` codecs for tensors that are not
    parameters (folded batch-norm statistics)."""
    params = dict(model.named_parameters())
    points = []
    for step in steps:
        for alpha in alphas:
            codecs, state = dict(extra or {}), {}
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


def fisher(model: nn.Module, split, mean: float, std: float, device, examples: int = 2048,
           batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Each parameter's mean squared gradient of the cross-entropy over batches of `batch_size`
    from the first `examples` of `split`, in eval mode: how much an error in each weight costs
    (the empirical Fisher's diagonal, up to a scale)."""
    from frugal.train import normalize

    m = copy.deepcopy(model).eval()
    params = dict(m.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    dtype = next(m.parameters()).dtype
    n = min(examples, len(split))
    batches = 0
    with torch.enable_grad():
        for i in range(0, n, batch_size):
            x = normalize(split.x[i:min(i + batch_size, n)].to(device), mean, std, dtype)
            loss = torch.nn.functional.cross_entropy(m(x).float(), split.y[i:min(i + batch_size, n)].to(device))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for k, g in zip(params, grads):
                if g is not None:
                    acc[k] += g.detach().pow(2)
            batches += 1
    return {k: (v / max(batches, 1)).detach() for k, v in acc.items()}


@dataclass(frozen=True)
class Option:
    """One way to code one tensor: its codec, the weights it decodes to, its bytes, and its
    distortion (Fisher-weighted squared error)."""

    codec: Any
    decoded: torch.Tensor
    bytes: int
    distortion: float


def tensor_options(w: torch.Tensor, weight: torch.Tensor, steps, alphas, transform: str = "none",
                   own=None) -> list[Option]:
    """Every (step, RDOQ strength) of the learned code for tensor `w`, as `Option`s (each with the
    all-zero units cut out where that is shorter); with `own`, the tensor's own code (a tensor
    already on a grid keeps it at no distortion) and the learned code at steps around that grid,
    with stronger RDOQ too."""
    kind = "dct" if transform == "conv" and w.dim() >= 3 else "none"
    grouping = "frequency" if kind == "dct" else "tensor"
    ref = w.detach().double().cpu()
    fw = weight.detach().double().cpu()
    out = []

    def error(decoded):
        return float((fw * (decoded.double().cpu() - ref).pow(2)).sum())

    def option(step, alpha):
        codec, decoded = Learned.rd_coded(w, step, alpha, kind, grouping)
        size = len(codec.encode(decoded))
        if w.dim() >= 2:  # with the all-zero units cut out, where that is shorter
            units = Units(codec)
            units_size = len(units.encode(decoded))
            if units_size < size:
                codec, size = units, units_size
        return Option(codec, decoded, size, error(decoded))

    largest = float(ref.abs().max()) if ref.numel() else 0.0
    # a kernel's DCT coefficients are at most sqrt(kernel size) x its largest weight: keep the integers' range codable
    spread = math.sqrt(math.prod(w.shape[-2:])) if kind == "dct" else 1.0
    finest = largest * spread * 2 / MAX_ALPHABET

    def usable(step):
        return step > finest

    for step in filter(usable, steps):
        for alpha in alphas if w.dim() >= 2 else (0.0,):
            out.append(option(step, alpha))
    if own is not None:
        decoded, size = own.roundtrip(w)
        out.append(Option(own, decoded, size, error(decoded)))
        nonzero = decoded.detach().abs()[decoded != 0]
        if nonzero.numel():  # steps around the tensor's own grid (its smallest non-zero magnitude)
            base = float(nonzero.min())
            for step in filter(usable, (base * 2 ** (k / 2) for k in range(-2, 7))):
                for alpha in (*alphas, *OWN_GRID_ALPHAS) if w.dim() >= 2 else (0.0,):
                    out.append(option(step, alpha))
    return out


def allocations(options: dict[str, list[Option]], points: int = 40) -> list[dict[str, Option]]:
    """Per-tensor choices along the greedy rate-distortion path: from every tensor's largest
    undominated option, repeatedly move the one tensor whose next smaller option costs the least
    added distortion per byte saved, until every tensor has its smallest. Each tensor walks its
    whole Pareto front (not only its convex hull, which on real weights skips large stretches).
    Of the path's allocations, about `points`: half spread log-evenly over their total bytes, half
    over their total distortion (where accuracy changes), most bytes first."""
    fronts = {}
    for k, opts in options.items():
        front = []
        for o in sorted(opts, key=lambda o: (o.bytes, o.distortion)):
            if not front or o.distortion < front[-1].distortion:
                front.append(o)  # fewer bytes first; each kept option lowers the distortion
        fronts[k] = front[::-1]  # most bytes first
    at = {k: 0 for k in fronts}
    path = [{k: f[0] for k, f in fronts.items()}]
    while True:
        moves = [((f[at[k] + 1].distortion - f[at[k]].distortion) / max(f[at[k]].bytes - f[at[k] + 1].bytes, 1e-9), k)
                 for k, f in fronts.items() if at[k] + 1 < len(f)]
        if not moves:
            break
        k = min(moves)[1]
        at[k] += 1
        path.append({t: f[at[t]] for t, f in fronts.items()})
    if len(path) <= points:
        return path
    keep = set()
    for measure in (lambda c: sum(o.bytes for o in c.values()), lambda c: sum(o.distortion for o in c.values())):
        v = [math.log(max(measure(c), 1e-300)) for c in path]
        n = points - points // 2 if not keep else points // 2
        targets = [v[0] + (v[-1] - v[0]) * i / max(n - 1, 1) for i in range(n)]
        keep |= {min(range(len(v)), key=lambda j: abs(v[j] - t)) for t in targets}
    return [path[j] for j in sorted(keep)]


def model_options(model: nn.Module, data: TaskData, device, steps=STEPS, alphas=ALPHAS, transform: str = "none",
                  own: dict[str, Any] | None = None) -> dict[str, list[Option]]:
    """`tensor_options` of every parameter, its distortion weighted by the `fisher` of the training
    split: the learned code at `steps` x `alphas` (biases at a sixteenth of the step), or the
    tensor's own code in `own`."""
    weight = fisher(model, data.train, data.mean, data.std, device)
    return {name: tensor_options(p, weight[name], [s if p.dim() >= 2 else s * BIAS_STEP_FACTOR for s in steps],
                                 alphas, transform, (own or {}).get(name))
            for name, p in model.named_parameters()}


@torch.no_grad()
def allocated_front(model: nn.Module, spec: dict[str, Any], data: TaskData, device,
                    options: dict[str, list[Option]], points: int = 40, extra: dict[str, Any] | None = None,
                    label: str = "frugal allocated") -> list[dict[str, Any]]:
    """(bytes, test accuracy) of the model's `.frugal` file at each of `allocations(options)`: each
    tensor's step chosen by rate and distortion. `extra` codecs cover tensors that are not options
    (folded batch-norm statistics)."""
    front = []
    for pick in allocations(options, points):
        m = _loaded(model, {k: o.decoded for k, o in pick.items()}, device)
        front.append({"tool": label, "bytes": len(encode_model(m, spec, {**(extra or {}),
                                                                         **{k: o.codec for k, o in pick.items()}})),
                      "distortion": sum(o.distortion for o in pick.values()),
                      "test_acc": evaluate(m, data.test, data.mean, data.std, device)[0]})
    return front


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


__all__ = ["ALPHAS", "NNCODEC_INSTALL", "QPS", "STEPS", "Option", "allocated_front", "allocations", "fisher",
           "frugal_front", "model_options", "nncodec_decode", "nncodec_encode",
           "nncodec_front", "nncodec_status", "smallest_within", "tensor_options"]
