import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import fft, stats

from frugal.coding.codecs import codec_from_spec, decode_tensor, from_blocks
from frugal.coding.entropy import CodecError
from frugal.coding.learned import Learned, bits, block_shape, group_index, log_prob, n_groups, table
from frugal.compress.container import decode_model, encode_model
from frugal.compress.rate import KB_BITS, baked, code_of, learn_code, plain_spec
from frugal.data import load_task
from frugal.measure import measure
from frugal.train import Hook, TrainConfig, build_model, load_run, model_spec, train

CFG = dict(task="digits", model="convnet", seed=0, device="cpu", optimizer="adam", lr=3e-3, batch_size=64)


def _mixture_mass(q, centre, logit, ls1, ls2):
    """Independent reference: scipy's logistic CDF, mixed and differenced."""
    w = 1 / (1 + math.exp(-logit))
    m = lambda s: stats.logistic.cdf(q + 0.5, centre, s) - stats.logistic.cdf(q - 0.5, centre, s)  # noqa: E731
    return w * m(math.exp(ls1)) + (1 - w) * m(math.exp(ls2))


@pytest.mark.parametrize("params", [(0.0, 0.0, 0.0, 2.0), (0.3, 2.5, -1.5, 1.0), (-1.2, -1.0, 0.5, 3.0)])
def test_the_density_is_a_discretised_logistic_mixture(params):
    q = np.arange(-40, 41, dtype=np.float64)
    ours = torch.exp(log_prob(torch.from_numpy(q), torch.tensor(params, dtype=torch.float64))).numpy()
    ref = _mixture_mass(q, *params)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-15)
    wide = torch.arange(-5000, 5001, dtype=torch.float64)
    assert math.isclose(float(torch.exp(log_prob(wide, torch.tensor(params, dtype=torch.float64))).sum()), 1.0,
                        rel_tol=1e-9)
    # far in a tail the mass is tiny but its log stays finite (what the gradient needs)
    far = log_prob(torch.tensor([1e4], dtype=torch.float64), torch.tensor(params, dtype=torch.float64))
    assert torch.isfinite(far).all() and far.item() < -20


def _sparse(shape, seed=0, zeros=0.6, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    return w * (torch.rand(shape, generator=g) > zeros)


CASES = [((12, 6, 5, 5), "dct", "frequency"), ((12, 6, 3, 3), "none", "tensor"), ((40, 24), "dct", "frequency"),
         ((40, 24), "none", "tensor"), ((17,), "none", "tensor"), ((8, 4, 1, 1), "dct", "frequency")]


@pytest.mark.parametrize("shape,transform,grouping", CASES)
def test_decode_of_encode_is_the_integers_times_the_step_and_encoding_again_changes_nothing(shape, transform, grouping):
    w = _sparse(shape)
    g = n_groups(shape, transform, grouping)
    density = [[0.1 * i, 1.0, -0.5, 1.5 + 0.1 * i] for i in range(g)]
    codec = Learned(0.013, density, transform, grouping)
    data = codec.encode(w)
    out = decode_tensor("learned", data, shape)
    assert out.shape == w.shape and out.dtype == torch.float32
    # independent reference: scipy's orthonormal inverse DCT of the integers x step
    q = codec.integers(w).double() * codec.step
    ref = fft.idctn(q.numpy(), axes=(-2, -1), norm="ortho") if transform == "dct" else q.numpy()
    ref = from_blocks(torch.from_numpy(ref), shape).numpy()  # kernels, or fc blocks of up to 8x8, back in place
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-6)
    assert (out - w).abs().max() <= codec.step * (2 if transform == "dct" else 0.5) * math.prod(block_shape(shape)[1:])
    assert codec.encode(out) == data  # idempotent: the trained model is its file
    assert torch.equal(decode_tensor("learned", codec.encode(out), shape), out)
    # the spec rebuilds the same codec (it is what compression.json and `frugal compress` carry)
    assert codec_from_spec(json.loads(json.dumps(codec.spec()))) == codec


