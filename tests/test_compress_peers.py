import math

import numpy as np
import pytest
import torch
from scipy import stats

from frugal.coding.codecs import decode_tensor
from frugal.coding.learned import Learned, group_index, rdoq
from frugal.compress.peers import (frugal_front, nncodec_decode, nncodec_encode, nncodec_front, nncodec_status,
                                   smallest_within)
from frugal.data import load_task
from frugal.train import TrainConfig, train

NO_NNCODEC = nncodec_status()


def _cost(c, q, step, params, lam):
    """Independent reference: squared error plus lam x bits under scipy's logistic mixture."""
    centre, logit, ls1, ls2 = params
    w = 1 / (1 + math.exp(-logit))
    mass = lambda s: stats.logistic.cdf(q + 0.5, centre, s) - stats.logistic.cdf(q - 0.5, centre, s)  # noqa: E731
    p = w * mass(math.exp(ls1)) + (1 - w) * mass(math.exp(ls2))
    return (c - q * step) ** 2 - lam * np.log2(p)


def test_rdoq_picks_the_cheapest_of_round_one_nearer_zero_and_zero():
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(40, 3, 3, generator=g, dtype=torch.float64) * 0.05
    groups = group_index((40, 1, 3, 3), "none", "tensor")
    density = torch.tensor([[0.0, 2.0, -1.0, 1.5]], dtype=torch.float64)
    step, lam = 0.01, 0.3 * 0.01 ** 2
    q = rdoq(coef, step, density, groups, lam).numpy()
    c = coef.numpy()
    r = np.round(c / step)
    options = np.stack([r, r - np.sign(r), np.zeros_like(r)])
    costs = np.stack([_cost(c, o, step, density[0].tolist(), lam) for o in options])
    np.testing.assert_allclose(_cost(c, q, step, density[0].tolist(), lam), costs.min(0), rtol=1e-9, atol=1e-15)
    # with this rate it moves some values towards zero, and the total cost falls
    assert (np.abs(q) <= np.abs(r)).all() and (q != r).any()
    assert _cost(c, q, step, density[0].tolist(), lam).sum() < _cost(c, r, step, density[0].tolist(), lam).sum()


def test_rd_coded_weights_are_what_their_file_decodes_to_and_cost_fewer_bytes():
    w = torch.distributions.Laplace(0.0, 0.02).sample((300, 40))
    plain, _ = Learned.rd_coded(w, 0.01, 0.0)
    code, decoded = Learned.rd_coded(w, 0.01, 1.0)
    data = code.encode(decoded)
    assert torch.equal(decode_tensor("learned", data, tuple(w.shape)), decoded)
    assert len(data) < len(plain.encode(w))
    assert (decoded - w).abs().max() <= 1.5 * 0.01 + 1e-6  # at most one step nearer zero than rounding


def test_smallest_within_takes_the_fewest_bytes_inside_the_margin():
    pts = [{"bytes": 100, "test_acc": 0.980}, {"bytes": 200, "test_acc": 0.989}, {"bytes": 300, "test_acc": 0.991}]
    assert smallest_within(pts, 0.990, 0.1)["bytes"] == 200
    assert smallest_within(pts, 0.990, 1.0)["bytes"] == 100
    assert smallest_within(pts, 0.999, 0.1) is None


@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
    cfg = TrainConfig(task="digits", model="lenet300", epochs=3, seed=0, device="cpu", optimizer="adam", lr=1e-3)
    res = train(cfg, tmp_path_factory.mktemp("peers") / "run", quiet=True, progress=False)
    spec = {"name": "lenet300", "in_channels": 1, "image_size": [8, 8], "num_classes": 10, "kw": {}}
    return res.model, spec, load_task("digits")


def test_frugal_front_files_shrink_with_the_step(digits_net):
    model, spec, data = digits_net
    pts = frugal_front(model, spec, data, torch.device("cpu"), steps=(0.002, 0.02, 0.2), alphas=(0.0,))
    sizes = [p["bytes"] for p in pts]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 3
    assert pts[0]["test_acc"] > 0.8


@pytest.mark.skipif(NO_NNCODEC is not None, reason=f"NNCodec missing: {NO_NNCODEC}")
def test_nncodec_codes_and_decodes_the_same_tensors(digits_net):
    model, _, data = digits_net
    tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    bs = nncodec_encode(tensors, -38)
    out = nncodec_decode(bs)
    assert set(out) == set(tensors)
    for k, v in tensors.items():
        assert out[k].shape == v.shape
        assert (out[k] - v).abs().max() < 0.01  # step 2^(-38/4) / 2 = 0.0007 for weights, finer for biases
    pts = nncodec_front(model, data, torch.device("cpu"), qps=(-44, -32))
    assert pts[0]["bytes"] > pts[1]["bytes"] and pts[0]["test_acc"] > 0.8
    import sys
    assert "nncodec.framework" not in sys.modules or getattr(sys.modules["nncodec.framework"], "__file__", None)


def test_a_missing_nncodec_is_named_with_its_install_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_nncodec(name, *a, **kw):
        if name.startswith("nncodec"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_nncodec)
    msg = nncodec_status()
    assert msg is not None and "pip install" in msg and "--no-deps" in msg


@pytest.mark.skipif(NO_NNCODEC is not None, reason=f"NNCodec missing: {NO_NNCODEC}")
def test_nncodec_compare_prints_both_fronts_as_rows_a_report_renders(tmp_path, capsys):
    import json

    from frugal.benchmarks import nncodec_compare
    from frugal.report import write_report

    cfg = TrainConfig(task="digits", model="lenet300", epochs=2, seed=0, device="cpu", optimizer="adam", lr=1e-3)
    train(cfg, tmp_path / "run", quiet=True, progress=False)
    out = tmp_path / "cmp" / "results.json"
    res = nncodec_compare.main(["--run", str(tmp_path / "run"), "--steps", "0.02", "0.08", "--alphas", "0",
                                "--qps", "-38", "-26", "--out", str(out)])
    capsys.readouterr()
    assert {p["tool"] for p in res["points"]} == {"nncodec", "frugal none"} and len(res["points"]) == 4
    assert {(w["margin_points"], w["tool"]) for w in res["within"]} == {
        (m, t) for m in (0.1, 0.5) for t in ("nncodec", "frugal none")}
    assert json.loads(out.read_text())["command"].startswith("python -m frugal.benchmarks.nncodec_compare")
    write_report(out.parent)
    md = (out.parent / "report.md").read_text()
    assert "## within" in md and "## points" in md and "nncodec" in md
