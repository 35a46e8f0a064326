import math

import pytest
import torch

from frugal.data import Split, load_task
from frugal.dream import DreamConfig, DreamTrainConfig, dream, dream_training, objective_value
from frugal.dream.evaluate import cue_conflict, pgd_accuracy, shape_bias
from frugal.dream.rounds import load_dreams, pixel_range
from frugal.train import TrainConfig, evaluate, normalize, train

BASE = dict(task="digits", model="convnet", seed=0, device="cpu", optimizer="adam", lr=3e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("dream") / "net"
    return train(TrainConfig(epochs=3, **BASE), run, quiet=True, progress=False)


@pytest.mark.parametrize("objective", ["layer", "class", "channel"])
def test_dreams_raise_their_objective_stay_in_range_and_repeat_under_a_seed(trained, objective):
    d = load_task("digits")
    x = normalize(d.test.x[:32], d.mean, d.std)
    lo, hi = pixel_range(d.mean, d.std)
    cfg = DreamConfig(objective=objective, target=3, steps=5, octaves=2)
    y = dream(trained.model, x, cfg, lo, hi)
    assert objective_value(trained.model, y, cfg).mean() > objective_value(trained.model, x, cfg).mean()
    assert y.min() >= lo - 1e-6 and y.max() <= hi + 1e-6 and y.shape == x.shape
    assert torch.equal(y, dream(trained.model, x, cfg, lo, hi))
    other_seed = DreamConfig(objective=objective, target=3, steps=5, seed=1)
    assert not torch.equal(y, dream(trained.model, x, other_seed, lo, hi))


def test_dream_rounds_build_the_expected_data_sets(tmp_path):
    d = load_task("digits")
    cfg = DreamTrainConfig(rounds=2, mix=0.5, dream=DreamConfig(steps=2, octaves=1))
    rounds = dream_training(TrainConfig(epochs=1, **BASE), tmp_path, cfg, d, log=lambda s: None)
    n = round(0.5 * len(d.train))
    assert [r["dreams"] for r in rounds] == [0, n, n]
    for r in (1, 2):
        dreams, drift = load_dreams(tmp_path / f"round-{r}" / "dreams.npz")
        assert torch.equal(dreams.y, d.train.y[:n])  # labels are the source images' labels
        assert dreams.x.dtype == torch.uint8 and (drift > 0).all()
    # round 2 drew its epochs from A plus both dreamed sets, with round 0's steps
    log = (tmp_path / "round-2" / "log.txt").read_text()
    assert f"train={len(d.train) + 2 * n}" in log
    assert rounds[2]["result"].steps == rounds[0]["result"].steps > 0
    again = dream_training(TrainConfig(epochs=1, **BASE), tmp_path, cfg, d, log=lambda s: None)  # resumes
    assert [r["result"].test_acc for r in again] == [r["result"].test_acc for r in rounds]


def test_an_epochs_budget_gives_later_rounds_more_steps(tmp_path):
    d = load_task("digits")
    cfg = DreamTrainConfig(rounds=1, mix=0.5, budget="epochs", dream=DreamConfig(steps=1, octaves=1))
    base = TrainConfig(epochs=1, train_limit=400, **BASE)
    rounds = dream_training(base, tmp_path, cfg, d, log=lambda s: None)
    assert rounds[1]["dreams"] == 200  # half of A, which is cut to train_limit
    steps = [r["result"].steps for r in rounds]
    assert steps == [math.ceil(400 / base.batch_size), math.ceil(600 / base.batch_size)]
    assert rounds[1]["dream_seconds"] > 0
    again = dream_training(base, tmp_path, cfg, d, log=lambda s: None)  # read back from the run folders
    assert again[1]["dream_seconds"] == rounds[1]["dream_seconds"]


def test_drift_filter_keeps_the_least_changed_dreams(tmp_path):
    d = load_task("digits")
    cfg = DreamTrainConfig(rounds=1, mix=0.25, max_drift=0.5, dream=DreamConfig(steps=2, octaves=1))
    rounds = dream_training(TrainConfig(epochs=1, **BASE), tmp_path, cfg, d, log=lambda s: None)
    n = round(0.25 * len(d.train))
    assert n // 2 - 1 <= rounds[1]["dreams"] <= n // 2 + 1


def test_drift_weights_count_each_dream_by_how_little_it_changed(tmp_path):
    from frugal.dream.rounds import with_extra

    d = load_task("digits")
    cfg = DreamTrainConfig(rounds=1, mix=0.25, drift_weight=0.05, dream=DreamConfig(steps=2, octaves=1))
    rounds = dream_training(TrainConfig(epochs=1, **BASE), tmp_path, cfg, d, log=lambda s: None)
    dreams, drift = load_dreams(tmp_path / "round-1" / "dreams.npz")
    w = torch.exp(-drift.float() / 0.05)
    assert rounds[1]["mean_weight"] == pytest.approx(float(w.mean())) and 0 < float(w.min()) < float(w.max()) < 1
    both = with_extra(d, [Split(dreams.x, dreams.y, w)]).train
    assert torch.equal(both.w, torch.cat([torch.ones(len(d.train)), w]))  # A's images weigh 1
    assert with_extra(d, [dreams]).train.w is None  # no weights anywhere: none made up


def test_a_folder_of_dreams_is_reused_only_under_its_config(tmp_path):
    d = load_task("digits")
    base = TrainConfig(epochs=1, train_limit=200, **BASE)
    cfg = DreamTrainConfig(rounds=1, mix=0.5, dream=DreamConfig(steps=1, octaves=1))
    first = dream_training(base, tmp_path, cfg, d, log=lambda s: None)
    with pytest.raises(ValueError, match=r"another config \(mix: 0.5 there, 0.25 here\)"):
        dream_training(base, tmp_path, DreamTrainConfig(rounds=1, mix=0.25, dream=cfg.dream), d, log=lambda s: None)
    more = dream_training(base, tmp_path, DreamTrainConfig(rounds=2, mix=0.5, dream=cfg.dream), d,
                          log=lambda s: None)  # more rounds extend the folder
    assert [r["result"].test_acc for r in more[:2]] == [r["result"].test_acc for r in first] and len(more) == 3


def test_evaluation_gives_known_numbers(trained):
    d = load_task("digits")
    clean = evaluate(trained.model, Split(d.test.x[:200], d.test.y[:200]), d.mean, d.std, torch.device("cpu"))[0]
    assert pgd_accuracy(trained.model, d.test, d.mean, d.std, "cpu", eps=0.0, n=200) == pytest.approx(clean)
    assert pgd_accuracy(trained.model, d.test, d.mean, d.std, "cpu", eps=0.3, n=200) < clean
    images, texture = cue_conflict(d.test, n=300)
    assert (images.y != texture).all() and images.x.dtype == torch.uint8
    assert (images.x[d.test.x[:0].shape[0]:].float().sum((1, 2, 3)) > 0).float().mean() > 0.9
    sb = shape_bias(trained.model, d.test, d.mean, d.std, "cpu", n=300)
    assert 0 <= sb["cue_shape"] + sb["cue_texture"] <= 1 and 0 <= sb["shape_bias"] <= 1


def test_another_net_s_dreams_are_made_once_and_scored_like_a_test_set(trained):
    from frugal.dream.evaluate import generalisation, other_net_dreams

    d = load_task("digits")
    torch.manual_seed(1)
    other = train(TrainConfig(epochs=1, **{**BASE, "seed": 1}), trained.run_dir.parent / "other", quiet=True).model
    dreams = other_net_dreams(other, d, "cpu", n=120)
    assert torch.equal(dreams.y, d.test.y[:120]) and not torch.equal(dreams.x, d.test.x[:120])
    given = generalisation(trained.model, d, "cpu", other_dreams=dreams, n=120)
    made = generalisation(trained.model, d, "cpu", other=other, n=120)
    assert given == made  # the dreams are deterministic: made here or passed in, the same numbers
    assert given["other_dream_acc"] == pytest.approx(evaluate(trained.model, dreams, d.mean, d.std, "cpu")[0], abs=1e-6)


def test_dream_bench_runs_rounds_and_every_control(tmp_path):
    import json

    from frugal.bench import BenchConfig, bench

    bench(BenchConfig(out=str(tmp_path), budget="tiny", methods=("dream",), tasks=("digits",), seeds=1,
                      device="cpu"), log=lambda s: None)
    rows = {r["variant"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"round 0 (plain)", "round 1", "control augment", "control adversarial"}
    for r in rows.values():
        assert {"pgd_acc", "other_dream_acc", "shape_bias", "test_acc"} <= r.keys()
    assert len({r["steps"] for r in rows.values()}) == 1 and rows["round 1"]["steps"] > 0  # one budget
    assert rows["round 1"]["dreams"] == 256 and rows["round 1"]["mix"] == 1.0  # the tiny budget's A, dreamed once
    other = json.loads((tmp_path / "runs" / "dream" / "digits" / "other-seed0" / "config.json").read_text())
    assert other["config"]["seed"] == 1  # dreams of the test images come from a net no row is
    assert rows["round 1"]["dream_seconds"] > 0 and 0 < rows["round 1"]["mean_drift"] < 1
    for fig in ("dreams-digits", "dreams-digits-other-net", "cue-conflict-digits"):
        assert (tmp_path / "figures" / f"{fig}.png").stat().st_size > 1000


def test_a_cut_plan_changes_only_the_epochs_of_every_row_and_the_dreamed_fraction():
    import dataclasses

    from frugal.bench import baseline_config
    from frugal.dream.bench import PLANS, dream_plan

    assert PLANS  # fashion-mnist's plan is cut
    for (task, budget), plan in PLANS.items():
        base, rounds, corrupted_n = dream_plan(task, budget, seed=2, device="cpu")
        ref = baseline_config(task, budget, seed=2, device="cpu")
        assert base == dataclasses.replace(ref, epochs=plan.epochs or ref.epochs)
        assert rounds.mix == plan.mix and rounds.dream.seed == 2 and rounds.rounds == plan.rounds
        assert corrupted_n == plan.corrupted_n
    base, rounds, corrupted_n = dream_plan("mnist", "full", seed=0, device="cpu")
    assert base == baseline_config("mnist", "full", seed=0, device="cpu") and rounds.mix == 1.0
    assert corrupted_n is None  # the whole suite


def test_dream_command_writes_a_grid(trained, tmp_path, capsys):
    from frugal.cli import main

    out = tmp_path / "d.png"
    assert main(["dream", str(trained.run_dir), "--n", "8", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["dream", str(trained.run_dir), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


def test_dreaming_leaves_the_net_as_it_was(trained):
    d = load_task("digits")
    x = normalize(d.test.x[:8], d.mean, d.std)
    lo, hi = pixel_range(d.mean, d.std)
    model = trained.model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dream(model, x, DreamConfig(steps=2), lo, hi)
    objective_value(model, x, DreamConfig())
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_layer_dream_step_is_the_normalised_gradient_and_stops_at_the_layer(trained):
    from frugal.dream.generator import default_layer
    model = trained.model.eval()
    d = load_task("digits")
    x = normalize(d.test.x[:8], d.mean, d.std)
    lo, hi = pixel_range(d.mean, d.std)
    layer = default_layer(model, x[:1])
    modules = dict(model.named_modules())
    # the reference: the full forward pass, the layer read by a hook, one normalised gradient step
    acts = {}
    h = modules[layer].register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    img = x.clone().requires_grad_(True)
    model(img)
    h.remove()
    (g,) = torch.autograd.grad(acts["a"].pow(2).flatten(1).mean(1).sum(), img)
    g = g / g.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (x + 0.05 * g).clamp(lo, hi)
    # what comes after the layer must not run: count calls of the last module
    last = [m for n, m in model.named_modules() if n and not list(m.children())][-1]
    calls = []
    h = last.register_forward_hook(lambda m, i, o: calls.append(1))
    got = dream(model, x, DreamConfig(layer=layer, steps=1, octaves=1, jitter=0, step=0.05), lo, hi)
    assert calls == []
    dream(model, x, DreamConfig(objective="class", steps=1, octaves=1, jitter=0), lo, hi)
    assert calls  # a class logit needs the whole net
    h.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_adversarial_training_attacks_in_eval_mode_and_learns_in_train_mode():
    """BatchNorm's running statistics move once per batch, on the finished adversarial examples,
    not at every step of the attack."""
    from types import SimpleNamespace

    from frugal.dream.evaluate import AdversarialTraining

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), bn, torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10))
    modes = []
    bn.register_forward_hook(lambda m, i, o: modes.append(m.training))
    d = load_task("digits")
    state = SimpleNamespace(model=model.train(), data=d)
    x, y = normalize(d.train.x[:32], d.mean, d.std), d.train.y[:32]
    before = bn.num_batches_tracked.item()
    loss = AdversarialTraining(steps=3).extra_loss(state, None, x, y)
    assert modes == [False, False, False, True] and model.training
    assert bn.num_batches_tracked.item() == before + 1
    loss.backward()
    assert model[0].weight.grad.abs().sum() > 0
