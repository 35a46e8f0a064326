import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn as nn

from frugal.kernels import SYMMETRIES, conv_free_parameters, constrain_conv, dct_basis, symmetry_basis
from frugal.models import create_model

# expected free values per k x k kernel, counted by hand (pixel orbits)
FREE = {(3, "lr"): 6, (3, "ud"): 6, (3, "lrud"): 4, (3, "c4"): 3, (3, "d4"): 3, (3, "radial"): 3,
        (5, "lr"): 15, (5, "ud"): 15, (5, "lrud"): 9, (5, "c4"): 7, (5, "d4"): 6, (5, "radial"): 6,
        (4, "lr"): 8, (4, "c4"): 4, (4, "d4"): 3}

TRANSFORMS = {  # the symmetry each kind must satisfy exactly
    "lr": [lambda w: w.flip(-1)], "ud": [lambda w: w.flip(-2)],
    "lrud": [lambda w: w.flip(-1), lambda w: w.flip(-2)],
    "c4": [lambda w: torch.rot90(w, 1, (-2, -1))],
    "d4": [lambda w: torch.rot90(w, 1, (-2, -1)), lambda w: w.flip(-1)],
    "radial": [lambda w: torch.rot90(w, 1, (-2, -1)), lambda w: w.flip(-1), lambda w: w.transpose(-1, -2)],
}


@pytest.mark.parametrize("k, kind", sorted(FREE))
def test_symmetric_kernels_are_exactly_symmetric_with_the_stated_free_values(k, kind):
    torch.manual_seed(0)
    conv = constrain_conv(nn.Conv2d(3, 4, k), kind)
    w = conv.weight
    for t in TRANSFORMS[kind]:
        assert torch.equal(t(w), w) or torch.allclose(t(w), w, atol=1e-7)
    assert conv_free_parameters(conv) == 3 * 4 * FREE[(k, kind)]
    assert symmetry_basis(k, kind).shape == (k * k, FREE[(k, kind)])


def test_radial_kernels_depend_only_on_the_distance():
    conv = constrain_conv(nn.Conv2d(1, 1, 7), "radial")
    w = conv.weight.detach()[0, 0]
    c = 3
    d2 = {}
    for y in range(7):
        for x in range(7):
            d2.setdefault((y - c) ** 2 + (x - c) ** 2, set()).add(round(float(w[y, x]), 6))
    assert all(len(v) == 1 for v in d2.values())
    assert conv_free_parameters(conv) == len(d2)


def test_dct_basis_matches_scipy():
    k = 5
    b = dct_basis(k, k * k)  # (k*k, k*k), all frequencies
    assert torch.allclose(b.T @ b, torch.eye(k * k, dtype=b.dtype), atol=1e-12)  # orthonormal
    w = np.random.default_rng(0).normal(size=(k, k))
    coef = (torch.from_numpy(w).flatten() @ b).numpy()  # (k*k,) in our zigzag order
    ref = scipy.fft.dctn(w, norm="ortho")
    order = sorted(((u, v) for u in range(k) for v in range(k)), key=lambda t: (t[0] + t[1], t[0]))
    np.testing.assert_allclose(coef, [ref[u, v] for u, v in order], atol=1e-12)
    conv = constrain_conv(nn.Conv2d(2, 2, 5), "dct3")
    assert conv_free_parameters(conv) == 2 * 2 * 3
    low = scipy.fft.dctn(conv.weight.detach().double().numpy(), axes=(-2, -1), norm="ortho")
    u, v = np.meshgrid(range(5), range(5), indexing="ij")
    assert np.abs(low[..., (u + v) >= 2]).max() < 1e-6  # only the 3 lowest frequencies are present


