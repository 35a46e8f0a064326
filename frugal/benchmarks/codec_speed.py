"""Time to write and read a whole compressed model file, per codec, on CPU.

The model is `resnet` at width 64 (1.23 M parameters, random initial weights: the codecs' work
does not depend on training). Each codec is applied to every tensor of two or more dimensions,
the others stay raw; encode = `encode_model` (codes, range coder, header, checksum), decode =
`decode_model` (checks, rebuild, decode, load). Medians over repeats.

    python -m frugal.benchmarks.codec_speed --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from frugal.benchmarks import add_out_arg, publish
from frugal.coding.codecs import codec_from_spec
from frugal.compress.container import decode_model, encode_model
from frugal.measure import weight_tensors
from frugal.models import create_model
from frugal.utils import versions

CODECS = [{"codec": "uniform", "step": 0.01}, {"codec": "prune", "fraction": 0.9, "step": 0.01},
          {"codec": "kmeans", "k": 16}, {"codec": "dct", "step": 0.01, "cutoff": 3},
          {"codec": "learned", "step": 0.01}]  # kernels in their DCT, a density per band (see _codec)


def _codec(cspec: dict, t: torch.Tensor):
    """A codec for tensor t: the learned code's densities depend on the tensor's shape, so they are
    fitted to its integers here (training's work, not timed: the file's writing and reading are)."""
    if cspec["codec"] != "learned":
        return codec_from_spec(cspec)
    from frugal.coding.learned import Learned

    kind = "dct" if t.dim() >= 3 else "none"
    return Learned.fitted(t, cspec["step"], kind, "frequency" if kind == "dct" else "tensor")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    add_out_arg(p)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    spec = {"name": "resnet", "in_channels": 1, "image_size": [28, 28], "num_classes": 10, "kw": {"width": a.width}}
    model = create_model("resnet", in_channels=1, image_size=(28, 28), num_classes=10, width=a.width)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for cspec in CODECS:
        codecs = {k: _codec(cspec, t) for k, t in weight_tensors(model).items() if t.dim() >= 2}
        enc, dec = [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            blob = encode_model(model, spec, codecs)
            t1 = time.perf_counter()
            decode_model(blob)
            dec.append(time.perf_counter() - t1)
            enc.append(t1 - t0)
        rows.append({"codec": cspec, "bytes": len(blob), "encode_s": statistics.median(enc),
                     "decode_s": statistics.median(dec),
                     "total_s": statistics.median(enc) + statistics.median(dec)})
    out = {"benchmark": "codec_speed", "model": "resnet", "width": a.width, "params": params,
           "threads": torch.get_num_threads(), "rows": rows, "versions": versions()}
    return publish(out, "frugal.benchmarks.codec_speed", argv, a.out)


if __name__ == "__main__":
    main()
