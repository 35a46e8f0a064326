import pytest
import torch
import torch.nn as nn
import zstandard

from frugal.measure import count_macs, fp32_bytes, param_counts, time_inference, weight_tensors, zstd_bytes
from frugal.models import create_model


def test_lenet5_macs_equal_the_hand_count():
    # conv1: 24*24 outputs x 20 maps x 5*5 taps; conv2: 8*8 x 50 x 20*5*5; fc1: 800*500; fc2: 500*10
    hand = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 20 * 25 + 800 * 500 + 500 * 10
    assert hand == 2_293_000
    assert count_macs(create_model("lenet5"), torch.randn(3, 1, 28, 28)) == hand


def test_lenet300_macs_equal_the_hand_count():
    assert count_macs(create_model("lenet300"), torch.randn(2, 1, 28, 28)) == 784 * 300 + 300 * 100 + 100 * 10


def test_macs_of_a_strided_grouped_conv():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
    # output 16 x 5 x 5, each output sums 8/4 input channels x 3 x 3 taps
    assert count_macs(conv, torch.randn(1, 8, 10, 10)) == 16 * 5 * 5 * 2 * 9


def test_known_model_gives_known_numbers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, :3] = 1.0
    total, nonzero = param_counts(model)
    assert total == 6 * 4 + 4 + 4 * 2 + 2
    assert nonzero == total - (6 * 4 - 3) - int((model[1].bias == 0).sum()) - int((model[3].weight == 0).sum()) \
        - int((model[3].bias == 0).sum())
    assert fp32_bytes(model) == 4 * total
    assert count_macs(model, torch.randn(5, 1, 2, 3)) == 6 * 4 + 4 * 2


def test_fp32_bytes_count_batchnorm_statistics_but_not_counters():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4))
    # conv 36 + bn weight, bias, running mean, running var 4 each; num_batches_tracked left out
    assert fp32_bytes(model) == 4 * (36 + 16)
    assert set(weight_tensors(model)) == {"0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"}


def test_zstd_bytes_is_the_length_of_a_real_encoding():
    model = nn.Linear(100, 100)
    raw = b"".join(t.numpy().astype("<f4").tobytes() for t in weight_tensors(model).values())
    blob = zstandard.ZstdCompressor(level=19).compress(raw)
    assert zstd_bytes(model) == len(blob)
    assert zstandard.ZstdDecompressor().decompress(blob) == raw
    with torch.no_grad():
        model.weight.zero_()
    assert zstd_bytes(model) < 1000  # 40 KB of zeros (plus 400 B of bias) compresses far


def test_time_inference_scales_with_work():
    small, big = nn.Linear(64, 64), nn.Linear(2048, 2048)
    t_small = time_inference(small, torch.randn(64, 64), repeats=10)
    t_big = time_inference(big, torch.randn(64, 2048), repeats=10)
    assert 0 < t_small < t_big


def test_corrupted_accuracy_on_a_suite_folder_matches_plain_evaluation(tmp_path):
    import numpy as np

    from frugal.data import load_task
    from frugal.measure import corrupted_accuracy
    from frugal.train import evaluate

    data = load_task("digits")
    torch.manual_seed(0)
    model = create_model("convnet", image_size=(8, 8)).eval()
    x = data.test.x.permute(0, 2, 3, 1).numpy()  # (N, H, W, 1), the MNIST-C layout
    for name, images in [("clean-s1", x), ("blank-s5", np.zeros_like(x))]:
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "test_images.npy", images)
        np.save(tmp_path / name / "test_labels.npy", data.test.y.numpy())
    acc = corrupted_accuracy(model, data, torch.device("cpu"), suite=f"folder:{tmp_path}")
    assert set(acc) == {"clean-s1", "blank-s5"}
    assert acc["clean-s1"] == evaluate(model, data.test, data.mean, data.std, torch.device("cpu"))[0]
    with torch.no_grad():
        blank_class = model(torch.full((1, 1, 8, 8), -data.mean / data.std)).argmax().item()
    assert acc["blank-s5"] == (data.test.y == blank_class).sum().item() / len(data.test)
    first = corrupted_accuracy(model, data, torch.device("cpu"), suite=f"folder:{tmp_path}", n=50)
    assert first["clean-s1"] == evaluate(model, data.test.subset(50), data.mean, data.std, torch.device("cpu"))[0]
    assert first["blank-s5"] == (data.test.y[:50] == blank_class).sum().item() / 50
    with pytest.raises(ValueError, match="n is the test images per corrupted split"):
        corrupted_accuracy(model, data, torch.device("cpu"), suite=f"folder:{tmp_path}", n=0)