@pytest.mark.parametrize("rank", [1, 2])
def test_separable_kernels_have_the_rank_and_are_the_best_approximation(rank):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 5)
    w0 = conv.weight.detach().clone()
    constrain_conv(conv, f"rank{rank}")
    w = conv.weight.detach()
    assert int(torch.linalg.matrix_rank(w).max()) == rank
    assert conv_free_parameters(conv) == 3 * 4 * 2 * rank * 5
    U, S, Vh = torch.linalg.svd(w0.double())
    best = (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]  # Eckart-Young oracle
    torch.testing.assert_close(w.double(), best, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [*SYMMETRIES, "dct4", "rank1"])
def test_constraining_a_kernel_that_already_obeys_keeps_it(kind):
    torch.manual_seed(0)
    clean = constrain_conv(nn.Conv2d(2, 3, 5), kind).weight.detach().clone()
    conv = nn.Conv2d(2, 3, 5)
    with torch.no_grad():
        conv.weight.copy_(clean)
    torch.testing.assert_close(constrain_conv(conv, kind).weight.detach(), clean, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["d4", "dct3", "rank1", "lr"])
@pytest.mark.parametrize("base", ["lenet5", "resnet"])
def test_constrained_models_train_and_keep_their_init_scale(kind, base):
    torch.manual_seed(0)
    m = create_model("constrained", base=base, kind=kind)
    plain = create_model(base)
    assert conv_free_parameters(m) < conv_free_parameters(plain) or kind == "rank1"
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size[0] > 1]
    plain_convs = [c for c in plain.modules() if isinstance(c, nn.Conv2d) and c.kernel_size[0] > 1]
    for c, p in zip(convs, plain_convs):
        with torch.no_grad():
            assert 0.7 < float(c.weight.norm() / p.weight.norm()) < 1.4  # rescaled: the init keeps its variance


def test_bad_kinds_are_named():
    with pytest.raises(ValueError, match="unknown kernel kind 'hex'"):
        constrain_conv(nn.Conv2d(1, 1, 3), "hex")
    with pytest.raises(ValueError, match="rank 1..3"):
        constrain_conv(nn.Conv2d(1, 1, 3), "rank4")
    with pytest.raises(ValueError, match="1..9 DCT coefficients"):
        constrain_conv(nn.Conv2d(1, 1, 3), "dct10")
    with pytest.raises(ValueError, match="base must be a registered model"):
        create_model("constrained", base="constrained")


def test_a_constrained_run_saves_and_loads(tmp_path):
    from frugal.data import load_task
    from frugal.train import TrainConfig, evaluate, load_run, train

    cfg = TrainConfig(task="digits", model="constrained", model_kw={"base": "convnet", "kind": "d4"}, epochs=1,
                      device="cpu")
    res = train(cfg, tmp_path, quiet=True, progress=False)
    model, _, _ = load_run(tmp_path)
    data = load_task("digits")
    assert evaluate(model, data.test, data.mean, data.std, torch.device("cpu"))[0] == res.test_acc
    for c in (c for c in model.modules() if isinstance(c, nn.Conv2d)):
        w = c.weight.detach()
        assert torch.allclose(w, w.flip(-1), atol=1e-7)  # still symmetric after training and reloading


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 2), (2, 1)])
def test_layer_separable_conv_runs_as_two_thin_convs_with_the_same_result(stride, padding):
    torch.manual_seed(0)
    conv = constrain_conv(nn.Conv2d(6, 8, 5, stride=stride, padding=padding), "lsep4")
    x = torch.randn(2, 6, 13, 11)
    dense = nn.functional.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)  # oracle
    torch.testing.assert_close(conv(x), dense, atol=1e-5, rtol=1e-5)
    assert conv_free_parameters(conv) == 4 * 5 * (6 + 8)
    assert isinstance(conv, nn.Conv2d)


