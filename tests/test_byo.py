"""Bring your own model: a network named by an import path, trained, and opened again; a file that
names a module the user has not trusted does not get it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frugal.cli import main
from frugal.data import task_slug
from frugal.models import TRUST_ENV, UntrustedModelSource, create_model
from frugal.train import TrainConfig, load_run, train

BYO = Path(__file__).parent / "byo"
ARGS = ["train", "--task", "digits", "--batch-size", "64", "--device", "cpu", "--train-limit", "128",
        "--epochs", "1"]


@pytest.fixture(autouse=True)
def user_code(monkeypatch):
    monkeypatch.syspath_prepend(str(BYO))
    monkeypatch.delenv(TRUST_ENV, raising=False)  # each test starts trusting nothing


def test_a_class_named_by_import_path_gets_the_task_s_shape_where_it_asks_for_it():
    m = create_model("usernets:TinyNet", in_channels=3, image_size=(8, 8), num_classes=7, width=4)
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 7)
    f = create_model("usernets:make", in_channels=1, image_size=(8, 8), num_classes=5, width=2)
    assert f.block_a[0].out_channels == 2 and f(torch.randn(1, 1, 8, 8)).shape == (1, 5)


@pytest.mark.parametrize("name, says", [("usernets:not_a_model", "not an nn.Module"),
                                        ("usernets:Missing", "has no 'Missing'"),
                                        ("no_such_module_xyz:Net", "cannot import"),
                                        ("usernets:", "not an import path"),
                                        ("usernets:TinyNet", "takes no option.*depth"),
                                        ("builtins:len", "cannot be called with")])
def test_a_bad_import_path_is_named(name, says):
    with pytest.raises(ValueError, match=says):
        create_model(name, image_size=(8, 8), **({"depth": 3} if name == "usernets:TinyNet" else {}))


def test_train_with_an_import_path_and_open_the_run_again(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(ARGS + ["--model", "usernets:TinyNet", "--model-kw", '{"width": 4}', "--out", str(run)]) == 0
    spec = json.loads((run / "config.json").read_text())["model_spec"]
    assert spec["name"] == "usernets:TinyNet" and spec["kw"] == {"width": 4}
    model, cfg, _ = load_run(run)  # same process: the user named the module
    assert cfg.model == "usernets:TinyNet" and model.block_a[0].out_channels == 4


def test_a_model_object_records_its_class_so_the_run_opens_again(tmp_path):
    from usernets import TinyNet

    net = TinyNet(num_classes=10, in_channels=1)
    res = train(TrainConfig(task="digits", epochs=1, train_limit=64, device="cpu"), tmp_path, model=net, quiet=True)
    assert json.loads((tmp_path / "config.json").read_text())["model_spec"]["name"] == "usernets:TinyNet"
    model, _, _ = load_run(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]), k


MEASURE = """
import sys
from frugal.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_another_process_imports_a_run_s_model_only_when_its_module_is_trusted(tmp_path):
    run = tmp_path / "run"
    assert main(ARGS + ["--model", "usernets:TinyNet", "--out", str(run)]) == 0
    env = {k: v for k, v in os.environ.items() if k != TRUST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(BYO), env.get("PYTHONPATH", "")])
    refused = subprocess.run([sys.executable, "-c", MEASURE, "measure", str(run), "--device", "cpu"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "--trust-model usernets" in refused.stderr
    ok = subprocess.run([sys.executable, "-c", MEASURE, "--trust-model", "usernets", "measure", str(run),
                         "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((run / "measure.json").read_text())["params"] > 0


def test_a_run_folder_naming_an_untrusted_callable_does_not_import_it(tmp_path, capsys):
    train(TrainConfig(task="digits", model="convnet", epochs=1, train_limit=64, device="cpu"), tmp_path, quiet=True)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model_spec"]["name"] = "usernets_payload:Net"  # importing this module would write a marker
    (tmp_path / "config.json").write_text(json.dumps(meta))
    marker = tmp_path / "marker"
    (BYO / "usernets_payload.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    try:
        with pytest.raises(UntrustedModelSource):
            from frugal.models import model_factory
            model_factory("usernets_payload:Net", trusted=False)
        assert main(["measure", str(tmp_path), "--device", "cpu"]) == 2
        assert "--trust-model usernets_payload" in capsys.readouterr().err
        assert not marker.exists()
    finally:
        (BYO / "usernets_payload.py").unlink()


# --- the model file for any module ----------------------------------------------------------------


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_and_load_a_registered_model_and_a_user_class(tmp_path):
    from frugal.compress import Uniform, load, save
    from usernets import TinyNet

    reg = create_model("convnet", image_size=(8, 8), num_classes=10, width=4)
    save(reg, tmp_path / "reg.frugal")
    assert _same(load(tmp_path / "reg.frugal"), reg)  # raw codes: exact
    user = TinyNet(num_classes=3, in_channels=2)  # not built by frugal, and not with its class's defaults
    with pytest.warns(UserWarning, match="records no source"):
        size = save(user, tmp_path / "user.frugal", codecs={"classifier.weight": Uniform(0.01)})
    assert size == (tmp_path / "user.frugal").stat().st_size
    back = load(tmp_path / "user.frugal", model=TinyNet(num_classes=3, in_channels=2))
    assert torch.allclose(back.classifier.weight, user.classifier.weight, atol=0.005 + 1e-6)
    assert torch.equal(back.block_a[0].weight, user.block_a[0].weight)
    plain = TinyNet()  # with its class's defaults: the class's import path is recorded and rebuilds it
    save(plain, tmp_path / "plain.frugal")
    assert _same(load(tmp_path / "plain.frugal"), plain)


def test_a_module_without_an_importable_class_loads_into_the_module_given(tmp_path):
    from frugal.compress import ModelFileError, load, save

    class Local(torch.nn.Module):  # defined in a function: no import path rebuilds it
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

    m = Local()
    save(m, tmp_path / "local.frugal")
    with pytest.raises(ModelFileError, match="model=") as e:
        load(tmp_path / "local.frugal")
    assert str(tmp_path / "local.frugal") in str(e.value)
    assert _same(load(tmp_path / "local.frugal", model=Local()), m)
    with pytest.raises(ModelFileError, match="does not decode"):  # the file's codes do not fill this module
        load(tmp_path / "local.frugal", model=torch.nn.Linear(3, 3))
    with pytest.raises(ModelFileError, match="has 2 tensors, the model"):
        load(tmp_path / "local.frugal", model=torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 2)))


def test_eval_needs_only_the_file_it_stores_the_input_normalisation(tmp_path, capsys):
    from frugal.compress import save
    from frugal.data import load_task
    from frugal.train import evaluate

    res = train(TrainConfig(task="digits", model="convnet", epochs=3, lr=3e-3, batch_size=64, device="cpu"),
                tmp_path / "run", quiet=True)
    assert res.test_acc > 0.5
    data = load_task("digits")
    mean, std = data.mean + 0.5, data.std * 2  # not the task's: eval must use the file's own
    save(res.model, tmp_path / "m.frugal", meta={"task": "digits"}, normalize=(mean, std))
    assert main(["eval", str(tmp_path / "m.frugal"), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test_acc"] == evaluate(res.model, data.test, mean, std, torch.device("cpu"))[0]
    assert out["test_acc"] != evaluate(res.model, data.test, data.mean, data.std, torch.device("cpu"))[0]


# --- the ideas' public callables in a bare PyTorch loop, on a model with the user's own names ------


def _digits(n=256):
    from frugal.data import load_task
    from frugal.train import normalize

    d = load_task("digits")
    return normalize(d.train.x[:n], d.mean, d.std), d.train.y[:n]


def test_the_kernel_penalty_in_a_bare_loop_lowers_the_kernels_entropy():
    """Oracle: the penalty's own value falls under its gradient, in a loop frugal does not own; and
    its gradient is that of the term computed by hand with soft_histogram_entropy."""
    from frugal.kernels import KernelPenalty, PenaltyConfig
    from frugal.kernels.penalty import soft_histogram_entropy
    from usernets import TinyNet

    torch.manual_seed(0)
    net = TinyNet(num_classes=10, in_channels=1)
    penalty = KernelPenalty(PenaltyConfig(kind="entropy", weight=1.0))
    x, y = _digits()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = float(penalty(net).detach())
    hand = sum(soft_histogram_entropy(m.weight) for m in (net.block_a[0], net.block_b[0]))
    assert float(hand.detach()) == pytest.approx(first, rel=1e-6)
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y) + penalty(net)
        loss.backward()
        opt.step()
        penalty.step()
    assert float(penalty(net).detach()) < first
    with pytest.raises(TypeError, match="penalty\\(model\\)"):
        penalty.extra_loss(None, None, x, y)


def test_gmm_penalty_steps_its_mixtures_in_a_bare_loop():
    from frugal.kernels import KernelPenalty, PenaltyConfig
    from usernets import TinyNet

    net = TinyNet()
    penalty = KernelPenalty(PenaltyConfig(kind="gmm", components=4, weight=1.0))
    x, y = _digits(64)
    penalty(net).backward()
    before = {k: v.detach().clone() for k, v in penalty.priors["block_a.0"].state_dict().items()}
    penalty.step()
    after = penalty.priors["block_a.0"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_constrain_and_snap_on_a_user_model_and_the_traps():
    from frugal.kernels import constrain, snap
    from usernets import TinyNet

    net = TinyNet(width=6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="unchanged"):  # p4 needs widths divisible by 4: the second conv fails
        constrain(net, "p4")
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing changed in place
    res = snap(net, threshold=10.0)  # a huge threshold: every kernel snaps to the simplest class
    assert res.snapped_fraction == 1.0 and not res.skipped
    constrain(net, "d4")
    with pytest.raises(ValueError, match="already constrained"):
        snap(net, threshold=10.0)


def test_a_model_trained_in_a_bare_loop_saves_with_codecs_and_loads_within_their_error(tmp_path):
    from frugal.compress import load, save
    from frugal.coding.codecs import Uniform
    from usernets import TinyNet

    net = TinyNet()
    x, y = _digits(128)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    codecs = {k: Uniform(0.02) for k, v in net.state_dict().items() if v.dim() >= 2}
    size = save(net, tmp_path / "n.frugal", codecs=codecs)
    back = load(tmp_path / "n.frugal")
    assert size < 4 * sum(v.numel() for v in net.state_dict().values())
    for k, v in net.state_dict().items():  # uniform codes: within half a step; the rest raw, exact
        err = (back.state_dict()[k] - v).abs().max()
        assert err <= 0.01 + 1e-6 if k in codecs else err == 0, k


def test_the_bench_on_the_user_s_own_data_and_model(tmp_path, capsys):
    """`frugal bench --quick --methods all --tasks folder:DIR --model pkg.mod:fn`: every idea on a
    task none of them has a plan for, with the user's network, measured and reported, each row
    with its plan."""
    import numpy as np
    from sklearn.datasets import load_digits

    from frugal.bench import MIN_STEPS

    d = load_digits()
    x = (d.images * 16).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    data = tmp_path / "mydata"
    data.mkdir()
    np.savez(data / "data.npz", x_train=x[:400], y_train=d.target[:400], x_test=x[400:500], y_test=d.target[400:500])
    task, out = f"folder:{data}", tmp_path / "bench"
    rc = main(["bench", "--quick", "--tasks", task, "--model", "usernets:TinyNet", "--methods", "all",
               "--seeds", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    logs = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    by = {(r["method"], r["variant"]): r for r in rows}
    assert {r["method"] for r in rows} == {"baseline", "compress", "dream", "kernels", "saccade", "specialists"}
    base = by[("baseline", "usernets:TinyNet")]
    # a small data set: the default recipe's 2 quick epochs are raised to MIN_STEPS steps (360 examples, 3 a step)
    assert base["train_examples"] == 360 and base["epochs"] == 30 >= MIN_STEPS["quick"] / 3 / 4
    assert base["params"] == sum(p.numel() for p in create_model("usernets:TinyNet").parameters())
    # every idea trained the user's net (the specialists' equal-MACs control is a plain CNN by design)
    controls = {("specialists", v) for m, v in by if m == "specialists" and v.startswith(("equal-MACs", "ensemble"))}
    assert {r["model"] for (m, v), r in by.items() if (m, v) not in controls} == {"usernets:TinyNet", "constrained"}
    constrained = json.loads((out / by[("kernels", "constrained d4")]["run_dir"] / "config.json").read_text())
    assert constrained["config"]["model_kw"]["base"] == "usernets:TinyNet"
    for key in [("compress", "usernets:TinyNet loop λ=0.03"), ("kernels", "constrained d4"), ("kernels", "snap 0.5"),
                ("dream", "round 1"), ("specialists", "tree d1"), ("saccade", "sparsify 0.25")]:
        assert key in by, key
    assert by[("compress", "usernets:TinyNet loop λ=0.03")]["file_bytes"] < by[("compress", "usernets:TinyNet dense")]["file_bytes"]
    assert "corrupted_mean_acc" in by[("dream", "round 1")]  # its suite, built in the cache on first use
    sparse, dense = by[("saccade", "sparsify 0.25")], by[("saccade", "dense")]
    assert sparse["attended_fraction"] == pytest.approx(0.25) and sparse["macs"] < dense["macs"]
    assert "spatial specialist and the unsupervised tree are planned for" in logs  # a part that cannot apply says why
    md = (out / "report.md").read_text()
    assert f"| {task} | baseline | usernets:TinyNet | 30 ep × 360 |" in md
    assert "trained on more than one plan" in md
    # the task's path never becomes folders in the bench's: one part, named after the data folder
    assert Path(base["run_dir"]).parts[:3] == ("runs", "baseline", task_slug(task))
    assert len(Path(base["run_dir"]).parts) == 4 and (out / "samples" / f"{task_slug(task)}.png").exists()


def test_a_task_slug_is_one_file_name_part_and_tells_folders_apart():
    assert task_slug("mnist") == "mnist" and task_slug("cluttered-mnist-60") == "cluttered-mnist-60"
    a, b = task_slug("folder:/data/a/mine"), task_slug("folder:/data/b/mine")
    assert a != b and a.startswith("folder-mine-") and "/" not in a and ":" not in a


def test_compress_in_the_loop_in_a_bare_loop_and_its_file(tmp_path):
    """round() and hold() on the user's model in a loop frugal does not own: the pruned zeros stay
    zero through optimizer steps, and the recorded bytes are the length of the codes `save` writes."""
    from frugal.coding.codecs import codec_from_spec
    from frugal.compress import CompressInTheLoop, LoopConfig, save
    from frugal.data import load_task
    from usernets import TinyNet

    torch.manual_seed(0)
    net, task = TinyNet(), load_task("digits")
    x, y = _digits(256)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loop = CompressInTheLoop(LoopConfig(codecs=("prune",), prune_fractions=(0.75,), steps=(0.05,), tie=False,
                                        recalibrate=0))
    for epoch in range(2):
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            loop.hold(net, lr=1e-2, epoch=epoch)
        record = loop.round(net, task, epoch=epoch + 1, out=tmp_path, log=lambda s: None)
    codes = {k: codec_from_spec(s) for k, s in loop.chosen.items()}
    weights = dict(net.named_parameters())  # as the round left them: coded
    assert record["bytes"] == sum(len(c.encode(weights[k].detach())) for k, c in codes.items())
    w = net.block_b[0].weight
    zeros = (w == 0).clone()
    assert zeros.float().mean() >= 0.7
    for _ in range(3):  # steps after the round: hold keeps what the round zeroed
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        loop.hold(net, lr=1e-2)
    assert not w[zeros].any()
    assert json.loads((tmp_path / "compression.json").read_text())["codecs"] == loop.chosen
    assert save(net, tmp_path / "n.frugal", codecs=codes) > 0


def test_frozen_kernels_stay_put_in_a_bare_loop_with_weight_decay():
    from frugal.kernels import FreezeKernels, snap
    from usernets import TinyNet

    torch.manual_seed(0)
    net = TinyNet()
    res = snap(net, threshold=0.02)  # some kernels snap, some stay free
    freeze = FreezeKernels(net, res)
    mask = torch.from_numpy(res.classes["block_b.0"] != "free")
    assert 0 < mask.float().mean() < 1
    before = net.block_b[0].weight.detach().clone()
    x, y = _digits(64)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)  # decay moves even gradient-free weights
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        freeze.zero_grads(net)
        opt.step()
        freeze.restore(net)
    after = net.block_b[0].weight.detach()
    assert torch.equal(after[mask], before[mask]) and not torch.equal(after[~mask], before[~mask])


def test_a_specialist_tree_grows_on_a_user_network_with_its_own_stage_names(tmp_path):
    """No `features`/`stem`/`conv1` here: the stages are the top-level modules that hold a conv."""
    from frugal.specialists import Tapped, TreeConfig, build_tree, load_tree
    from usernets import TinyNet

    assert Tapped(TinyNet()).taps == ["block_a", "block_b"]
    train(TrainConfig(task="digits", model="usernets:TinyNet", model_kw={"width": 8}, epochs=1, lr=1e-2,
                      batch_size=64, device="cpu"), tmp_path / "base", quiet=True)
    tree, record = build_tree(tmp_path / "base", None, tmp_path / "tree", TreeConfig(depth=1, k=2, epochs=1),
                              backend="serial", log=lambda s: None)
    assert record["levels"][0]["jobs"] == 2  # one specialist per cluster
    x, _ = _digits(32)
    with torch.no_grad():
        assert torch.equal(load_tree(tmp_path / "tree")(x), tree(x))
    with pytest.raises(ValueError, match="taps=\\[module names\\]"):
        Tapped(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))


def test_a_tree_grows_on_a_net_trained_in_a_bare_loop_with_the_taps_given(tmp_path):
    """build_tree(net, data, out, config, taps): no run folder; the nodes train in pool workers from
    a copy of the net; the user's net keeps its weights and gains no hooks; the saved tree needs the
    net back (its source was not recorded) and then predicts exactly as built."""
    from frugal.data import load_task
    from frugal.specialists import TreeConfig, build_tree, load_tree
    from usernets import TinyNet

    torch.manual_seed(0)
    net = TinyNet(width=6)
    x, y = _digits(512)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for i in range(0, 512, 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
        opt.step()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TreeConfig(depth=1, k=2, epochs=1, min_cluster=30, widths=(4, 8))
    tree, record = build_tree(net, load_task("digits"), tmp_path / "tree", cfg, taps=["block_a"],
                              backend="process", workers=2, log=lambda s: None)
    assert record["levels"][0]["jobs"] == 2 and tree.root.tapped.taps == ["block_a"]
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match="load_tree\\(path, base=net\\)"):
        load_tree(tmp_path / "tree")
    with torch.no_grad():
        assert torch.equal(load_tree(tmp_path / "tree", base=TinyNet(width=6))(x[:64]), tree(x[:64]))
    # the same call again finds the finished build; another base is refused, not overwritten
    _, again = build_tree(net, "digits", tmp_path / "tree", cfg, taps=["block_a"], backend="serial",
                          log=lambda s: None)
    assert again["levels"] == record["levels"]
    with pytest.raises(ValueError, match="built differently"):
        build_tree(TinyNet(width=6), "digits", tmp_path / "tree", cfg, backend="serial", log=lambda s: None)


def test_dream_training_takes_a_factory_of_the_user_s_network(tmp_path):
    from frugal.data import load_task
    from frugal.dream import DreamConfig, DreamTrainConfig, dream_training, pixel_range
    from usernets import TinyNet

    d = load_task("digits")
    made = []

    def factory():
        made.append(TinyNet(width=4))
        return made[-1]

    cfg = DreamTrainConfig(rounds=1, mix=0.25, dream=DreamConfig(steps=2, octaves=1))
    rounds = dream_training(TrainConfig(task="digits", epochs=1, train_limit=256, device="cpu"), tmp_path, cfg, d,
                            log=lambda s: None, model=factory)
    assert len(made) == 2 and [r["dreams"] for r in rounds] == [0, 64]
    assert all(r["result"].model is m for r, m in zip(rounds, made))  # each round trained a fresh user net
    lo, hi = pixel_range(d.mean, d.std)
    assert lo < 0 < hi


UNGUARDED = """
import os, sys
from frugal.specialists.runner import run_jobs
from usernets import worker_pid
open(sys.argv[1], "a").write("ran\\n")  # top-level code a spawned worker would run again
pids = run_jobs(worker_pid, [{}, {}], backend="process", workers=2)
print(sorted(set(pids)) == [os.getpid()])
"""
GUARDED = """
import os, sys
from frugal.specialists.runner import run_jobs
from usernets import worker_pid
if __name__ == "__main__":
    pids = run_jobs(worker_pid, [{}, {}], backend="process", workers=2)
    print(os.getpid() not in pids)
"""


@pytest.mark.parametrize("script, serial", [(UNGUARDED, True), (GUARDED, False)])
def test_a_pool_called_from_an_unguarded_script_runs_serially_instead_of_running_the_script_again(
        tmp_path, script, serial):
    (tmp_path / "script.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BYO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "ran.txt")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"  # serial: every job in the script's process; guarded: in workers
    if serial:
        assert (tmp_path / "ran.txt").read_text() == "ran\n" and "if __name__ == '__main__'" in out.stderr
