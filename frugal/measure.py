"""Measurement: accuracy, parameters, multiply-adds that actually ran, real bytes, and CPU time.

Nothing here estimates. Multiply-adds come from the ops that executed (`FlopCounterMode`, which
counts convolutions and matrix products; element-wise ops, pooling and normalisation are not
multiply-adds and are not counted). Bytes are `len()` of a real encoding. Times are medians of
repeated runs in this process, with the thread count recorded; compare them only as ratios to a
baseline measured in the same process.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import zstandard
from torch.utils.flop_counter import FlopCounterMode

from .data import TaskData, load_corrupted
from .train import evaluate, normalize


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> float:
    """Multiply-adds per example of model(x), counted from the ops that ran, in batches of
    `batch_size`. For input-dependent models (sparse or routed ones) pass many real examples:
    the count is their mean."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        for xb in x.split(batch_size):
            model(xb)
    model.train(was_training)
    return counter.get_total_flops() / 2 / x.shape[0]  # FlopCounterMode counts a multiply-add as 2 FLOPs


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What inference needs: every floating-point entry of the state dict (parameters and buffers
    such as batch-norm statistics); integer book-keeping like num_batches_tracked is left out."""
    return {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}


def fp32_bytes(model: nn.Module) -> int:
    return sum(4 * t.numel() for t in weight_tensors(model).values())


def zstd_bytes(model: nn.Module, level: int = 19) -> int:
    """Bytes of all weights as little-endian float32, concatenated and compressed with zstd."""
    raw = b"".join(t.cpu().to(torch.float32).numpy().astype("<f4").tobytes()
                   for t in weight_tensors(model).values())
    return len(zstandard.ZstdCompressor(level=level).compress(raw))


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return total, nonzero


@torch.no_grad()
def time_inference(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3,
                   min_seconds: float = 0.0) -> float:
    """Median wall-clock seconds of one model(x) call, after warm-up."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times, t_start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - t_start < min_seconds:
        t0 = time.perf_counter()
        model(x)
        sync()  # note: without it a CUDA call returns before the work is done
        times.append(time.perf_counter() - t0)
    model.train(was_training)
    return statistics.median(times)


@dataclass(frozen=True)
class Speed:
    latency_ms: float  # median ms per image at batch 1
    throughput: float  # images per second at batch 256 (median of repeats)
    threads: int  # torch intra-op threads used


def measure_speed(model: nn.Module, example: torch.Tensor, repeats: int = 30, batch: int = 256) -> Speed:
    """CPU (or current device) latency at batch 1 and throughput at batch `batch`.
    `example` is one real, already normalised input of shape (1, C, H, W)."""
    lat = time_inference(model, example, repeats=repeats, warmup=5)
    xb = example.expand(batch, *example.shape[1:]).contiguous()  # (batch, C, H, W)
    t = time_inference(model, xb, repeats=max(3, repeats // 6), warmup=1)
    return Speed(latency_ms=lat * 1e3, throughput=batch / t, threads=torch.get_num_threads())


def corrupted_accuracy(model: nn.Module, data: TaskData, device: torch.device, data_dir=None,
                       batch_size: int = 256, suite: str | None = None, n: int | None = None) -> dict[str, float]:
    """Accuracy on each split of a corrupted test suite ("corruption-s<severity>"): the task's own
    suite, or `suite`, a folder in MNIST-C layout ("folder:/path"). `n`: only each split's first n
    images (the same test images in every split), for nets too slow to run the whole suite."""
    if n is not None and n < 1:
        raise ValueError(f"n is the test images per corrupted split, >= 1 or None for all; got {n}")
    suite = load_corrupted(suite or data.name, data_dir=data_dir)
    return {name: evaluate(model, split.subset(n), data.mean, data.std, device, batch_size)[0]
            for name, split in sorted(suite.items())}


def measure(model: nn.Module, data: TaskData, device: torch.device, *, corrupted: bool = False,
            data_dir=None, speed: bool = True, mac_examples: int = 512,
            corrupted_n: int | None = None) -> dict[str, float | int | dict]:
    """All the measured fields of one trained model on one task, as a flat dict (plus a
    'corrupted' dict of per-suite accuracies when asked, on each split's first `corrupted_n`
    images, or all)."""
    model = model.to(device)
    dtype = next(model.parameters()).dtype
    test_acc, test_loss = evaluate(model, data.test, data.mean, data.std, device)
    params, nonzero = param_counts(model)
    x = normalize(data.test.x[:mac_examples].to(device), data.mean, data.std, dtype)
    row: dict = {
        "test_acc": test_acc, "test_loss": test_loss, "params": params, "nonzero_params": nonzero,
        "macs": count_macs(model, x), "fp32_bytes": fp32_bytes(model), "zstd_bytes": zstd_bytes(model),
    }
    if speed:
        s = measure_speed(model, x[:1])
        row.update(latency_ms=s.latency_ms, throughput=s.throughput, threads=s.threads)
    if corrupted:
        acc = corrupted_accuracy(model, data, device, data_dir=data_dir, n=corrupted_n)
        row["corrupted"] = acc
        if corrupted_n is not None:
            row["corrupted_n"] = corrupted_n
        row["corrupted_mean_acc"] = float(np.mean(list(acc.values())))
    return row
