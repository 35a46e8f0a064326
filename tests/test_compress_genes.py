import pytest
import torch
import torch.nn.functional as F

from frugal.compress.genes import GeneratedWeight, fourier_features
from frugal.data import load_task
from frugal.models import create_model
from frugal.train import normalize


@pytest.mark.parametrize("kw, shape", [
    (dict(out_units=6, in_units=4, kernel=(3, 3)), (6, 4, 3, 3)),
    (dict(out_units=5, in_units=2 * 3 * 4, in_map=(2, 3, 4)), (5, 24)),
    (dict(out_units=7, in_units=9), (7, 9)),
    (dict(out_units=6, in_units=4, kernel=(3, 3), rank=4), (6, 4, 3, 3)),
    (dict(out_units=5, in_units=2 * 3 * 4, in_map=(2, 3, 4), rank=3), (5, 24)),
])
def test_generated_weights_have_the_layer_shape_and_a_sane_scale(kw, shape):
    torch.manual_seed(0)
    g = GeneratedWeight(**kw)
    w = g()
    assert w.shape == shape and torch.isfinite(w).all()
    fan_in = w[0].numel()
    assert 0.05 / fan_in ** 0.5 < w.std() < 20 / fan_in ** 0.5  # near a standard initialisation
    assert sum(p.numel() for p in g.parameters()) > 0


def test_input_units_of_a_map_follow_the_flatten_order():
    # units of one channel differ only by position; the generator must see (c, y, x) as flatten() lays it out
    torch.manual_seed(0)
    g = GeneratedWeight(3, 2 * 2 * 2, in_map=(2, 2, 2))
    with torch.no_grad():
        g.P.weight.zero_()  # no position: units of the same channel get the same weights
    w = g().detach()  # (3, 8); flatten order is c-major
    assert torch.equal(w[:, 0], w[:, 3]) and not torch.equal(w[:, 0], w[:, 4])


def test_fourier_features():
    f = fourier_features(torch.tensor([[0.5, -1.0]]), 2)
    assert f.shape == (1, 8)
    # per coordinate: sines then cosines at angular frequencies pi/2 and pi (periods 4 and 2)
    a = torch.tensor([0.5, -1.0])[:, None] * torch.tensor([torch.pi / 2, torch.pi])  # (2, 2)
    assert torch.allclose(f[0], torch.cat([a.sin(), a.cos()], dim=1).flatten(), atol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7])
def test_fourier_features_tell_every_grid_point_apart(n):
    # a 5x5 kernel's and a 4x4 map's two edges used to alias (features of period 2)
    f = fourier_features(torch.linspace(-1, 1, n)[:, None], 2)  # (n, 4)
    assert torch.cdist(f, f).add(torch.eye(n)).min() > 0.1


@pytest.mark.parametrize("rank", [None, 8])
def test_a_generated_layer_trains(rank):
    torch.manual_seed(0)
    data = load_task("digits")
    x = normalize(data.train.x[:256], data.mean, data.std).flatten(1)  # (256, 64)
    y = data.train.y[:256]
    g = GeneratedWeight(10, 64, in_map=(1, 8, 8), emb=4, hidden=16, rank=rank)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(x @ g().T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert sum(p.numel() for p in g.parameters()) < 640  # fewer than the weights it writes


@pytest.mark.parametrize("kw", [{}, {"rank": 32, "hidden": 64}])
def test_genes_lenet5_is_far_smaller_than_what_it_writes(kw):
    m = create_model("genes_lenet5", **kw)
    written = sum(w.numel() for w in m.written().values())
    generator = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("conv2_w", "fc1_w")))
    assert written == 425_000 and generator * 3 < written
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="in_map"):
        GeneratedWeight(2, 10, in_map=(2, 2, 2))


def test_the_factored_form_writes_a_weight_of_its_rank_from_a_shared_input_rule():
    torch.manual_seed(0)
    g = GeneratedWeight(12, 2 * 3 * 3, in_map=(2, 3, 3), rank=3, hidden=8)
    w = g().detach()  # (12, 18)
    assert torch.linalg.matrix_rank(w) == 3
    with torch.no_grad():
        g.P.weight.zero_()  # no position: the input units of one channel get the same column
    w = g().detach()
    assert torch.equal(w[:, 0], w[:, 8]) and not torch.equal(w[:, 0], w[:, 9])
    with pytest.raises(ValueError, match="rank"):
        GeneratedWeight(2, 3, rank=0)
