"""Information penalties on conv kernels: differentiable terms that push each layer's kernel values
towards few distinct values, added to the training loss by a hook.

- `entropy`: the entropy of a soft histogram of the layer's values over fixed bins (each value
  spread over its nearby bins by a Gaussian of width `sigma` bins); lower when values cluster.
- `gmm`: soft weight sharing (Ullrich, Meeds & Welling 2017): the negative log-likelihood of the
  values under a learned mixture of Gaussians with one component pinned at 0; the mixture's means,
  widths and weights learn with the net. After training each value can be set to its component's
  mean (`quantize_to_mixture`), leaving as many distinct values as components, and the net
  fine-tuned with the values of each component moving together (`SharedValues`).

`distinct_values` and `kernel_bytes` measure the result: count of distinct values and the
length of the range-coded file of the conv kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.coding.tied import tied
from frugal.train import Hook, TrainState

KINDS = ("entropy", "gmm")
SHARE_BY = ("nearest", "responsibility")


def conv_kernels(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The convs with kernels of 2x2 or more (what the penalty and the snapping act on)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] >= 2]


def soft_histogram_entropy(w: torch.Tensor, bins: int = 64, sigma: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of a soft histogram of w's values over `bins` equal bins spanning +-3 std."""
    x = w.reshape(-1)
    scale = 3 * x.detach().std().clamp_min(1e-8)
    centres = torch.linspace(-1, 1, bins, device=x.device, dtype=x.dtype) * scale  # (bins,)
    width = sigma * 2 * scale / (bins - 1)
    a = torch.softmax(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2, dim=1)  # (n, bins)
    p = a.mean(0)
    return -(p * (p + 1e-12).log()).sum()


class GaussianMixturePrior(nn.Module):
    """A 1-D mixture: component 0 pinned at mean 0; means, log-variances and mixing logits learned."""

    def __init__(self, components: int = 16, init_std: float = 0.05):
        super().__init__()
        if components < 2:
            raise ValueError(f"a mixture needs at least 2 components, got {components}")
        self.means = nn.Parameter(torch.linspace(-2, 2, components - 1) * init_std)  # the non-zero ones
        self.log_var = nn.Parameter(torch.full((components,), math.log((init_std / 4) ** 2)))
        self.logits = nn.Parameter(torch.zeros(components))

    def all_means(self) -> torch.Tensor:
        return torch.cat([self.means.new_zeros(1), self.means])  # (K,)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the values x under the mixture."""
        mu, var = self.all_means(), self.log_var.exp()
        log_pi = F.log_softmax(self.logits, 0)
        ll = log_pi - 0.5 * (math.log(2 * math.pi) + self.log_var) - 0.5 * (x.reshape(-1, 1) - mu) ** 2 / var
        return -torch.logsumexp(ll, dim=1).mean()

    @torch.no_grad()
    def assign(self, x: torch.Tensor, by: str = "nearest") -> torch.Tensor:
        """Each value's component (0 is the one pinned at 0), shaped as x: the one with the nearest
        mean, or the most responsible one. The mixture tends to grow one broad component that
        catches every value no narrow one holds; by responsibility all those values get its single
        mean, which can wreck a net; by nearest mean each keeps the closest shared value."""
        if by not in SHARE_BY:
            raise ValueError(f"assign by must be one of {SHARE_BY}, got {by!r}")
        mu, flat = self.all_means(), x.reshape(-1, 1)  # (K,), (n, 1)
        if by == "nearest":
            return (flat - mu).abs().argmin(1).reshape(x.shape)
        ll = F.log_softmax(self.logits, 0) - 0.5 * self.log_var - 0.5 * (flat - mu) ** 2 / self.log_var.exp()
        return ll.argmax(1).reshape(x.shape)  # (n, K) -> x's shape

    @torch.no_grad()
    def nearest_mean(self, x: torch.Tensor, by: str = "nearest") -> torch.Tensor:
        """Each value replaced by the mean of its component (see `assign`)."""
        return self.all_means()[self.assign(x, by)]


@dataclass(frozen=True)
class PenaltyConfig:
    kind: str = "entropy"  # entropy | gmm
    weight: float = 1e-3  # multiplies the summed per-layer penalty in the loss
    bins: int = 64  # entropy: histogram bins per layer
    sigma: float = 1.0  # entropy: Gaussian spread of a value, in bins
    components: int = 16  # gmm: mixture components (0 included)
    prior_lr: float = 5e-3  # gmm: Adam learning rate of the mixture's parameters
    share_by: str = "nearest"  # gmm: a value's shared value is its nearest mean, or its most responsible component's

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"penalty kind must be one of {KINDS}, got {self.kind!r}")
        if self.weight < 0:
            raise ValueError(f"penalty weight must be >= 0, got {self.weight}")
        if self.share_by not in SHARE_BY:
            raise ValueError(f"share_by must be one of {SHARE_BY}, got {self.share_by!r}")


