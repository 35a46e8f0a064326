"""Model registry and the baseline networks every idea is measured against.

`create_model(name, in_channels=, image_size=, num_classes=)` builds any registered model for a task;
each model takes its input shape from the task, never from a constant. A model may also be named by
an import path, `"package.module:Callable"`: any importable callable that returns an nn.Module (a
class or a factory), given the task's shape for the arguments it takes by those names.

A name read from a file (a run folder, a model file) is someone else's word: an import path in it
is imported only when the user trusts that module (`trust_model_source`, `--trust-model`, or the
environment variable FRUGAL_TRUST_MODELS, comma-separated), or named it themselves in this process.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .plugins import load_ideas

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TRANSFORMS: dict[str, Callable[..., Any]] = {}  # in-place changes a model spec may list after its build


def register_transform(name: str, fn: Callable[..., Any]) -> None:
    """Register an in-place model change (say saccade's `sparsify`) under a name, so that a spec's
    "transforms": [{"name": ..., "kw": {...}}] can rebuild a changed model. The change records
    itself in the model's `frugal_spec`."""
    _TRANSFORMS[name] = fn


def apply_transforms(model: nn.Module, transforms: Any) -> nn.Module:
    """Apply a spec's transforms to a freshly built model, in order."""
    load_ideas()
    for t in transforms or ():
        if t["name"] not in _TRANSFORMS:
            raise ValueError(f"unknown model transform {t['name']!r}; known: {', '.join(sorted(_TRANSFORMS)) or 'none'}")
        _TRANSFORMS[t["name"]](model, **t.get("kw", {}))
    return model


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name. Factories take keyword arguments
    in_channels, image_size (H, W), num_classes, and optionally more, each with a default."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


TRUST_ENV = "FRUGAL_TRUST_MODELS"  # comma-separated modules (or packages) whose models a file may name
_IMPORT_PATH = re.compile(r"([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*):([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)")


class UntrustedModelSource(ValueError):
    """A file names a model by an import path the user has not said they trust."""


def is_import_path(name: str) -> bool:
    return ":" in name


def trust_model_source(source: str) -> None:
    """Let files name models from a module (and the modules below it), given as 'mypkg.nets' or as a
    model's import path 'mypkg.nets:MyNet': the user vouches for the code that building them
    imports and runs. Child processes inherit it (through FRUGAL_TRUST_MODELS)."""
    module = source.split(":")[0]
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
        raise ValueError(f"{source!r} is not a module name like 'mypkg.nets'")
    have = _trusted_modules()
    if module not in have:
        os.environ[TRUST_ENV] = ",".join(have + [module])


def _trusted_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()]


def _trusted(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in _trusted_modules())


def model_factory(name: str, trusted: bool = True) -> Callable[..., nn.Module]:
    """The callable behind a model name: a registered model, or `module:attr` imported (only from a
    trusted module when `trusted` is False, i.e. the name comes from a file)."""
    if not is_import_path(name):
        if name not in list_models():
            raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}, or an import path "
                             "like 'mypkg.nets:MyNet'")
        return _MODELS[name]
    m = _IMPORT_PATH.fullmatch(name)
    if not m:
        raise ValueError(f"model {name!r} is not an import path like 'mypkg.nets:MyNet' (module, a colon, then "
                         "the callable)")
    module, attr = m.groups()
    if not trusted and not _trusted(module):
        raise UntrustedModelSource(
            f"the model is named by the import path {name!r}, and building it would run code from {module!r}; "
            f"frugal does that for a file only if you trust that module: pass --trust-model {module} (or set "
            f"{TRUST_ENV}={module}, or call frugal.models.trust_model_source({module!r}))")
    try:
        fn: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"model {name!r}: cannot import {module!r} ({e}); install it, or run from the folder "
                         "that holds it") from None
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"model {name!r}: {module!r} has no {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"model {name!r} is not callable; name a class or a function that returns an nn.Module")
    return fn


def import_path_of(model: nn.Module) -> str | None:
    """'module:QualName' of a model's class, if importing that finds the same class again (not a
    class defined in __main__ or inside a function)."""
    cls = type(model)
    if cls.__module__ == "__main__" or "<" in cls.__qualname__:
        return None
    try:
        found = model_factory(f"{cls.__module__}:{cls.__qualname__}")
    except ValueError:
        return None
    return f"{cls.__module__}:{cls.__qualname__}" if found is cls else None


def list_models() -> list[str]:
    load_ideas()
    return sorted(_MODELS)