def test_the_density_travels_in_the_bytes():
    shape = (12, 6, 5, 5)
    w = _sparse(shape)
    groups = n_groups(shape, "dct", "frequency")
    a = Learned(0.02, [[0.0, 0.0, 0.0, 2.0]] * groups, "dct", "frequency")
    b = Learned(0.02, [[0.0, 3.0, -2.0, 2.0]] * groups, "dct", "frequency")
    da, db = a.encode(w), b.encode(w)
    assert da != db and len(da) >= 6 + 2 * 4 * groups  # step, kinds, and 4 float16 values per group
    # decoding needs only the bytes and the shape: each reads back its own density
    assert torch.equal(decode_tensor("learned", da, shape), decode_tensor("learned", db, shape))


def test_the_code_length_the_loss_uses_is_what_the_range_coder_writes():
    shape = (50, 20, 5, 5)
    w = _sparse(shape, zeros=0.8, scale=0.05)
    model = torch.nn.Conv2d(20, 50, 5, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    rate = learn_code(model, lam=0.1, step=0.3, fit_steps=400)
    (plist, code), = rate.codes().values()
    loss_bits = float(rate.total_bits())
    codec = code.codec()
    data = codec.encode(model.weight.detach())
    groups = n_groups(shape, "dct", "frequency")
    overhead = 6 + 1 + 8 * groups + 6 * groups + 5  # kinds, step, count, density, ranges, word count
    payload_bits = 8 * (len(data) - overhead)
    # the table's +1 counts cost at most K / 2^20 nats per value; the coder's last words up to 64 bits
    assert payload_bits <= loss_bits * (1 + 1e-3) + 8 * 6 * groups + 64, (payload_bits, loss_bits)
    assert payload_bits >= loss_bits * 0.97 - 64, (payload_bits, loss_bits)
    # and the loss's bits are those of the integers the forward pass uses
    q = torch.round(plist.original / code.step())
    with torch.no_grad():
        assert math.isclose(loss_bits, float(bits(q, code.params())), rel_tol=1e-6)


def test_damaged_bytes_are_refused_or_decode_to_the_right_shape():
    shape = (12, 6, 5, 5)
    w = _sparse(shape)
    codec = Learned(0.01, [[0.0, 1.0, -1.0, 2.0]] * n_groups(shape, "dct", "frequency"), "dct", "frequency")
    data = codec.encode(w)
    for cut in range(len(data)):  # every truncation is refused
        with pytest.raises(CodecError):
            decode_tensor("learned", data[:cut], shape)
    with pytest.raises(CodecError):
        decode_tensor("learned", data, (12, 6, 3, 3))  # another tensor's shape: another number of groups
    rng = np.random.default_rng(0)
    for _ in range(300):
        bad = bytearray(data)
        for i in rng.integers(0, len(bad), size=rng.integers(1, 4)):
            bad[i] = rng.integers(0, 256)
        try:
            out = decode_tensor("learned", bytes(bad), shape)
        except CodecError:
            continue
        assert out.shape == shape


def test_table_counts_do_not_hang_on_the_last_bits_of_exp():
    """Counts are floor(P 2^20) + 1: moving P by a few ulps (another platform's exp) changes none."""
    p = np.array([0.2, 1.1, -0.7, 2.3])
    counts = table(p, -30, 30)
    q = torch.arange(-30, 31, dtype=torch.float64)
    prob = torch.exp(log_prob(q, torch.from_numpy(p))).numpy()
    for eps in (1e-15, -1e-15):
        assert np.array_equal(np.floor(prob * (1 + eps) * (1 << 20)) + 1, counts)


@pytest.fixture(scope="module")
def coded_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("rate") / "run"
    cfg = TrainConfig(epochs=3, **CFG)
    data = load_task("digits")
    model = build_model(model_spec(cfg, data))
    rate = learn_code(model, lam=0.5, step=0.05)
    start = float(rate.total_bits())
    res = train(cfg, run, model=model, data=data, quiet=True, progress=False)
    return run, cfg, data, res, start


def test_training_against_the_code_length_shrinks_it_and_the_file_is_that_model(coded_run):
    run, cfg, data, res, start = coded_run
    rate = code_of(res.model)
    end = float(rate.total_bits())
    assert end < 0.85 * start  # lam 0.5 per kB: the rate term dominates even 66 steps
    assert res.test_acc > 0.5
    plain, codecs = baked(res.model, cheapest=False)  # the densities the run trained, as its loss counted
    assert set(codecs) == {n for n, p in plain.named_parameters()}  # every parameter is coded, biases too
    spec = plain_spec(json.loads((run / "config.json").read_text())["model_spec"])
    blob = encode_model(plain, spec, codecs)
    decoded, _ = decode_model(blob)
    row = measure(decoded, data, torch.device("cpu"), speed=False)
    assert row["test_acc"] == res.test_acc  # the file decodes to the weights the run trained
    # the file is the model's bits, each tensor's own header (its density included), the batch-norm
    # statistics as float32, and the file's header
    raw = sum(4 * b.numel() for b in plain.buffers() if b.is_floating_point())
    assert end / 8 + raw < len(blob) < end / 8 + raw + 40 * len(codecs) + 400
    # the cheapest exact codes: the same weights, no more bytes
    cheap, cheap_codecs = baked(res.model)
    cheap_blob = encode_model(cheap, spec, cheap_codecs)
    assert len(cheap_blob) <= len(blob)
    assert all(torch.equal(a, b) for a, b in zip(decode_model(cheap_blob)[0].state_dict().values(),
                                                 decoded.state_dict().values()))


def test_frugal_compress_and_eval_reproduce_a_coded_run(coded_run, tmp_path, capsys):
    from frugal.cli import main

    run, _, _, res, _ = coded_run
    f = tmp_path / "m.frugal"
    assert main(["compress", str(run), "-o", str(f), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {s["codec"] for s in out["codecs"].values()} <= {"learned", "uniform"}  # the cheapest exact codes
    assert main(["eval", str(f), "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_acc"] == res.test_acc and ev["reproduced"]
    model, _, _ = load_run(run)  # the run folder rebuilds the coded model (its spec lists the transform)
    assert code_of(model) is not None


def test_a_killed_coded_run_resumes_to_the_same_weights(tmp_path):
    cfg = TrainConfig(epochs=2, train_limit=512, **CFG)
    data = load_task("digits")

    def fresh():
        torch.manual_seed(1)
        model = build_model(model_spec(cfg, data))
        learn_code(model, lam=0.2)
        return model

    whole = train(cfg, tmp_path / "a", model=fresh(), data=data, quiet=True, progress=False)

    class Stop(Hook):
        def after_backward(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", model=fresh(), data=data, hooks=[Stop()], quiet=True, progress=False)
    resumed = train(cfg, tmp_path / "b", model=fresh(), data=data, hooks=[Hook()], resume=True, quiet=True,
                    progress=False)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_bare_pytorch_loop_trades_bytes_for_loss_by_lam():
    """The rate term in a plain loop: a larger lam ends with a smaller file, and the file decodes to
    the weights the loop's forward pass used."""
    data = load_task("digits")
    x = (data.train.x.float() / 255 - data.mean) / data.std
    y = data.train.y
    sizes = []
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(8 * 64, 10))
        rate = learn_code(net, lam=lam, warmup=0.0)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for epoch in range(4):
            for i in range(0, len(x), 64):
                logits = net(x[i:i + 64])
                loss = torch.nn.functional.cross_entropy(logits, y[i:i + 64])
                extra = rate.extra_loss(x[i:i + 64], logits, y[i:i + 64])
                loss = loss if extra is None else loss + extra
                opt.zero_grad()
                loss.backward()
                opt.step()
        plain, codecs = baked(net)
        with torch.no_grad():
            assert torch.allclose(plain(x[:256]), net(x[:256]), atol=1e-4)
        sizes.append(sum(len(codecs[n].encode(p)) for n, p in plain.named_parameters()))
    assert sizes[1] < 0.5 * sizes[0], sizes


def test_bad_settings_are_named():
    net = torch.nn.Linear(4, 2)
    for kw, match in ((dict(lam=-1), "lam"), (dict(transform="fft"), "transform"), (dict(grouping="row"), "grouping"),
                      (dict(step=0), "step"), (dict(warmup=1.5), "warmup"), (dict(biases="yes"), "biases"),
                      (dict(fit_steps=10**9), "fit_steps")):
        with pytest.raises(ValueError, match=match):
            learn_code(torch.nn.Linear(4, 2), **kw)
    learn_code(net)
    with pytest.raises(ValueError, match="coded already"):
        learn_code(net)
    assert KB_BITS == 8192
    assert group_index((3, 2, 5, 5), "dct", "frequency").max() == 8


def test_a_fitted_density_codes_about_as_well_as_the_tensors_own_histogram():
    from frugal.coding.codecs import Uniform

    g = torch.Generator().manual_seed(3)
    w = torch.distributions.Laplace(0.0, 0.02).sample((300, 80))
    w[torch.rand(w.shape, generator=g) < 0.7] = 0
    for step in (0.005, 0.02):
        fitted = Learned.fitted(w, step)
        assert torch.equal(decode_tensor("learned", fitted.encode(w), tuple(w.shape)), Uniform(step).roundtrip(w)[0])
        assert len(fitted.encode(w)) <= 1.03 * len(Uniform(step).encode(w))


def test_the_discrete_loop_can_choose_learned_codes(tmp_path):
    from frugal.compress.loop import CompressInTheLoop, LoopConfig

    hook = CompressInTheLoop(LoopConfig(every=1, lam=0.05, codecs=("learned",), steps=(0.1, 0.3)))
    res = train(TrainConfig(task="digits", model="lenet300", epochs=2, seed=0, device="cpu", optimizer="adam",
                            lr=1e-3), tmp_path / "run", hooks=[hook], quiet=True, progress=False)
    state = res.model.state_dict()
    kinds = {name: spec["codec"] for name, spec in hook.chosen.items() if state[name].dim() >= 2}
    assert kinds and set(kinds.values()) == {"learned"}
    for name, spec in hook.chosen.items():
        assert torch.equal(codec_from_spec(spec).roundtrip(state[name])[0], state[name]), name


def test_folded_batch_norms_compute_what_the_net_computed_and_store_their_statistics_in_bytes():
    import copy

    from frugal.compress.rate import fold_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 36, 5), nn.BatchNorm1d(5), nn.BatchNorm1d(5, affine=False))
    net.train()
    for _ in range(4):  # statistics far from 0 and 1
        net(torch.randn(16, 1, 6, 6) * 3 + 1)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 2.0)
            nn.init.normal_(m.bias)
    net.eval()
    x = torch.randn(8, 1, 6, 6) * 3 + 1
    folded = copy.deepcopy(net)
    codecs = fold_batchnorm(folded)
    assert set(codecs) == {"1.running_mean", "1.running_var", "5.running_mean", "5.running_var"}
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)  # the reference: the net unfolded
    torch.testing.assert_close(folded[6].running_var, net[6].running_var)  # no affine: left as it was
    sizes = {k: len(c.encode(dict(folded.named_buffers())[k])) for k, c in codecs.items()}
    assert max(sizes.values()) <= 16  # against 4 bytes a channel raw
    for k, c in codecs.items():
        t = dict(folded.named_buffers())[k]
        assert torch.equal(c.decode(c.encode(t), tuple(t.shape)), t)


