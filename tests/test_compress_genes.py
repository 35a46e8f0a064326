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
    assert torch.allclose(f[0, :2], torch.sin(torch.tensor([0.5, 1.0]) * torch.pi))


def test_a_generated_layer_trains():
    torch.manual_seed(0)
    data = load_task("digits")
    x = normalize(data.train.x[:256], data.mean, data.std).flatten(1)  # (256, 64)
    y = data.train.y[:256]
    g = GeneratedWeight(10, 64, in_map=(1, 8, 8), emb=4, hidden=16)
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


def test_genes_lenet5_is_far_smaller_than_what_it_writes():
    m = create_model("genes_lenet5")
    written = sum(w.numel() for w in m.written().values())
    generator = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("conv2_w", "fc1_w")))
    assert written == 425_000 and generator * 3 < written
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="in_map"):
        GeneratedWeight(2, 10, in_map=(2, 2, 2))
