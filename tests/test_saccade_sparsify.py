"""sparsify: a user's stride-1 convs gated by a block policy. The reference for every gated conv is
the dense F.conv2d of the same weights, kept on the chosen blocks only."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.saccade import GatedConv2d, gate_of, gateable, sparsify

BYO = Path(__file__).parent / "byo"


class PoolNet(nn.Module):
    """Two resolutions (16x16, then 8x8 after a pool), a grouped conv, a strided conv and a 1x1."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 5, padding=2, groups=4, bias=False)
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # strided: stays dense
        self.point = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.grouped(h))
        h = F.max_pool2d(h, 2)
        h = F.relu(self.point(h))
        return self.head(h.mean(dim=(2, 3))) + 0 * self.down(x).mean()


def _reference(net: PoolNet, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The same net computed densely, each gated conv's output zeroed outside the chosen blocks."""
    def mask(h, y):
        s = h.shape[-1] // levels.shape[-1]
        return y * levels.repeat_interleave(s, 1).repeat_interleave(s, 2)[:, None].to(y.dtype)

    h = F.relu(mask(x, F.conv2d(x, net.stem.weight, net.stem.bias, padding=1)))
    h = F.relu(mask(h, F.conv2d(h, net.grouped.weight, None, padding=2, groups=4)))
    h = F.max_pool2d(h, 2)
    h = F.relu(mask(h, F.conv2d(h, net.point.weight, net.point.bias)))
    return net.head(h.mean(dim=(2, 3))) + 0 * F.conv2d(x, net.down.weight, net.down.bias, stride=2, padding=1).mean()


def test_gated_convs_equal_the_dense_conv_kept_on_the_chosen_blocks():
    torch.manual_seed(0)
    net = PoolNet()
    x = torch.randn(6, 3, 16, 16)
    gate = sparsify(net, block_size=4, budget=0.5)
    assert gate.gated == ["stem", "grouped", "point"] and type(net.down) is nn.Conv2d
    assert isinstance(net.stem, GatedConv2d) and gate_of(net) is gate
    net.eval()
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            y = net(x.contiguous(memory_format=layout))
            levels = gate.attention.levels
            torch.testing.assert_close(y, _reference(net, x, levels), rtol=1e-5, atol=1e-5)
        gate.fixed_levels = (torch.rand(6, 4, 4) < 0.3).long()
        gate.fixed_levels[0] = 0  # an example with no block at all
        torch.testing.assert_close(net(x), _reference(net, x, gate.fixed_levels), rtol=1e-5, atol=1e-5)
        gate.fixed_levels = None
        gate.inference_fraction = 0.25  # each example's 4 most wanted of 16 blocks
        net(x)
        assert (gate.attention.levels.flatten(1).sum(1) == 4).all()
        gate.inference_fraction = None  # by default the budget's share: half of the 16
        net(x)
        assert (gate.attention.levels.flatten(1).sum(1) == 8).all()
        gate.adaptive = True  # the policy's own choice per block (at least min_blocks)
        net(x)
        logits = gate.attention.logits
        want = (logits[:, 1] > logits[:, 0]).long()
        assert torch.equal(gate.attention.levels, want) or int(want.flatten(1).sum(1).min()) == 0
        gate.adaptive = False
        gate.enabled = False  # the dense twin: the same weights, every conv whole
        assert torch.equal(net(x), _reference(net, x, torch.ones(6, 4, 4, dtype=torch.long)))


def test_training_masks_densely_and_every_part_gets_a_gradient():
    """The training pass has the value of the sparse pass with the same blocks, and the policy a
    gradient from both the task loss and the budget term."""
    torch.manual_seed(0)
    net = PoolNet()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    gate = sparsify(net, block_size=4, budget=0.25, budget_warmup=0)
    net.train()
    out = net(x)
    assert gate.attention.weights.requires_grad
    torch.testing.assert_close(out, _reference(net, x, gate.attention.levels), rtol=1e-5, atol=1e-5)
    F.cross_entropy(out, y).backward(retain_graph=True)
    task_grad = gate.policy.logits.weight.grad.clone()
    assert task_grad.abs().sum() > 0 and net.stem.weight.grad.abs().sum() > 0
    gate.policy.zero_grad()
    gate.loss().backward()
    assert gate.policy.logits.weight.grad.abs().sum() > 0 and int(gate.steps) == 1


def test_a_bare_loop_brings_the_share_of_blocks_down_to_the_budget():
    """Oracle: a plain PyTorch loop on digits with gate.loss(); the net starts attending ~90% of the
    blocks and ends near the 25% asked for, still far better than chance."""
    from frugal.data import load_task
    from frugal.train import normalize

    d = load_task("digits")
    x, y = normalize(d.train.x[:512], d.mean, d.std), d.train.y[:512]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    gate = sparsify(net, block_size=2, budget=0.25, budget_warmup=0.3, cost_weight=2.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gate.begin_run(40 * 8)
    net.eval()
    with torch.no_grad():
        net(x)
    start = gate.attended()
    for _ in range(40):
        net.train()
        for i in range(0, 512, 64):
            opt.zero_grad()
            (F.cross_entropy(net(x[i:i + 64]), y[i:i + 64]) + gate.loss()).backward()
            opt.step()
    assert gate.end_run() is None
    net.eval()
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert start > 0.8 and gate.attended() < 0.45 and acc > 0.5, (start, gate.attended(), acc)


def test_frugal_train_runs_the_gate_s_loss_and_a_run_folder_rebuilds_the_sparsified_net(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BYO))
    from frugal.models import create_model
    from frugal.train import TrainConfig, load_run, train

    net = create_model("usernets:TinyNet", in_channels=1, image_size=(8, 8), num_classes=10, width=6)
    gate = sparsify(net, block_size=2, budget=0.5, budget_warmup=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warm-up is a share of the run: it ends inside it, no warning
        res = train(TrainConfig(task="digits", model="usernets:TinyNet", model_kw={"width": 6}, epochs=2, lr=1e-2,
                                batch_size=64, device="cpu"), tmp_path / "run", model=net, quiet=True)
    assert int(gate.steps) == res.steps and gate.current_budget() == 0.5
    again, _, _ = load_run(tmp_path / "run")
    assert gate_of(again) is not None and gate_of(again).gated == gate.gated
    x = torch.randn(8, 1, 8, 8)
    net.eval()
    with torch.no_grad():
        assert torch.equal(again.eval()(x), net(x))


def test_what_cannot_be_gated_says_why():
    class MyConv(nn.Conv2d):
        pass

    assert "strided" in gateable(nn.Conv2d(3, 3, 3, stride=2, padding=1))
    assert "odd" in gateable(nn.Conv2d(3, 3, 2))
    assert "padding" in gateable(nn.Conv2d(3, 3, 3))
    assert "padding" in gateable(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    assert "subclass" in gateable(MyConv(3, 3, 3, padding=1))
    from frugal.kernels import constrain

    c = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
    constrain(c, "d4")
    assert "parametrized" in gateable(c[0])
    with pytest.raises(ValueError, match="nothing to sparsify"):
        sparsify(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2)))
    with pytest.raises(ValueError, match="cannot gate"):
        sparsify(PoolNet(), convs=["down"])
    with pytest.raises(ValueError, match="not modules"):
        sparsify(PoolNet(), convs=["nope"])
    net = PoolNet()
    gate = sparsify(net, block_size=5)
    with pytest.raises(ValueError, match="sparsified already"):
        sparsify(net)
    with pytest.raises(ValueError, match="does not divide the 16x16 input"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="width"):
        sparsify(PoolNet(), width=10 ** 6)
    assert gate.options["block_size"] == 5


def test_a_copy_calls_its_own_gate_and_a_sequential_still_runs():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    gate = sparsify(net, block_size=2)
    x = torch.randn(2, 1, 8, 8)
    net.train()
    net(x)  # leaves autograd tensors on the gate: a copy must not carry them
    twin = copy.deepcopy(net).eval()
    with torch.no_grad():
        out = twin(x)
    assert out.shape == (2, 4, 8, 8) and gate_of(twin) is not gate and gate_of(twin).attention is not None
    assert twin[0].gate is gate_of(twin)


def test_a_spec_s_transforms_are_checked_before_anything_is_built():
    from frugal.train import build_model

    spec = {"name": "convnet", "in_channels": 1, "image_size": [8, 8], "num_classes": 10,
            "transforms": [{"name": "sparsify", "kw": {"block_size": 2, "width": 10 ** 7}}]}
    with pytest.raises(ValueError, match="width"):
        build_model(spec, limits=__import__("frugal.models", fromlist=["SizeLimits"]).SizeLimits())
    with pytest.raises(ValueError, match="unknown model transform"):
        build_model({**spec, "transforms": [{"name": "exec", "kw": {}}]})
    with pytest.raises(ValueError, match="transforms"):
        build_model({**spec, "transforms": "sparsify"}, limits=__import__("frugal.models",
                                                                          fromlist=["SizeLimits"]).SizeLimits())