def test_layer_separable_at_full_rank_is_the_original_kernel_and_thin_layers_are_clamped():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    w0 = conv.weight.detach().clone()
    full = constrain_conv(conv, "lsep9")  # rank of (4*3) x (3*3) is at most 9
    torch.testing.assert_close(full.weight.detach(), w0, atol=1e-5, rtol=1e-5)
    thin = constrain_conv(nn.Conv2d(1, 20, 5), "lsep8")  # one input channel: rank <= 5
    assert thin.parametrizations.weight.original1.shape == (5, 1, 5)
    m = create_model("constrained", base="lenet5", kind="lsep8")
    assert sum(isinstance(c, nn.Conv2d) for c in m.modules()) == 2 and conv_free_parameters(m) == 3325


# group-tied kernels: the reference transforms, written out independently of frugal.kernels.group
def _rot(a, r):
    return torch.rot90(a, r, (-2, -1))


def _d4(a, g):  # element g: mirror left-right when g >= 4, then rotate g % 4 quarter turns
    return _rot(a.flip(-1) if g >= 4 else a, g % 4)


@pytest.mark.parametrize("kind, order", [("p4", 4), ("p4m", 8)])
def test_group_kinds_tie_each_orbit_of_channels_and_count_a_share_of_the_free_values(kind, order):
    torch.manual_seed(0)
    lift = constrain_conv(nn.Conv2d(2, 2 * order, 3, bias=False), kind, lifting=True)
    w = lift.weight.detach().reshape(2, order, 2, 3, 3)
    for g in range(order):  # every kernel of an orbit is its first kernel, transformed
        assert torch.equal(w[:, g], _d4(w[:, 0], g))
    assert conv_free_parameters(lift) == 2 * order * 2 * 9 // order
    conv = constrain_conv(nn.Conv2d(3 * order, 2 * order, 3, bias=False), kind)
    w = conv.weight.detach().reshape(2, order, 3, order, 3, 3)
    if kind == "p4":  # for output rotation t, input rotation s reads the free kernel of s - t, turned by t
        for t in range(4):
            for s in range(4):
                assert torch.equal(w[:, t, :, s], _rot(w[:, 0, :, (s - t) % 4], t))
    assert conv_free_parameters(conv) == 2 * order * 3 * order * 9 // order


@pytest.mark.parametrize("kind, order", [("p4", 4), ("p4m", 8)])
def test_a_group_tied_resnet_is_equivariant_to_rotations_and_mirrors(kind, order):
    # on 25 x 25 images every stride-2 grid is symmetric, so equivariance is exact through the net
    torch.manual_seed(0)
    m = create_model("constrained", base="resnet", kind=kind, image_size=(25, 25)).eval()
    assert conv_free_parameters(m) * order == conv_free_parameters(create_model("resnet", image_size=(25, 25)))
    x = torch.randn(3, 1, 25, 25)

    def orbits(img):  # pooled features, (B, features, group elements)
        return m.layers(m.stem(img)).mean(dim=(2, 3)).reshape(3, -1, order)

    f = orbits(x)
    for g in range(1, order):
        fg = orbits(_d4(x, g))
        # the transformed image gives the same orbits with their elements permuted, and not trivially
        perm = [next(s for s in range(order) if torch.allclose(fg[:, :, s], f[:, :, t], atol=1e-5))
                for t in range(order)]
        assert sorted(perm) == list(range(order))
        assert not torch.allclose(fg, f, atol=1e-3)


def test_group_kinds_keep_a_tied_weight_and_name_widths_that_do_not_divide():
    torch.manual_seed(0)
    clean = constrain_conv(nn.Conv2d(8, 8, 3), "p4").weight.detach().clone()
    conv = nn.Conv2d(8, 8, 3)
    with torch.no_grad():
        conv.weight.copy_(clean)
    torch.testing.assert_close(constrain_conv(conv, "p4").weight.detach(), clean, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="orbits of 4; this conv has 50 output channels"):
        create_model("constrained", base="lenet5", kind="p4")
    with pytest.raises(ValueError, match="ties whole channels"):
        from frugal.kernels import parametrization_for
        parametrization_for("p4m", 3)
