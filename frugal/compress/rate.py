"""Training against the code length itself: each weight tensor is reparameterised as integers
times a learned step in a decorrelating form (each kernel's DCT), and the loss is the task loss
plus lam x the bits those integers cost under a learned density per group of coefficients (the
code of `frugal.coding.learned`, in the manner of entropy-penalised reparameterisation, Oktay et
al. 2020). The file is those integers range-coded under exactly that density: no mask, no
histogram, and zeros cost what the density says they cost.

- The forward pass sees the rounded integers (straight-through), so the net trains on the weights
  its file decodes to; the step gets the gradient of learned step-size quantisation (Esser et al.
  2020).
- The rate is measured on the integers plus uniform noise, which makes it differentiable in the
  coefficients, the step and the density, and at integers equals the discretised density's own
  -log2 P.
- Density parameters pass through float16 in the forward pass (straight-through), as the file
  stores them.

`learn_code(model, lam)` does it in place with `torch.nn.utils.parametrize` and returns the
`RateCode` (attached to the model as `frugal_code`; `frugal.train` adds its `extra_loss`). After
training, `baked(model)` gives the plain model and the `Learned` codec of each tensor, which
`frugal.compress.container.encode_model` writes.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from frugal.coding.codecs import Codec, Uniform, Units
from frugal.coding.learned import (GROUPINGS, MAX_LOG_SCALE, MIN_LOG_SCALE, Learned, bits, coefficients,
                                   group_index, init_density, weights)

CODE = "frugal_code"  # the RateCode's name on the model
TRANSFORM_KINDS = ("conv", "all", "none")  # which tensors are coded in the DCT domain: kernels (3+ dims), all, none
F16_MAX = 65504.0
KB_BITS = 8 * 1024
# The step and the densities are stored divided by this, so that under Adam (whose steps do not
# depend on a gradient's scale) they move this many times faster than the weights: at the weights'
# rate a step could grow only e-fold in 1,000 steps, and the densities would lag behind the integers.
CODE_LR_SCALE = 10.0


def _through_f16(p: torch.Tensor) -> torch.Tensor:
    """p as float16 holds it, with the gradient of the identity."""
    c = p.clamp(-F16_MAX, F16_MAX)
    return c + (c.half().to(p.dtype) - c).detach()


class QuantisedCode(nn.Module):
    """The parametrization of one tensor: the stored tensor (`original`) is its coefficients, the
    weight is the inverse transform of step x round(coefficients / step)."""

    def __init__(self, shape: tuple[int, ...], transform: str, grouping: str, step: float):
        super().__init__()
        self.shape, self.transform, self.grouping = tuple(shape), transform, grouping
        groups = group_index(self.shape, transform, grouping)
        self.register_buffer("groups", groups, persistent=False)
        self.log_step = nn.Parameter(torch.tensor(math.log(step) / CODE_LR_SCALE))
        self.density = nn.Parameter(init_density(int(groups.max()) + 1) / CODE_LR_SCALE)

    def step(self) -> torch.Tensor:
        return torch.exp(self.log_step * CODE_LR_SCALE)

    def density_params(self) -> torch.Tensor:
        """(G, 4) the densities' parameters as the file stores them (float16)."""
        return _through_f16(self.density * CODE_LR_SCALE)

    def forward(self, coef: torch.Tensor) -> torch.Tensor:
        step = self.step()
        q = coef / step
        q = q + (torch.round(q) - q).detach()
        return weights(q * step, self.shape, self.transform)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return coefficients(w, self.transform)

    def params(self) -> torch.Tensor:
        """(h, w, 4) each coefficient position's density parameters, as the file stores them."""
        d = self.density_params()
        d = torch.cat([d[:, :2], d[:, 2:].clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)], 1)
        return d[self.groups]

    def bits(self, coef: torch.Tensor, noise: bool) -> torch.Tensor:
        """The integers' code length under the density; with `noise`, at coef / step + U(-1/2, 1/2)."""
        y = coef / self.step()
        y = y + (torch.rand_like(y) - 0.5) if noise else torch.round(y)
        return bits(y, self.params().to(y.dtype))

    def codec(self) -> Learned:
        return Learned(float(self.step().detach()), self.density_params().detach().cpu().tolist(), self.transform,
                       self.grouping)

    @torch.no_grad()
    def summary(self, coef: torch.Tensor) -> dict[str, Any]:
        q = torch.round(coef / self.step())
        return {"values": q.numel(), "bits": float(self.bits(coef, noise=False)),
                "zeros": float((q == 0).float().mean()), "step": float(self.step()), "transform": self.transform}