class KernelPenalty(Hook):
    """Adds weight x (sum over conv layers of the penalty) to the loss. For `gmm`, one mixture per
    layer, with its own optimizer stepped after the net's."""

    def __init__(self, cfg: PenaltyConfig = PenaltyConfig()):
        self.cfg = cfg
        self.priors: dict[str, GaussianMixturePrior] = {}
        self.prior_opt: torch.optim.Optimizer | None = None
        self.last: float = 0.0  # the penalty's value at the last step, for logs
        self._saved: dict[str, Any] | None = None  # a checkpoint's state, restored once the model is known

    def _ensure_priors(self, model: nn.Module) -> None:
        """One mixture per conv layer, restored from a checkpoint's state where there is one."""
        if self.cfg.kind != "gmm" or self.priors:
            return
        for name, conv in conv_kernels(model):
            std = float(conv.weight.detach().std())
            self.priors[name] = GaussianMixturePrior(self.cfg.components, std).to(conv.weight.device)
        self.prior_opt = torch.optim.Adam([p for m in self.priors.values() for p in m.parameters()],
                                          lr=self.cfg.prior_lr)
        if self._saved and self._saved.get("priors"):
            for k, sd in self._saved["priors"].items():
                self.priors[k].load_state_dict(sd)
            self.prior_opt.load_state_dict(self._saved["opt"])

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """weight x (sum over the conv layers of `model` of the penalty): a term to add to the loss in
        any training loop. For `gmm`, call `step()` after the optimizer's step (the mixtures learn
        from the same backward pass)."""
        self._ensure_priors(model)
        terms = []
        for name, conv in conv_kernels(model):
            w = conv.weight
            if self.cfg.kind == "entropy":
                terms.append(soft_histogram_entropy(w, self.cfg.bins, self.cfg.sigma))
            else:
                terms.append(self.priors[name].nll(w))
        if not terms:
            raise ValueError(f"{type(model).__name__} has no conv kernels of 2x2 or more to penalise")
        total = torch.stack(terms).sum()
        self.last = float(total.detach())
        return self.cfg.weight * total

    def step(self) -> None:
        """gmm: one step of the mixtures' own optimizer (after the net's step); entropy: nothing."""
        if self.prior_opt is not None:
            self.prior_opt.step()
            self.prior_opt.zero_grad(set_to_none=True)

    def extra_loss(self, state: TrainState, logits, x, y) -> torch.Tensor | None:
        if self.cfg.weight == 0:
            return None
        if state is None:
            raise TypeError("KernelPenalty.extra_loss is frugal.train's hook; in your own loop add penalty(model) "
                            "to the loss, and call penalty.step() after the optimizer's step")
        return self(state.model)

    def after_step(self, state: TrainState) -> None:
        self.step()

    def state_dict(self) -> dict[str, Any]:
        return {"priors": {k: m.state_dict() for k, m in self.priors.items()},
                "opt": self.prior_opt.state_dict() if self.prior_opt else None}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._saved = d

    @torch.no_grad()
    def quantize_to_mixture(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """gmm: set every kernel value to its component's mean (few distinct values per layer).
        For plain convs (a constrained conv's weight is computed, not stored). Returns each value's
        component per layer, -1 for the component pinned at 0, as `SharedValues` takes them."""
        if self.cfg.kind != "gmm":
            raise ValueError("quantize_to_mixture needs the gmm penalty")
        self._ensure_priors(model)
        components = {}
        for name, conv in conv_kernels(model):
            k = self.priors[name].assign(conv.weight, self.cfg.share_by)
            conv.weight.copy_(self.priors[name].all_means()[k])
            components[name] = k - 1  # the zero component becomes -1: held at exactly 0
        return components


class SharedValues(Hook):
    """Fine-tuning after weight sharing: the values of each conv kernel that share a component move
    together (their gradients averaged, then each value set to its component's mean after the step,
    so that momentum or weight decay cannot pull them apart); values of component -1 stay at 0.
    `components` maps conv names to a component index per value (`quantize_to_mixture`)."""

    def __init__(self, components: dict[str, torch.Tensor]):
        self.components = {k: v.detach().clone() for k, v in components.items()}

    def _weights(self, state: TrainState) -> list[tuple[torch.Tensor, torch.Tensor]]:
        convs = dict(conv_kernels(state.model))
        missing = set(self.components) - set(convs)
        if missing:
            raise ValueError(f"SharedValues was built for convs {sorted(missing)}, which this model does not have")
        return [(convs[n].weight, c.to(convs[n].weight.device)) for n, c in self.components.items()]

    @torch.no_grad()
    def after_backward(self, state: TrainState) -> None:
        for w, comp in self._weights(state):
            if w.grad is not None:
                w.grad.copy_(tied(w.grad, comp))

    @torch.no_grad()
    def after_step(self, state: TrainState) -> None:
        for w, comp in self._weights(state):
            w.copy_(tied(w, comp))

    def state_dict(self) -> dict[str, Any]:
        return {"components": self.components}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.components = d["components"]


def distinct_values(model: nn.Module) -> int:
    """Distinct values over all conv kernels, counted per layer and summed."""
    return sum(int(conv.weight.detach().unique().numel()) for _, conv in conv_kernels(model))


def kernel_bytes(model: nn.Module, k: int = 256) -> int:
    """Bytes of the conv kernels as range-coded shared values: exact where a layer has at most k
    distinct values (penalised, snapped or quantised kernels), else shared among k k-means values
    (near-lossless). The same code for every model, so the sizes compare."""
    from frugal.coding.codecs import KMeans  # the range-coded weight-sharing code

    return sum(len(KMeans(k).encode(conv.weight.detach())) for _, conv in conv_kernels(model))
