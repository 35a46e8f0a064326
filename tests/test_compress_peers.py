import math

import numpy as np
import pytest
import torch
from scipy import stats

from frugal.coding.codecs import decode_tensor
from frugal.coding.learned import Learned, group_index, rdoq
from frugal.compress.peers import (Option, allocated_front, allocations, fisher, frugal_front, model_options,
                                   nncodec_decode, nncodec_encode, nncodec_front, nncodec_status, smallest_within,
                                   tensor_options)
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


def test_fisher_is_the_mean_squared_batch_gradient_of_a_softmax_regression():
    from frugal.data import Split

    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (40, 1, 2, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (40,), generator=g)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4))
    got = fisher(net, Split(raw, y), 0.5, 0.25, torch.device("cpu"), examples=40, batch_size=8)
    x = (raw.double() / 255 - 0.5) / 0.25  # the normalised images the net sees
    # independent reference: the cross-entropy's gradient by hand, (softmax - onehot)^T x / B per batch
    w, b = net[1].weight.detach().double(), net[1].bias.detach().double()
    want_w, want_b = torch.zeros_like(w), torch.zeros_like(b)
    for i in range(0, 40, 8):
        xb = x[i:i + 8].reshape(8, -1).double()
        err = torch.softmax(xb @ w.T + b, 1) - torch.nn.functional.one_hot(y[i:i + 8], 4).double()
        want_w += (err.T @ xb / 8) ** 2
        want_b += (err.mean(0)) ** 2
    torch.testing.assert_close(got["1.weight"].double(), want_w / 5, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got["1.bias"].double(), want_b / 5, rtol=1e-4, atol=1e-9)


def _opt(b, d):
    return Option(None, torch.zeros(1), b, d)


def test_allocations_walk_from_every_largest_option_to_every_smallest_on_the_pareto_front():
    import itertools

    g = np.random.default_rng(0)
    options = {}
    for t in range(3):  # convex fronts (distortion ~ 1 / bytes), plus dominated options
        sizes = sorted(g.choice(np.arange(10, 400), 6, replace=False))
        options[f"t{t}"] = [_opt(int(s), 1000.0 / s * (t + 1)) for s in sizes] + [_opt(500, 50.0)]
    path = allocations(options, points=100)
    totals = [(sum(o.bytes for o in c.values()), sum(o.distortion for o in c.values())) for c in path]
    assert totals == sorted(totals, key=lambda r: -r[0])
    assert all(d2 >= d1 for (_, d1), (_, d2) in zip(totals, totals[1:]))
    assert all(o.bytes == max(x.bytes for x in options[k] if x.bytes < 500) for k, o in path[0].items())
    assert all(o.bytes == min(x.bytes for x in options[k]) for k, o in path[-1].items())
    # independent reference: every allocation by brute force; on convex fronts no allocation has
    # fewer bytes and less distortion than a point of the path
    brute = [(sum(o.bytes for o in c), sum(o.distortion for o in c)) for c in itertools.product(*options.values())]
    for b, d in totals:
        assert not any(b2 <= b and d2 < d - 1e-9 for b2, d2 in brute)
    few = allocations(options, points=5)  # a sample of the path, its two ends kept
    assert 2 <= len(few) <= 5 and few[0] == path[0] and few[-1] == path[-1]


def test_allocated_files_decode_to_the_weights_whose_accuracy_they_report(digits_net, tmp_path):
    from frugal.compress.container import decode_model

    model, spec, data = digits_net
    opts = model_options(model, data, torch.device("cpu"), steps=(0.005, 0.05), alphas=(0.0, 1.0))
    assert set(opts) == {k for k, _ in model.named_parameters()}
    front = allocated_front(model, spec, data, torch.device("cpu"), opts, points=4)
    sizes = [p["bytes"] for p in front]
    assert 2 <= len(front) <= 4 and sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 2
    assert front[0]["test_acc"] > 0.8
    # the smallest allocation, written and read back, measures what the front says
    pick = allocations(opts, points=4)[-1]
    from frugal.compress.container import encode_model
    from frugal.train import evaluate

    m = copy_with(model, {k: o.decoded for k, o in pick.items()})
    blob = encode_model(m, spec, {k: o.codec for k, o in pick.items()})
    assert len(blob) == front[-1]["bytes"]
    back, _ = decode_model(blob)
    assert evaluate(back, data.test, data.mean, data.std, torch.device("cpu"))[0] == front[-1]["test_acc"]


def copy_with(model, state):
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict({**m.state_dict(), **state})
    return m


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
    tools = ("nncodec", "frugal none", "frugal allocated none")
    assert {p["tool"] for p in res["points"]} == set(tools)
    assert sum(p["tool"] != "frugal allocated none" for p in res["points"]) == 4
    assert {(w["margin_points"], w["tool"]) for w in res["within"]} == {(m, t) for m in (0.1, 0.5) for t in tools}
    # each tensor's own choice can match the shared step, so allocation is never worse within a margin
    best = {(w["margin_points"], w["tool"]): w["bytes"] for w in res["within"]}
    for m in (0.1, 0.5):
        if best[(m, "frugal none")] is not None:
            assert best[(m, "frugal allocated none")] is not None
    assert json.loads(out.read_text())["command"].startswith("python -m frugal.benchmarks.nncodec_compare")
    write_report(out.parent)
    md = (out.parent / "report.md").read_text()
    assert "## within" in md and "## points" in md and "nncodec" in md


def test_options_leave_out_steps_too_fine_to_code_and_keep_the_own_grid():
    from frugal.coding.codecs import KMeans

    w = torch.zeros(20, 10)
    w[0, :3] = torch.tensor([1e-30, 0.5, -0.25])  # a stray tiny value: its grid would be far too fine to code
    opts = tensor_options(w, torch.ones_like(w), [0.01, 1e-9], (0.0, 1.0), own=KMeans(3))
    assert opts and all(o.bytes == len(o.codec.encode(o.decoded)) for o in opts)
    assert min(o.distortion for o in opts) < 1e-6  # the own code keeps its values