class RateCode(nn.Module):
    """Every coded tensor of a model and the rate term: lam x (their bits / 8 x 1024), lam being what
    one kilobyte of file is worth in loss (nats per example, as the discrete loop's lam). lam rises
    linearly from 0 over the first `warmup` share of the run."""

    def __init__(self, lam: float, warmup: float):
        super().__init__()
        self.lam, self.warmup = lam, warmup
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.run_steps: int | None = None
        self.coded: list[tuple[str, str]] = []  # (module name, tensor name)
        self.__dict__["_model"] = None  # the model it codes: not a submodule (it is ours)

    def forward(self, x: Any) -> Any:
        """A pass-through: a coded nn.Sequential runs its modules in turn, this one last."""
        return x

    def begin_run(self, total_steps: int) -> None:
        self.run_steps = int(total_steps)

    def lam_now(self) -> float:
        if not self.warmup or self.run_steps is None:
            return self.lam
        return self.lam * min(1.0, int(self.steps) / max(1.0, self.warmup * self.run_steps))

    def codes(self) -> dict[str, tuple[nn.Module, QuantisedCode]]:
        """"module.tensor" -> (the ParametrizationList holding `original`, its QuantisedCode)."""
        named = dict(self.__dict__["_model"].named_modules())
        out = {}
        for mod, name in self.coded:
            plist = named[mod].parametrizations[name]
            out[f"{mod}.{name}" if mod else name] = (plist, plist[0])
        return out

    def total_bits(self, noise: bool = False) -> torch.Tensor:
        """All coded tensors' bits: at their integers (with gradients only with `noise`, as the loss
        takes them)."""
        with torch.set_grad_enabled(noise and torch.is_grad_enabled()):
            return sum(code.bits(plist.original, noise) for plist, code in self.codes().values())

    def extra_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not self.training:
            return None
        lam = self.lam_now()
        self.steps += 1
        if lam == 0:
            return None
        return lam * self.total_bits(noise=True) / KB_BITS

    @torch.no_grad()
    def fit(self, steps: int = 300, lr: float = 0.05) -> float:
        """Fit every density to its tensor's current integers (maximum likelihood, Adam); the bits after."""
        densities = [code.density for _, code in self.codes().values()]
        if not densities or steps <= 0:
            return float(self.total_bits())
        opt = torch.optim.Adam(densities, lr=lr)
        for _ in range(steps):
            with torch.enable_grad():
                opt.zero_grad()
                b = sum(code.bits(plist.original.detach(), noise=False) for plist, code in self.codes().values())
                b.backward()
            opt.step()
        return float(self.total_bits())

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per coded tensor: values, bits, share of zero integers, step, transform (where the bytes go)."""
        return {name: code.summary(plist.original) for name, (plist, code) in self.codes().items()}

    def codecs(self) -> dict[str, Learned]:
        """The state-dict name of each coded tensor in the plain model -> its codec."""
        return {name: code.codec() for name, (_, code) in self.codes().items()}


def _spread(w: torch.Tensor, transform: str) -> float:
    """The scale a tensor's first step is a share of: its coefficients' std, or for a constant tensor
    (a fresh batch norm's scales, all 1) its largest magnitude, or 1 for all zeros."""
    c = coefficients(w.detach().double().cpu(), transform)
    std = float(c.std()) if c.numel() > 1 else 0.0
    return std if std > 1e-6 else float(c.abs().max()) or 1.0


def learn_code(model: nn.Module, lam: float = 0.01, transform: str = "conv", grouping: str = "frequency",
               step: float = 0.1, warmup: float = 0.2, biases: bool = True, fit_steps: int = 300) -> RateCode:
    """Reparameterise every weight tensor of `model` (in place) for training against its code length.

    - `lam`: loss (nats per example) one kilobyte of file is worth; `warmup`: share of the run over
      which it rises from 0.
    - `transform`: which tensors are coded as DCT coefficients: "conv" (those of 3+ dimensions),
      "all" (fc matrices in blocks of up to 8x8 too), "none".
    - `grouping`: "frequency" (one density per DCT band u + v) or "tensor" (one density per tensor).
    - `step`: the initial step, in units of each tensor's coefficients' std.
    - `biases`: code 1-D parameters too (else they stay float32 in the file).
    - `fit_steps`: Adam steps fitting the densities to the starting integers.

    Buffers (batch-norm statistics) are not parameters: they stay float32 in the file."""
    if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if transform not in TRANSFORM_KINDS:
        raise ValueError(f"transform must be one of {TRANSFORM_KINDS}, got {transform!r}")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if not (isinstance(step, (int, float)) and 0 < step < 100):
        raise ValueError(f"step must be in (0, 100) stds, got {step!r}")
    if not (isinstance(warmup, (int, float)) and 0 <= warmup < 1):
        raise ValueError(f"warmup must be a share of the run in [0, 1), got {warmup!r}")
    if not isinstance(biases, bool):
        raise ValueError(f"biases must be true or false, got {biases!r}")
    if not isinstance(fit_steps, int) or not 0 <= fit_steps <= 10_000:
        raise ValueError(f"fit_steps must be an int in 0..10000, got {fit_steps!r}")
    if isinstance(getattr(model, CODE, None), RateCode):
        raise ValueError(f"{type(model).__name__} is coded already (it has a {CODE})")
    rate = RateCode(float(lam), float(warmup))
    targets = [(mod_name, mod, name) for mod_name, mod in model.named_modules()
               for name, p in list(mod._parameters.items())
               if p is not None and p.is_floating_point() and p.requires_grad and p.dim() >= (1 if biases else 2)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no weight tensor to code")
    for mod_name, mod, name in targets:
        w = getattr(mod, name).detach()
        kind = "dct" if transform == "all" or (transform == "conv" and w.dim() >= 3) else "none"
        kind = kind if w.dim() >= 2 else "none"
        code = QuantisedCode(tuple(w.shape), kind, grouping, step * _spread(w, kind)).to(w.device, w.dtype)
        parametrize.register_parametrization(mod, name, code)
        rate.coded.append((mod_name, name))
    model.add_module(CODE, rate)
    rate.__dict__["_model"] = model
    rate.fit(fit_steps)
    record = {"name": "learn_code", "kw": {"lam": float(lam), "transform": transform, "grouping": grouping,
                                           "step": float(step), "warmup": float(warmup), "biases": bool(biases),
                                           "fit_steps": 0}}  # a rebuilt model gets its densities from the weights file
    model.frugal_transforms = [*getattr(model, "frugal_transforms", []), record]
    spec = getattr(model, "frugal_spec", None)
    if isinstance(spec, dict):
        model.frugal_spec = {**spec, "transforms": [*spec.get("transforms", []), record]}
    return rate


def plain_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A model spec without its learn_code transform: what builds the plain model `baked` gives."""
    out = {**spec, "transforms": [t for t in spec.get("transforms", []) if t.get("name") != "learn_code"]}
    if not out["transforms"]:
        del out["transforms"]
    return out


def code_of(model: nn.Module) -> RateCode | None:
    r = getattr(model, CODE, None)
    return r if isinstance(r, RateCode) else None


@torch.no_grad()
def cheapest_exact(w: torch.Tensor, codec: Learned) -> Codec:
    """The shortest code that decodes to exactly what `codec` decodes `w` to: `codec` itself, the
    same integers under densities fitted to them (per band, or one per tensor: fewer parameters to
    store), or, for weights coded as they are, a histogram code (`uniform`, best for a small or
    all-zero bias); and each of those after cutting out the units left all zero (`Units`: two bit
    masks, then the block). Only the coding of the integers changes, never the weights."""
    target, size = codec.roundtrip(w)
    best, best_size = codec, size
    options: list[Codec] = [Learned.fitted(target, codec.step, codec.transform, g) for g in GROUPINGS]
    if codec.transform == "none":
        options.append(Uniform(codec.step))
    if w.dim() >= 2:  # the same, with the all-zero output and input units cut out first
        options += [Units(o) for o in (codec, *options)]
    for option in options:
        decoded, n = option.roundtrip(target)
        if n < best_size and torch.equal(decoded, target):
            best, best_size = option, n
    return best


@torch.no_grad()
def baked(model: nn.Module, cheapest: bool = True) -> tuple[nn.Module, dict[str, Codec]]:
    """(a plain copy of a coded model, the codec of each of its coded tensors): the copy's weights
    are exactly what those codecs decode to, and it has no parametrizations, no `frugal_code` and no
    learn_code transform in its record. With `cheapest`, each tensor's integers are coded by
    `cheapest_exact` (False: under the densities the run trained, as its loss counted them)."""
    rate = code_of(model)
    if rate is None:
        raise ValueError(f"{type(model).__name__} has no learned code (see learn_code)")
    codecs = rate.codecs()
    plain = copy.deepcopy(model)
    named = dict(plain.named_modules())
    # by hand: parametrize's own removal edits the class a deep copy shares with the original model
    values: dict[str, dict[str, torch.Tensor]] = {}
    for mod, name in rate.coded:
        values.setdefault(mod, {})[name] = getattr(named[mod], name).detach().clone()
    for mod, tensors in values.items():
        m = named[mod]
        m.__class__ = m.__class__.__bases__[0]  # the class parametrize derived from
        del m._modules["parametrizations"]
        for name, v in tensors.items():
            m.register_parameter(name, nn.Parameter(v))
    del plain._modules[CODE]
    params = dict(plain.named_parameters())
    for name, codec in codecs.items():
        p = params[name]
        p.copy_(codec.roundtrip(p.detach())[0])
        if cheapest:
            codecs[name] = cheapest_exact(p.detach(), codec)
    plain.frugal_transforms = [t for t in getattr(plain, "frugal_transforms", []) if t["name"] != "learn_code"]
    spec = getattr(plain, "frugal_spec", None)
    if isinstance(spec, dict):
        plain.frugal_spec = plain_spec(spec)
    return plain, codecs


def foldable(m: nn.Module) -> bool:
    """A batch norm with affine parameters and running statistics: what fold_batchnorm folds."""
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> dict[str, Codec]:
    """Fold, in place, every affine batch norm's running statistics into its weight and bias, and
    return the codecs that store the statistics left behind (mean 0 and variance 1 in every channel:
    a few bytes each).

    In eval mode y = w (x - m) / sqrt(v + eps) + b; with m' = 0, v' = 1, w' = w sqrt(1 + eps) /
    sqrt(v + eps) and b' = b - w m / sqrt(v + eps) the layer computes the same function, up to
    float rounding, and a file need not spend 32 bits on each statistic. What is folded is the eval
    function: training on from the folded net (batch statistics) is not the same training.
    Norms without affine parameters or running statistics are left as they are."""
    codecs = {}
    for name, m in model.named_modules():
        if not foldable(m):
            continue
        if parametrize.is_parametrized(m):
            raise ValueError(f"{name}: fold_batchnorm needs a plain net (bake a coded one first)")
        inv = torch.rsqrt(m.running_var.double() + m.eps)
        w, b = m.weight.double(), m.bias.double()
        m.bias.copy_((b - w * m.running_mean.double() * inv).to(m.bias.dtype))
        m.weight.copy_((w * inv * math.sqrt(1 + m.eps)).to(m.weight.dtype))
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
        prefix = f"{name}." if name else ""
        codecs[f"{prefix}running_mean"] = Uniform(1.0)
        codecs[f"{prefix}running_var"] = Uniform(1.0)
    return codecs


FOLD_RELATIVE_STEP = 2.0 ** -6  # a folded channel's output moves by at most about this share of its spread
FINEST_FOLD_STEP = 2.0 ** -16  # of a folded tensor's largest magnitude: its integers stay in a codable range


def fold_steps(bn: nn.modules.batchnorm._BatchNorm) -> tuple[float, float]:
    """(step of the folded weight, step of the folded bias) of an affine batch norm with running
    statistics, before it is folded.

    Channel c's output y = w_c (x - m_c) / sqrt(v_c + eps) + b_c spreads over about |w_c|. Folded, a
    step d on its weight moves y by about d sqrt(v_c + m_c^2) (the root mean square of its input x)
    and a step d on its bias by d, so the steps are FOLD_RELATIVE_STEP of the least of these scales
    over the channels. A step relative to the largest folded weight instead lets one channel with
    almost no variance (a dead one: its weight divided by sqrt(eps)) coarsen every other channel.
    Channels with w_c = 0 put out their bias whatever the step of the weight."""
    w = bn.weight.detach().double().abs()
    live = w > 0
    if not bool(live.any()):
        return 1.0, max(float(bn.bias.detach().abs().max()), 1e-6) * FOLD_RELATIVE_STEP
    spread = torch.sqrt(bn.running_var.double() + bn.running_mean.double() ** 2 + bn.eps)
    return (FOLD_RELATIVE_STEP * float((w / spread)[live].min()), FOLD_RELATIVE_STEP * float(w[live].min()))


@torch.no_grad()
def folded(model: nn.Module, codecs: dict[str, Codec]) -> dict[str, Codec]:
    """Fold the batch norms of a baked model (`fold_batchnorm`, in place) and return the codecs of
    the whole file: the folded statistics' few bytes, and each folded weight and bias (which left
    its trained grid) re-coded at its `fold_steps`, its weights set to what that code decodes to. A
    net without batch norms comes back unchanged."""
    steps = {name: fold_steps(m) for name, m in model.named_modules() if foldable(m)}
    stats = fold_batchnorm(model)
    if not stats:
        return codecs
    out = {**codecs, **stats}
    params = dict(model.named_parameters())
    for mod, mod_steps in steps.items():
        prefix = f"{mod}." if mod else ""
        for name, step in zip((f"{prefix}weight", f"{prefix}bias"), mod_steps):
            p = params[name]
            step = max(step, float(p.abs().max()) * FINEST_FOLD_STEP, 1e-12)
            code = Learned.fitted(p.detach(), step)
            p.copy_(code.roundtrip(p.detach())[0])
            out[name] = cheapest_exact(p.detach(), code)
    return out


__all__ = ["CODE", "QuantisedCode", "RateCode", "baked", "code_of", "fold_batchnorm", "fold_steps", "folded",
           "learn_code", "plain_spec"]
