"""Speed of layer-separable convs (k x 1 to R channels, then 1 x k) against the full convs they
constrain, layer by layer, on CPU, in one process: the conv layers of lenet5 and the residual net
at their real input sizes, both timed alternately under no_grad, medians compared.

    python -m frugal.benchmarks.separable_speed --rank 8 --batch 256 --threads 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from frugal.benchmarks import add_out_arg, publish
from frugal.benchmarks.saccade_model import alternate_timing
from frugal.kernels import conv_free_parameters, constrain_conv
from frugal.measure import count_macs
from frugal.models import create_model
from frugal.utils import versions


def conv_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Conv2d, torch.Tensor]]:
    """Each conv with kernels of 2x2 or more, with the input it sees on x."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, mod, inp[0].detach())))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] >= 2]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", nargs="+", default=["lenet5", "resnet"])
    add_out_arg(p)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for name in a.models:
        model = create_model(name).eval()
        x = torch.randn(a.batch, 1, 28, 28)
        for layer, conv, inp in conv_inputs(model, x):
            sep = constrain_conv(nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                           conv.padding, bias=conv.bias is not None), f"lsep{a.rank}").eval()
            t = alternate_timing({"full": conv, "separable": sep}, inp, a.rounds)
            rows.append({"model": name, "layer": layer, "shape": list(conv.weight.shape), "input": list(inp.shape[1:]),
                         "rank": sep.parametrizations.weight.original1.shape[0],
                         "free_full": conv.weight.numel(), "free_separable": conv_free_parameters(sep),
                         "macs_full": count_macs(conv, inp[:8]), "macs_separable": count_macs(sep, inp[:8]),
                         "full_ms": 1e3 * t["full"], "separable_ms": 1e3 * t["separable"],
                         "speedup": t["full"] / t["separable"]})
    out = {"benchmark": "separable_speed", "batch": a.batch, "threads": torch.get_num_threads(), "rows": rows,
           "versions": versions()}
    return publish(out, "frugal.benchmarks.separable_speed", argv, a.out)


if __name__ == "__main__":
    main()
