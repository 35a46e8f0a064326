import dataclasses

import pytest
import torch
import torch.nn as nn

from frugal.kernels import constrain_conv
from frugal.kernels.snapping import (CLASSES, FreezeKernels, class_free_values, project, residuals, snap,
                                 snapped_kernel_bytes)
from frugal.train import TrainConfig, train


class OneConv(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv


@pytest.mark.parametrize("cls", ["lr", "d4", "radial", "rank1", "blur"])
def test_projection_is_idempotent_and_clean_kernels_have_zero_residual(cls):
    torch.manual_seed(0)
    w = torch.randn(3, 2, 5, 5)
    p = project(w, cls)
    torch.testing.assert_close(project(p, cls), p, atol=1e-6, rtol=1e-6)
    assert residuals(p)[cls].max() < 1e-10


@pytest.mark.parametrize("kind, cls", [("d4", "d4"), ("lr", "lr"), ("rank1", "rank1"), ("radial", "radial")])
def test_a_symmetric_kernel_plus_small_noise_snaps_back_to_its_class(kind, cls):
    torch.manual_seed(0)
    clean = constrain_conv(nn.Conv2d(4, 6, 5), kind).weight.detach().clone()
    noisy = clean + 0.02 * clean.std() * torch.randn_like(clean)
    conv = nn.Conv2d(4, 6, 5)
    with torch.no_grad():
        conv.weight.copy_(noisy)
    res = snap(OneConv(conv), threshold=0.01)
    assert res.snapped_fraction == 1.0
    # every kernel went to the simplest class that fits; a d4 kernel also fits lr, but d4 is simpler
    assert all(class_free_values(5, c) <= class_free_values(5, cls) for c in res.counts)
    assert (conv.weight.detach() - clean).norm() < (noisy - clean).norm()  # the noise was (mostly) removed
    assert res.free_after < res.free_before


def test_nothing_snaps_below_its_residual():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 5)
    w0 = conv.weight.detach().clone()
    res = snap(OneConv(conv), threshold=1e-6)  # random kernels are far from every class
    assert res.counts == {"free": 64} and torch.equal(conv.weight.detach(), w0)


def test_frozen_kernels_do_not_move_while_the_rest_fine_tunes(tmp_path):
    torch.manual_seed(0)
    base = dict(task="digits", model="convnet", seed=0, device="cpu", optimizer="adam", lr=3e-3, weight_decay=1e-3)
    res = train(TrainConfig(epochs=2, **base), tmp_path / "a", quiet=True, progress=False)
    model = res.model
    result = snap(model, threshold=0.2)
    assert 0 < result.snapped_fraction < 1
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    before = [c.weight.detach().clone() for c in convs]
    hook = FreezeKernels(model, result)
    train(TrainConfig(epochs=1, **base), tmp_path / "b", model=model, hooks=[hook], quiet=True, progress=False)
    for c, b, classes in zip(convs, before, result.classes.values()):
        frozen = torch.from_numpy(classes != "free")
        assert torch.equal(c.weight.detach()[frozen], b[frozen])  # exactly held
        assert not torch.equal(c.weight.detach()[~frozen], b[~frozen])  # the others learnt
    assert snapped_kernel_bytes(model, result) < snapped_kernel_bytes(model)


def test_classes_are_known():
    assert set(CLASSES) >= {"lr", "ud", "lrud", "c4", "d4", "radial", "rank1", "blur"}
    with pytest.raises(ValueError, match="unknown kernel class 'hex'"):
        project(torch.zeros(1, 1, 3, 3), "hex")


def test_a_later_round_keeps_what_an_earlier_round_snapped():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 5)
    net = OneConv(conv)
    first = snap(net, threshold=0.4)  # random 5x5 kernels: lr residual about 10/25
    w1 = conv.weight.detach().clone()
    held = torch.from_numpy(first.classes["conv"] != "free")
    assert 0 < held.sum() < 36
    second = snap(net, threshold=0.7, earlier=first)
    assert (second.classes["conv"][held.numpy()] == first.classes["conv"][held.numpy()]).all()
    assert torch.equal(conv.weight.detach()[held], w1[held])
    assert second.snapped_fraction >= first.snapped_fraction and second.free_after <= first.free_after


def test_kernels_bench_method_runs_every_route_and_draws_kernels(tmp_path):
    import json

    from frugal.bench import BenchConfig, bench

    cfg = BenchConfig(out=str(tmp_path), budget="tiny", methods=("kernels",), tasks=("digits",), seeds=1, device="cpu")
    # a part of the plan first: one constrained kind and the last snapping round (which needs the plain
    # net and the round before it, but gives no rows for them)
    bench(dataclasses.replace(cfg, variants=("constrained d4", "snap 0.[5-9]")), log=lambda s: None)
    part = {r["variant"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(part) == {"constrained d4", "snap 0.5"}
    runs = tmp_path / "runs" / "kernels" / "digits"
    assert (runs / "plain-seed0").is_dir() and (runs / "snap-0.2-seed0").is_dir()
    assert not (runs / "constrained-lr-seed0").exists()

    bench(cfg, log=lambda s: None)  # the whole plan: the part's runs are reloaded, its rows replaced
    all_rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    rows = {r["variant"]: r for r in all_rows}
    assert len(all_rows) == len(rows)
    assert rows["constrained d4"]["test_acc"] == part["constrained d4"]["test_acc"]
    assert set(rows) == {"plain", "plain width 8", "constrained lr", "constrained d4", "constrained p4",
                         "penalty gmm 0.001", "snap 0.2", "snap 0.5"}
    plain = rows["plain"]
    # the narrow control has about as few free conv values as p4 (a quarter), and far fewer multiply-adds
    assert 0.9 < rows["plain width 8"]["conv_free_params"] / rows["constrained p4"]["conv_free_params"] < 1.1
    assert 4 * rows["constrained p4"]["conv_free_params"] < 1.1 * plain["conv_free_params"]
    assert rows["plain width 8"]["macs"] < 0.5 * rows["constrained p4"]["macs"] == 0.5 * plain["macs"]
    assert rows["constrained d4"]["conv_free_params"] < rows["constrained lr"]["conv_free_params"] < \
        plain["conv_free_params"]
    assert rows["snap 0.2"]["snapped_fraction"] <= rows["snap 0.5"]["snapped_fraction"]
    assert rows["snap 0.5"]["conv_free_params"] < plain["conv_free_params"]
    assert rows["penalty gmm 0.001"]["kernel_bytes"] < plain["kernel_bytes"]
    md = (tmp_path / "report.md").read_text()
    assert "kernels-digits-plain.png" in md and "kernels-digits-snapped.png" in md and "kernels snapped" in md
    for key in ("conv_free_params", "kernel_bytes"):  # accuracy against the method's own measures
        assert f"(kernels_acc_vs_{key}.png)" in md and (tmp_path / f"kernels_acc_vs_{key}.png").stat().st_size > 1000
