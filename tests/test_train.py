import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from frugal.train import (CHECKPOINT, WEIGHTS, Hook, TrainConfig, TrainingDiverged, augment_batch, load_run,
                          lr_factor, train)

DIGITS = dict(task="digits", model="convnet", batch_size=64, lr=3e-3, device="cpu")


def test_training_learns_digits_and_writes_a_run_folder(tmp_path):
    res = train(TrainConfig(epochs=3, **DIGITS), tmp_path / "run", quiet=True)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.test_acc > 0.5  # chance is 0.1
    for name in ("config.json", "metrics.json", WEIGHTS, CHECKPOINT, "log.txt"):
        assert (tmp_path / "run" / name).exists(), name
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["config"]["epochs"] == 3 and "torch" in meta["versions"]
    model, cfg, metrics = load_run(tmp_path / "run")
    assert cfg == res.config and metrics["test_acc"] == res.test_acc
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]), k


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, signal
    from frugal.train import Hook, TrainConfig, train

    class KillAt(Hook):
        # a real kill, mid-epoch, after the checkpoint of the previous epoch was written
        def after_backward(self, state):
            if str(state.epoch) == os.environ.get("KILL_AT_EPOCH"):
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(task="digits", model="convnet", epochs=3, batch_size=64, lr=3e-3, device="cpu",
                      threads=1, augment="shift")
    train(cfg, sys.argv[1], hooks=[KillAt()], resume=len(sys.argv) > 2, quiet=True)
