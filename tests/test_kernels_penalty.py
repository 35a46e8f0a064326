import pytest
import torch
import torch.nn as nn

from frugal.kernels.penalty import (GaussianMixturePrior, KernelPenalty, PenaltyConfig, SharedValues, conv_kernels,
                                    distinct_values, kernel_bytes, soft_histogram_entropy)
from frugal.train import TrainConfig, train


def hard_entropy(w, bins=64):
    h = torch.histc(w.detach(), bins=bins)
    p = h[h > 0] / h.sum()
    return float(-(p * p.log()).sum())


def test_soft_histogram_entropy_is_differentiable_and_clusters_values():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(2000))
    opt = torch.optim.Adam([w], lr=0.02)
    before = hard_entropy(w)
    for _ in range(150):
        loss = soft_histogram_entropy(w, bins=32)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(w.grad).all()
        opt.step()
    assert hard_entropy(w) < before - 0.5


def test_a_mixture_prior_learns_and_leaves_as_many_values_as_components():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(500) * 0.01, torch.randn(500) * 0.01 + 0.3, torch.randn(500) * 0.01 - 0.2])
    prior = GaussianMixturePrior(4, init_std=0.2)
    opt = torch.optim.Adam(prior.parameters(), lr=0.02)
    before = prior.nll(x).item()
    for _ in range(300):
        loss = prior.nll(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert prior.nll(x).item() < before
    q = prior.nearest_mean(x)
    assert q.unique().numel() <= 4
    assert (q - x).abs().max() < 0.1  # the clusters were found


def test_sharing_by_nearest_mean_keeps_values_a_broad_component_would_swallow():
    prior = GaussianMixturePrior(3)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([0.5, 0.2]))  # component 1 broad and likely, component 2 narrow
        prior.log_var.copy_(torch.tensor([0.01, 1.0, 0.001]).pow(2).log())
        prior.logits.copy_(torch.tensor([0.0, 3.0, 0.0]))
    x = torch.tensor([0.19, -0.3, 0.004, 0.9])
    assert prior.assign(x, by="responsibility").tolist() == [1, 1, 0, 1]
    nearest = [min(range(3), key=lambda k: abs(v - [0.0, 0.5, 0.2][k])) for v in x.tolist()]
    assert prior.assign(x).tolist() == nearest == [2, 0, 0, 1]
    assert prior.nearest_mean(x).tolist() == pytest.approx([0.2, 0.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="assign by must be one of"):
        prior.assign(x, by="closest")


@pytest.mark.parametrize("kind", ["entropy", "gmm"])
def test_penalty_hook_trains_a_net_to_fewer_bytes(tmp_path, kind):
    base = dict(task="digits", model="convnet", epochs=3, seed=0, device="cpu", optimizer="adam", lr=3e-3)
    plain = train(TrainConfig(**base), tmp_path / "plain", quiet=True, progress=False)
    hook = KernelPenalty(PenaltyConfig(kind=kind, weight=0.05 if kind == "entropy" else 2e-3))
    pen = train(TrainConfig(**base), tmp_path / kind, hooks=[hook], quiet=True, progress=False)
    assert hook.last != 0  # the penalty was in the loss (an NLL may be negative)
    if kind == "gmm":
        components = hook.quantize_to_mixture(pen.model)
        assert distinct_values(pen.model) <= 2 * 16  # two conv layers, 16 components each
        assert kernel_bytes(pen.model) < kernel_bytes(plain.model)
        shared = {n: c.weight.detach().clone() for n, c in conv_kernels(pen.model)}
        # fine-tune with the shared values tied; momentum and weight decay would pull them apart
        tune = TrainConfig(**{**base, "epochs": 1, "optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-3})
        tuned = train(tune, tmp_path / "tuned", model=pen.model, hooks=[SharedValues(components)], quiet=True,
                      progress=False).model
        for name, conv in conv_kernels(tuned):
            w, comp = conv.weight.detach(), components[name]
            assert (w[comp < 0] == 0).all()
            for c in comp.unique():
                if c >= 0:
                    assert w[comp == c].unique().numel() == 1  # one value per component
            assert not torch.equal(w, shared[name])  # and those values did train
    else:
        convs = [m.weight for m in pen.model.modules() if isinstance(m, nn.Conv2d)]
        plain_convs = [m.weight for m in plain.model.modules() if isinstance(m, nn.Conv2d)]
        assert sum(map(hard_entropy, convs)) < sum(map(hard_entropy, plain_convs))


def test_bad_penalty_settings():
    with pytest.raises(ValueError, match="penalty kind must be one of"):
        PenaltyConfig(kind="l1")
    with pytest.raises(ValueError, match="share_by must be one of"):
        PenaltyConfig(kind="gmm", share_by="mode")
    with pytest.raises(ValueError, match="quantize_to_mixture needs the gmm penalty"):
        KernelPenalty(PenaltyConfig(kind="entropy")).quantize_to_mixture(nn.Conv2d(1, 1, 3))
