import pytest
import torch
import torch.nn.functional as F

from frugal.models import create_model
from frugal.saccade import GlimpseSensor, glimpse_boxes


def test_sensor_reads_exact_pixels_at_the_centre_and_pooled_ones_around():
    x = torch.arange(2 * 40 * 40, dtype=torch.float32).view(2, 1, 40, 40)
    sensor = GlimpseSensor(patch=4, scales=3)
    loc = torch.tensor([[0.0, 0.0], [-0.5, 0.25]])  # (x, y): the centre, and left of centre, a bit down
    out = sensor(x, loc)
    assert out.shape == (2, 3, 1, 4, 4)
    # example 0 looks at pixel (20, 20): scale 0 is the 4x4 block of pixels 18..21
    torch.testing.assert_close(out[0, 0, 0], x[0, 0, 18:22, 18:22])
    # scale 1: 8x8 pixels 16..23 averaged 2x2; scale 2: 16x16 pixels 12..27 averaged 4x4
    torch.testing.assert_close(out[0, 1, 0], F.avg_pool2d(x[0:1, :, 16:24, 16:24], 2)[0, 0])
    torch.testing.assert_close(out[0, 2, 0], F.avg_pool2d(x[0:1, :, 12:28, 12:28], 4)[0, 0])
    # example 1: centre column (-0.5 + 1) * 40 / 2 = 10, row (0.25 + 1) * 20 = 25
    torch.testing.assert_close(out[1, 0, 0], x[1, 0, 23:27, 8:12])


def test_sensor_reads_zeros_beyond_the_border():
    x = torch.ones(1, 1, 20, 20)
    out = GlimpseSensor(patch=4, scales=2)(x, torch.tensor([[1.0, 1.0]]))  # the bottom-right corner
    assert out[0, 0, 0, :2, :2].eq(1).all() and out[0, 0, 0, 2:, :].eq(0).all()
    assert 0 < out[0, 1].mean() < 1


def test_ram_trajectory_and_learning_signal():
    torch.manual_seed(0)
    model = create_model("ram", image_size=(60, 60), glimpses=4).train()
    x, y = torch.randn(8, 1, 60, 60), torch.randint(0, 10, (8,))
    logits = model(x)
    assert logits.shape == (8, 10) and model.trajectory.shape == (8, 4, 2)
    assert model.trajectory[:, 0].eq(0).all()  # the first glimpse is at the centre
    assert model.trajectory.abs().max() <= 1
    (F.cross_entropy(logits, y) + model.extra_loss(x, logits, y)).backward()
    assert model.locator.weight.grad.abs().sum() > 0  # REINFORCE reaches the location policy
    assert model.baseline.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        a, ta = model(x), model.trajectory.clone()
        assert torch.equal(model(x), a) and torch.equal(model.trajectory, ta)  # greedy path at test time
    assert model.extra_loss(x, a, y) is None


def test_glimpse_boxes_for_drawing():
    boxes = glimpse_boxes(torch.tensor([[0.0, 0.0], [1.0, -1.0]]), (60, 60), patch=12, scales=2)
    assert boxes[0] == [(24, 24, 12), (18, 18, 24)]
    assert boxes[1] == [(54, -6, 12), (48, -12, 24)]


def test_bad_sensor_settings():
    with pytest.raises(ValueError, match="patch and scales must be >= 1"):
        GlimpseSensor(patch=0)


def test_context_net_chooses_the_first_glimpse_and_is_trained_by_reinforce():
    torch.manual_seed(0)
    model = create_model("ram", image_size=(60, 60), glimpses=3, glimpse_net="conv", context=True).train()
    x, y = torch.randn(8, 1, 60, 60), torch.randint(0, 10, (8,))
    logits = model(x)
    assert model.trajectory.shape == (8, 3, 2)
    assert not model.trajectory[:, 0].eq(0).all()  # the first glimpse follows the coarse view
    assert model._log_probs.shape == (8, 3) and model._values.shape == (8, 4)  # the first location counts too
    (F.cross_entropy(logits, y) + model.extra_loss(x, logits, y)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        model(x)
        first = model.trajectory[:, 0].clone()
        model(x.flip(-1))
    assert not torch.allclose(first, model.trajectory[:, 0])  # it depends on the image


def test_bad_glimpse_net():
    with pytest.raises(ValueError, match="unknown glimpse_net 'mlp'"):
        create_model("ram", glimpse_net="mlp")