""")


def _run(script, *args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)


def test_resume_after_a_kill_ends_with_the_same_result(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _run(KILL_SCRIPT, str(full)).returncode == 0
    p = _run(KILL_SCRIPT, str(killed), env_extra={"KILL_AT_EPOCH": "2"})
    assert p.returncode == -signal.SIGKILL
    assert (killed / CHECKPOINT).exists() and not (killed / WEIGHTS).exists()
    assert torch.load(killed / CHECKPOINT, weights_only=False)["epochs_done"] == 2
    p = _run(KILL_SCRIPT, str(killed), "--resume")
    assert p.returncode == 0, p.stderr
    a, b = load_file(full / WEIGHTS), load_file(killed / WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert ma["test_acc"] == mb["test_acc"]
    assert [r["val_loss"] for r in ma["epochs"]] == [r["val_loss"] for r in mb["epochs"]]


class NanAt(Hook):
    def __init__(self, step):
        self.step = step

    def extra_loss(self, state, logits, x, y):
        return torch.tensor(float("nan")) if state.step == self.step else None


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(epochs=3, **DIGITS)
    steps = -(-int(0.9 * 1497) // 64)  # steps per epoch on digits' training split
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2.*last good checkpoint \(epoch 1\)"):
        train(cfg, tmp_path, hooks=[NanAt(steps + 3)], quiet=True)
    ck = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert ck["epochs_done"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_hooks_are_called_at_their_points(tmp_path):
    calls = []

    class Rec(Hook):
        def after_backward(self, s):
            assert all(p.grad is not None for p in s.model.parameters())
            calls.append("b")

        def after_step(self, s):
            calls.append(f"s{s.step}")  # after the optimizer's step, before the step counter moves

        def before_eval(self, s):
            calls.append("e")

        def end_of_epoch(self, s):
            calls.append(f"end{s.epoch}")

    train(TrainConfig(epochs=2, train_limit=128, **DIGITS), tmp_path, hooks=[Rec()], quiet=True)
    # 2 steps per epoch, before_eval before each validation and before the final test
    assert calls == ["b", "s0", "b", "s1", "e", "end0", "b", "s2", "b", "s3", "e", "end1", "e"]


def test_resume_refuses_a_different_config(tmp_path):
    train(TrainConfig(epochs=1, train_limit=64, **DIGITS), tmp_path, quiet=True)
    with pytest.raises(ValueError, match=r"config differs .*'lr': '0.003 -> 0.01'"):
        train(TrainConfig(epochs=1, train_limit=64, **{**DIGITS, "lr": 0.01}), tmp_path, resume=True, quiet=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(epochs=1, train_limit=64, **DIGITS), tmp_path, quiet=True)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        train(TrainConfig(epochs=1, **DIGITS), tmp_path, resume=True, quiet=True)


def test_a_damaged_checkpoint_is_reported(tmp_path):
    train(TrainConfig(epochs=1, train_limit=64, **DIGITS), tmp_path, quiet=True)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="damaged"):
        train(TrainConfig(epochs=1, train_limit=64, **DIGITS), tmp_path, resume=True, quiet=True)

def test_epoch_size_draws_a_fresh_subset_without_repeats_each_epoch(tmp_path):
    seen = []

    class Rec(Hook):
        def extra_loss(self, s, logits, x, y):
            while len(seen) <= s.epoch:
                seen.append([])
            seen[s.epoch] += [tuple(row.tolist()) for row in x.flatten(1)]

    res = train(TrainConfig(epochs=2, epoch_size=100, **DIGITS), tmp_path, hooks=[Rec()], quiet=True)
    assert res.steps == 2 * 2  # ceil(100 / 64) steps per epoch
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4
    for epoch in seen:
        assert len(epoch) == len(set(epoch)) == 100  # 100 examples, none twice
    assert set(seen[0]) != set(seen[1])  # a new subset each epoch


@pytest.mark.parametrize("bad, msg", [
    (dict(optimizer="lbfgs"), "unknown optimizer 'lbfgs'"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(augment="mixup"), "unknown augment 'mixup'"),
    (dict(schedule="step"), "unknown schedule 'step'"),
    (dict(epoch_size=0), "epoch_size must be >= 1"),
])
def test_bad_config_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**bad)


def test_unknown_config_field():
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['lerning_rate'\]"):
        TrainConfig.from_dict({"lerning_rate": 0.1})


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(epochs=2, warmup_epochs=0.5, schedule="cosine")
    f = [lr_factor(cfg, s, 10) for s in range(20)]
    assert f[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f[5] == 1.0 and all(a >= b for a, b in zip(f[5:], f[6:])) and f[-1] < 0.02


def test_shift_augmentation_moves_content_without_changing_it():
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 3:5, 3:5] = 255
    out = augment_batch(x, "shift", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out.sum(dim=(1, 2, 3)) == x.sum(dim=(1, 2, 3))).all()  # a 2x2 blob shifted <= 2 px stays inside
    assert not torch.equal(out, x)


def test_affine_noise_augmentation_is_seeded_and_keeps_the_digit_in_place():
    from frugal.train import affine_noise

    x = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10:18, 10:18] = 255  # a centred square
    a = affine_noise(x, torch.Generator().manual_seed(0), noise=0.0)
    b = affine_noise(x, torch.Generator().manual_seed(0), noise=0.0)
    assert torch.equal(a, b) and not torch.equal(a, x.float())
    ys = torch.arange(28, dtype=torch.float32)
    centre_y = (a.sum(3)[:, 0] * ys).sum(1) / a.sum((1, 2, 3))
    assert ((centre_y - 13.5).abs() < 3).all()  # rotated, scaled, shifted by at most a few pixels
    noisy = affine_noise(x, torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 255 and (noisy - a).std() > 10


def test_init_from_starts_a_run_from_another_runs_weights(tmp_path):
    mlp = {**DIGITS, "model": "lenet300"}  # no batch-norm statistics to move
    base = train(TrainConfig(epochs=2, **mlp), tmp_path / "base", quiet=True)
    # at a negligible learning rate the fine-tuned run stays where the base run ended
    tuned = train(TrainConfig(epochs=1, init_from=str(tmp_path / "base"), **{**mlp, "lr": 1e-12}),
                  tmp_path / "tuned", quiet=True)
    assert tuned.test_acc == pytest.approx(base.test_acc, abs=1e-9)
    assert "initialised" in (tmp_path / "tuned" / "log.txt").read_text()
    # the twin and the fine-tuned run moved together: the run still resumes (init_from only set epoch 0)
    (tmp_path / "base").rename(tmp_path / "moved")
    again = train(TrainConfig(epochs=1, init_from=str(tmp_path / "moved"), **{**mlp, "lr": 1e-12}),
                  tmp_path / "tuned", resume=True, quiet=True)
    assert again.test_acc == tuned.test_acc


def test_init_weights_from_copies_what_matches_and_refuses_what_does_not(tmp_path):
    from frugal.models import create_model
    from frugal.train import init_weights_from
    train(TrainConfig(task="digits", model="blockcnn", epochs=1, train_limit=64, device="cpu"), tmp_path / "twin",
          quiet=True)
    twin, _, _ = load_run(tmp_path / "twin")
    sacc = create_model("saccadic", image_size=(8, 8), block_size=4)
    loaded = init_weights_from(sacc, tmp_path / "twin")
    assert "stages.0.weight.0" in loaded and "fc.weight" in loaded
    assert not any(k.startswith("policy.") or k.endswith(".1") for k in loaded)  # the twin has neither
    for k in loaded:
        assert torch.equal(sacc.state_dict()[k], twin.state_dict()[k]), k
    with pytest.raises(ValueError, match="no tensor .* matches"):
        init_weights_from(create_model("lenet300", in_channels=1, image_size=(8, 8)), tmp_path / "twin")
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        init_weights_from(sacc, tmp_path / "nowhere")


def test_example_weights_give_the_weighted_loss_and_zero_weights_count_for_nothing(tmp_path):
    from frugal.data import Split, TaskData, load_task

    d = load_task("digits")
    a = d.train.subset(128)
    wrong = Split(a.x, (a.y + 1) % 10, torch.zeros(128))  # the same images, wrong labels, weight 0
    both = Split(torch.cat([a.x, wrong.x]), torch.cat([a.y, wrong.y]), torch.cat([torch.ones(128), wrong.w]))

    def one_step(split, run):  # one full batch: BatchNorm's batch statistics of A and of A twice are the same
        data = TaskData(d.name, split, d.val, d.test, d.num_classes, d.mean, d.std)
        # sgd: an update proportional to the gradient (Adam's first step, about lr x sign(g), would
        # magnify float rounding in the near-zero gradients)
        cfg = TrainConfig(**{**DIGITS, "batch_size": 256, "optimizer": "sgd", "lr": 0.1}, epochs=1,
                          schedule="constant")
        return dict(train(cfg, tmp_path / run, data=data, quiet=True).model.named_parameters())

    plain, weighted = one_step(a, "plain"), one_step(both, "weighted")
    for name, p in plain.items():
        torch.testing.assert_close(weighted[name], p, rtol=1e-4, atol=1e-6)
    both_heavy = Split(both.x, both.y, torch.cat([torch.ones(128), torch.ones(128)]))  # the wrong labels count
    heavy = one_step(both_heavy, "heavy")
    assert not all(torch.allclose(heavy[name], p, rtol=1e-4, atol=1e-6) for name, p in plain.items())


@pytest.mark.parametrize("w", [torch.ones(3), -torch.ones(4), torch.ones(4, dtype=torch.int64),
                               torch.tensor([1.0, float("nan"), 1.0, 1.0])])
def test_bad_example_weights_are_refused(w):
    from frugal.data import Split

    with pytest.raises(ValueError, match="Split.w must be finite float weights >= 0"):
        Split(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), w)


def test_a_run_folder_being_trained_by_another_process_is_refused(tmp_path):
    from frugal.train import TRAIN_LOCK
    from frugal.utils import file_lock

    cfg = TrainConfig(epochs=1, train_limit=64, **DIGITS)
    with file_lock(tmp_path / TRAIN_LOCK):  # as a process training the folder holds it
        with pytest.raises(RuntimeError, match=r"is being trained by another process .*held by pid \d+"):
            train(cfg, tmp_path, quiet=True)
    assert not (tmp_path / CHECKPOINT).exists()  # nothing written beside the other process's run
    assert train(cfg, tmp_path, quiet=True).steps == 1  # free again: trains


def test_the_per_epoch_metrics_are_a_csv_with_each_epoch_once_after_a_resume(tmp_path):
    import csv

    class Stop(Hook):  # stops the run in its second epoch, after the first epoch's checkpoint
        def after_step(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(epochs=2, train_limit=128, **DIGITS), tmp_path / "b", hooks=[Stop()], quiet=True)
    assert [r["epoch"] for r in csv.DictReader((tmp_path / "b" / "metrics.csv").open())] == ["1"]
    res = train(TrainConfig(epochs=2, train_limit=128, **DIGITS), tmp_path / "b", hooks=[Hook()], resume=True,
                quiet=True)
    rows = list(csv.DictReader((tmp_path / "b" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["val_acc"]) for r in rows] == [h["val_acc"] for h in res.history]


def test_tensorboard_gets_each_epoch_once_after_a_resume_and_says_what_it_needs(tmp_path, monkeypatch):
    """The events hold what metrics.csv holds: every figure of every epoch, a killed epoch's
    purged by the resumed run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Stop(Hook):
        def after_step(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    cfg = TrainConfig(epochs=2, train_limit=128, tensorboard=True, **DIGITS)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", hooks=[Stop()], quiet=True)
    res = train(cfg, tmp_path / "b", hooks=[Hook()], resume=True, quiet=True)
    events = EventAccumulator(str(tmp_path / "b" / "tensorboard"))
    events.Reload()
    val = events.Scalars("val_acc")
    assert [e.step for e in val] == [1, 2]
    assert [e.value for e in val] == pytest.approx([h["val_acc"] for h in res.history])
    assert {"train_loss", "train_acc", "val_loss", "lr", "seconds", "test_acc"} <= set(events.Tags()["scalars"])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the extra installed
    with pytest.raises(RuntimeError, match=r"pip install -e '.\[tensorboard\]'"):
        train(TrainConfig(epochs=1, train_limit=64, tensorboard=True, **DIGITS), tmp_path / "c", quiet=True)