def test_a_coded_net_with_batch_norms_is_folded_into_a_file_that_decodes_to_it():
    from frugal.compress.rate import folded

    data = load_task("digits")
    x = (data.train.x.float() / 255 - data.mean) / data.std
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 64, 10))
    rate = learn_code(net, lam=0.1, warmup=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for i in range(0, 1024, 64):  # batch statistics far from 0 and 1
        loss = torch.nn.functional.cross_entropy(net(x[i:i + 64]), data.train.y[i:i + 64])
        loss = loss + rate.extra_loss(None, None, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    plain, codecs = baked(net)
    unfolded = plain(x[:256]).detach()
    codecs = folded(plain, codecs)
    assert {"1.running_mean", "1.running_var", "1.weight", "1.bias"} <= set(codecs)
    spec = {"name": "x"}
    blob = encode_model(plain, spec, codecs)
    raw = encode_model(plain, spec, {k: c for k, c in codecs.items() if "running" not in k})
    assert len(raw) > len(blob)  # 16 statistics no longer raw
    back = copy_of(plain)
    decode_model(blob, model=back)
    for k, v in plain.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k  # the file is exactly the folded net
    with torch.no_grad():  # which computes what the trained net computed, to the folded code's precision
        out = plain(x[:256])
        assert (out - unfolded).abs().max() < 0.05 * unfolded.abs().max()
        assert (out.argmax(1) == unfolded.argmax(1)).float().mean() > 0.98


def test_a_dead_channel_does_not_coarsen_the_other_channels_of_a_folded_batch_norm():
    """Each live channel's folded output stays within FOLD_RELATIVE_STEP of its spread, although one
    channel has next to no variance (its conv weights are all zero), so its folded weight is huge."""
    from frugal.compress.rate import FOLD_RELATIVE_STEP, folded

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    with torch.no_grad():
        conv.weight[2].zero_()  # channel 2 is dead: its input is always 0
        x = torch.randn(64, 3, 8, 8) * 2 + 0.5
        h = conv(x)
        bn.running_mean.copy_(h.mean((0, 2, 3)))
        bn.running_var.copy_(h.var((0, 2, 3)))
        bn.weight.copy_(torch.tensor([0.3, 1.0, 0.8, 2.0, 0.05, 1.5]))
        bn.bias.copy_(torch.randn(6))
    net = nn.Sequential(conv, bn).eval()
    with torch.no_grad():
        exact = net(x)
        codecs = folded(net, {})
        out = net(x)
    w = net[1].weight.detach().abs()
    assert w[2] > 100 * torch.cat([w[:2], w[3:]]).max()  # the dead channel's folded weight
    rms = (out - exact).pow(2).mean((0, 2, 3)).sqrt()
    spread = torch.tensor([0.3, 1.0, 0.8, 2.0, 0.05, 1.5])
    live = torch.tensor([True, True, False, True, True, True])
    assert (rms[live] <= FOLD_RELATIVE_STEP * spread[live]).all(), (rms, spread)
    assert rms[~live].max() <= FOLD_RELATIVE_STEP * 0.05  # the dead channel puts out its bias
    for name in ("1.weight", "1.bias"):  # each coded exactly as it decodes
        t = dict(net.named_parameters())[name].detach()
        assert torch.equal(codecs[name].decode(codecs[name].encode(t), tuple(t.shape)), t)


def copy_of(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("transform,grouping", [("none", "tensor"), ("dct", "frequency")])
def test_a_learned_code_with_dead_units_cut_out_decodes_to_the_same_weights_in_fewer_bytes(transform, grouping):
    from frugal.coding.codecs import Units
    from frugal.compress.rate import cheapest_exact

    g = torch.Generator().manual_seed(3)
    w = torch.zeros(60, 30, 3, 3)
    w[::7, ::4] = torch.randn(9, 8, 3, 3, generator=g) * 0.1  # 9 live output units, 8 live inputs
    code = Learned.fitted(w, 0.01, transform, grouping)
    target = code.roundtrip(w)[0]
    units = Units(code)
    data = units.encode(target)
    back = decode_tensor("units", data, tuple(w.shape))
    assert torch.equal(back, target)  # the reference: the learned code alone
    assert torch.equal(decode_tensor("units", units.encode(back), tuple(w.shape)), back)
    assert len(data) < 0.8 * len(code.encode(target))
    assert codec_from_spec(json.loads(json.dumps(units.spec()))) == units
    assert isinstance(cheapest_exact(target, code), Units)
    zero = torch.zeros(4, 3, 3, 3)  # nothing live: no block to code
    assert torch.equal(decode_tensor("units", Units(code).encode(zero), (4, 3, 3, 3)), zero)
    damaged = bytearray(Units(code).encode(zero))
    damaged[0] = 2  # claims a learned block where every unit is dead
    with pytest.raises(CodecError):
        decode_tensor("units", bytes(damaged), (4, 3, 3, 3))