def describe_model(name: str) -> str:
    """The first line of the model factory's docstring."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return (_MODELS[name].__doc__ or "").strip().split("\n")[0]


def create_model(name: str, *, in_channels: int = 1, image_size: tuple[int, int] = (28, 28),
                 num_classes: int = 10, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, limits: SizeLimits | None = None, **kw) -> nn.Module:
    """Build a registered model (or one named by an import path) for inputs of (in_channels,
    *image_size) and num_classes outputs. With `limits` (a spec read from someone else's file), an
    import path must be trusted (`trust_model_source`), and the model is first sized on the meta
    device and refused (ModelTooLarge) past a bound; a model that cannot be built on the meta
    device is built for real with the same bounds counted as it grows."""
    fn = model_factory(name, trusted=limits is None)
    if limits is not None:
        try:
            model_size(name, limits, in_channels=in_channels, image_size=image_size, num_classes=num_classes, **kw)
        except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count during the real build
            counter = _Counter(limits)
            with counter.counting():
                model = create_model(name, in_channels=in_channels, image_size=image_size,
                                     num_classes=num_classes, **kw)
            return model.to(device=device, dtype=dtype)
    size = _check_size(image_size)
    shape = dict(in_channels=in_channels, image_size=size, num_classes=num_classes)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: it is given the options alone
        params = {}
    allowed = {k for k, p in params.items() if p.kind != p.VAR_KEYWORD}
    passes_on = any(p.kind == p.VAR_KEYWORD for p in params.values())  # options for a model it wraps
    bad = [] if passes_on else sorted(set(kw) - allowed)
    if bad:
        raise ValueError(f"model {name!r} takes no option(s) {bad}; its options: "
                         f"{sorted(allowed - {'in_channels', 'image_size', 'num_classes'})}")
    if is_import_path(name):  # a user's callable takes the task's shape only where it asks for it by name
        shape = {k: v for k, v in shape.items() if k in params or passes_on}
        try:
            model = fn(**shape, **kw)
        except TypeError as e:  # the user's callable and the options given do not fit: name both
            raise ValueError(f"model {name!r} cannot be called with {sorted({**shape, **kw})}: {e}; give the options "
                             "it takes with --model-kw") from None
    else:
        model = fn(**shape, **kw)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
    # what rebuilds it: a model file written from this object records it (frugal.compress.save)
    model.frugal_spec = {"name": name, "in_channels": in_channels, "image_size": list(size),
                         "num_classes": num_classes, "kw": dict(kw)}
    return model.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class SizeLimits:
    """Bounds on a model built from a spec that someone else wrote (a run folder's config, a model
    file's header): `create_model(..., limits=)` refuses, before allocating anything, a model past
    any of them."""

    entries: int = 100_000_000  # floating-point entries of all parameters and buffers (400 MB as float32)
    tensors: int = 10_000  # parameters and buffers
    modules: int = 10_000  # sub-modules: bounds the time spent building one


class ModelTooLarge(ValueError):
    """A spec whose model would pass a `SizeLimits` bound."""


class _Counter:
    """Counts what nn.Module registers while a model is built, and stops the build (ModelTooLarge)
    the moment a bound is passed, so that a spec of 20,000 blocks costs no more than the bound."""

    def __init__(self, limits: SizeLimits):
        self.limits, self.entries, self.tensors, self.modules = limits, 0, 0, 0

    def on_module(self, module: nn.Module, name: str, sub: nn.Module | None) -> None:
        self.modules += sub is not None
        self._check()

    def on_tensor(self, module: nn.Module, name: str, t: torch.Tensor | None) -> None:
        if t is not None:
            self.tensors += 1
            self.entries += t.numel()
        self._check()

    def _check(self) -> None:
        lim = self.limits
        for what, n, bound in (("tensor entries", self.entries, lim.entries), ("tensors", self.tensors, lim.tensors),
                               ("modules", self.modules, lim.modules)):
            if n > bound:
                raise ModelTooLarge(f"the model would have more than {bound:,} {what} (the bound for a model "
                                    "built from a spec read from a file)")

    @contextlib.contextmanager
    def counting(self) -> Iterator["_Counter"]:
        from torch.nn.modules import module as m

        handles = [m.register_module_module_registration_hook(self.on_module),
                   m.register_module_parameter_registration_hook(self.on_tensor),
                   m.register_module_buffer_registration_hook(self.on_tensor)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def model_size(name: str, limits: SizeLimits = SizeLimits(), **create_kw) -> tuple[int, int]:
    """(tensors, entries) of the parameters and buffers `create_model(name, **create_kw)` would
    have, found by building it on the meta device (no memory for values); ModelTooLarge as soon as
    a bound is passed."""
    counter = _Counter(limits)
    with counter.counting(), torch.device("meta"):
        create_model(name, **create_kw)
    return counter.tensors, counter.entries


def _check_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (height, width), got {image_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


class InputCheck(nn.Module):
    """Fails early, with the expected shape, when a batch does not fit the model it was built for."""

    def __init__(self, in_channels: int, image_size: tuple[int, int]):
        super().__init__()
        self.expected = (in_channels, *image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.expected:
            raise ValueError(f"expected a batch of shape (N, {', '.join(map(str, self.expected))}), "
                             f"got {tuple(x.shape)}")
        return x

    def extra_repr(self) -> str:
        return f"expected=(N, {', '.join(map(str, self.expected))})"


# ---------------------------------------------------------------------------------------------------
# LeNet-5 (Caffe layout) and LeNet-300-100: the two nets the compression literature reports on.


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's MNIST example (conv 20, conv 50, fc 500), the layout used by Deep
    Compression (Han et al. 2016) and later compression papers: 431,080 parameters on 28x28."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int):
        super().__init__()
        self.check = InputCheck(in_channels, image_size)
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        h, w = image_size
        for _ in range(2):  # conv 5x5 (valid) then max-pool 2
            h, w = (h - 4) // 2, (w - 4) // 2
        if h < 1 or w < 1:
            raise ValueError(f"lenet5 needs images of at least 16x16, got {image_size}")
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check(x)
        x = F.max_pool2d(self.conv1(x), 2)  # Caffe's LeNet has no non-linearity after the convs
        x = F.max_pool2d(self.conv2(x), 2)
        x = x.flatten(1)  # (B, 50*h*w)
        return self.fc2(F.relu(self.fc1(x)))


@register_model
def lenet5(in_channels: int = 1, image_size: tuple[int, int] = (28, 28), num_classes: int = 10) -> nn.Module:
    """LeNet-5-Caffe (conv 20, conv 50, fc 500): 431,080 parameters on 28x28."""
    return LeNet5(in_channels, image_size, num_classes)


class MLP(nn.Module):
    """A fully connected net on the flattened image: LeNet-300-100 with hidden=(300, 100)."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 hidden: tuple[int, ...]):
        super().__init__()
        self.check = InputCheck(in_channels, image_size)
        dims = [in_channels * image_size[0] * image_size[1], *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check(x).flatten(1)  # (B, C*H*W)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


@register_model
def lenet300(in_channels: int = 1, image_size: tuple[int, int] = (28, 28), num_classes: int = 10) -> nn.Module:
    """LeNet-300-100 (LeCun et al. 1998): 784-300-100-10, 266,610 parameters on 28x28."""
    return MLP(in_channels, image_size, num_classes, hidden=(300, 100))


# ---------------------------------------------------------------------------------------------------
# A plain conv net for the large-canvas tasks (the dense baseline the attention models face).


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def conv_pool_stages(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv-BN-ReLU then 2x2 max-pool, once per width: [conv_bn, MaxPool2d] * len(widths)."""
    stages, cin = [], in_channels
    for cout in widths:
        stages += [conv_bn(cin, cout), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*stages)


class ConvNet(nn.Module):
    """conv-BN-ReLU stages, each followed by 2x2 max-pool, then global average pool and a linear
    classifier. Stages are added until the map is about 8 pixels across, so one definition serves
    28x28, 60x60 and 100x100 inputs."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 widths: tuple[int, ...]):
        super().__init__()
        self.check = InputCheck(in_channels, image_size)
        self.features = conv_pool_stages(in_channels, widths)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.check(x))  # (B, C, h, w)
        return self.head(x.mean(dim=(2, 3)))  # (B, C) -> (B, classes)


@register_model
def convnet(in_channels: int = 1, image_size: tuple[int, int] = (60, 60), num_classes: int = 10,
            width: int = 16) -> nn.Module:
    """Plain CNN: conv-BN-ReLU-pool stages of widths w, 2w, 4w, 4w, ..., one per halving, until the map is <= 8 across."""
    n_stages = max(2, min(5, (max(image_size) // 8 - 1).bit_length()))
    widths = tuple(width * min(2 ** i, 4) for i in range(n_stages))
    return ConvNet(in_channels, image_size, num_classes, widths)


# ---------------------------------------------------------------------------------------------------
# A small pre-activation-free ResNet (He et al. 2016, CIFAR variant) for Fashion-MNIST.


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 widths: tuple[int, ...], blocks: int):
        super().__init__()
        self.check = InputCheck(in_channels, image_size)
        self.stem = conv_bn(in_channels, widths[0])
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(self.check(x)))  # (B, C, h, w)
        return self.head(x.mean(dim=(2, 3)))  # (B, C) -> (B, classes)


@register_model
def resnet(in_channels: int = 1, image_size: tuple[int, int] = (28, 28), num_classes: int = 10,
           width: int = 16, blocks: int = 1) -> nn.Module:
    """ResNet with three stages of widths w, 2w, 4w and `blocks` basic blocks per stage
    (blocks=3 is ResNet-20 of He et al. 2016)."""
    return ResNet(in_channels, image_size, num_classes, (width, 2 * width, 4 * width), blocks)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
