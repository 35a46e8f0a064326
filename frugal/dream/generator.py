"""DeepDream: gradient ascent on the input to amplify what a layer of the net sees.

Batched and device-agnostic. Per octave (smallest first) the image is resized, then for each step
it is rolled by a random jitter, the gradient of the objective with respect to the image is taken,
divided by its mean magnitude (per image), and a step of `step` is added; the roll is undone and
the image clipped to the valid pixel range. The detail added at one octave is carried up to the
next. Objectives: `layer` (mean square of a layer's activations, the classic DeepDream), `class`
(a class logit) and `channel` (one channel of a layer). For the layer objectives the forward pass
stops at the chosen layer: what comes after it cannot change the objective, and the earlier the
layer, the cheaper the dream. Deterministic under `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

OBJECTIVES = ("layer", "class", "channel")


class _ReachedLayer(Exception):
    """Raised by the forward hook once the dreamed layer has run: the rest of the net is not needed."""


@dataclass(frozen=True)
class DreamConfig:
    layer: str | None = None  # module name; None: the last module with spatial output before the head
    objective: str = "layer"  # layer | class | channel
    target: int = 0  # class (objective "class") or channel (objective "channel")
    steps: int = 10  # gradient steps per octave
    step: float = 0.05  # step size, in normalised pixel units, after dividing the gradient by its mean magnitude
    octaves: int = 2  # scales, smallest first
    octave_scale: float = 1.4  # size ratio between octaves
    jitter: int = 2  # random roll, pixels
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"dream objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.steps < 1 or self.octaves < 1 or self.step <= 0:
            raise ValueError("dreams need steps >= 1, octaves >= 1 and step > 0")


def default_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The last module (in call order) whose output is a 4-d map: the deepest spatial features."""
    order: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, o)))
             for n, m in model.named_modules() if n and not list(m.children())]
    was_training = model.training
    model.eval()  # note: a forward pass in training mode would move batch-norm statistics
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    spatial = [n for n, o in order if isinstance(o, torch.Tensor) and o.dim() == 4]
    if not spatial:
        raise ValueError(f"{type(model).__name__} has no layer with a spatial output to dream with; pass layer=")
    return spatial[-1]


def dream(model: nn.Module, x: torch.Tensor, cfg: DreamConfig, lo: float, hi: float) -> torch.Tensor:
    """Dreamed versions of the normalised images x (B, C, H, W), clipped to [lo, hi]."""
    was_training = model.training
    model.eval()
    layer = cfg.layer or default_layer(model, x[:1])
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"unknown layer {layer!r}; some layers: {', '.join(list(modules)[1:8])}")
    acts: dict[str, torch.Tensor] = {}
    stop = cfg.objective != "class"  # a class logit needs the whole net

    def keep(module, inputs, output):
        acts["a"] = output
        if stop:
            raise _ReachedLayer

    hook = modules[layer].register_forward_hook(keep)
    gen = torch.Generator().manual_seed(cfg.seed)
    h, w = x.shape[-2:]
    sizes = [(max(4, round(h / cfg.octave_scale ** k)), max(4, round(w / cfg.octave_scale ** k)))
             for k in reversed(range(cfg.octaves))]
    detail = torch.zeros_like(_resize(x, sizes[0]))
    try:
        for size in sizes:
            base = _resize(x, size)
            d = _resize(detail, size)  # the detail dreamed at the smaller octave, carried up
            img = (base + d).detach()
            for _ in range(cfg.steps):
                dy, dx = (torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen).tolist()
                          if cfg.jitter else (0, 0))
                img = img.roll((dy, dx), dims=(2, 3)).requires_grad_(True)
                inp = _resize(img, (h, w))
                try:
                    logits = model(inp)
                except _ReachedLayer:
                    logits = None
                obj = _objective(cfg, acts["a"], logits)
                (g,) = torch.autograd.grad(obj.sum(), img)
                g = g / g.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)  # per image
                img = (img + cfg.step * g).detach().roll((-dy, -dx), dims=(2, 3)).clamp(lo, hi)
            detail = img - base
        out = (x + _resize(detail, (h, w))).clamp(lo, hi)
    finally:
        hook.remove()
        model.train(was_training)
    return out.detach()


def _resize(t: torch.Tensor, size) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)


def _objective(cfg: DreamConfig, act: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B,) what each image's dream maximises."""
    if cfg.objective == "layer":
        return act.pow(2).flatten(1).mean(1)
    if cfg.objective == "channel":
        return act[:, cfg.target].flatten(1).mean(1)
    return logits[:, cfg.target]


def objective_value(model: nn.Module, x: torch.Tensor, cfg: DreamConfig) -> torch.Tensor:
    """The objective on x, without changing x (for checking that a dream raised it)."""
    layer = cfg.layer or default_layer(model, x[:1])
    acts = {}
    hook = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            logits = model(x)
        return _objective(cfg, acts["a"], logits)
    finally:
        model.train(was_training)
        hook.remove()
