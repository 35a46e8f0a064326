import json
import math

import pytest
import torch

from frugal.coding.codecs import codec_from_spec
from frugal.compress.loop import CHOSEN, CompressInTheLoop, LoopConfig
from frugal.data import load_task
from frugal.train import Hook, TrainConfig, TrainState, train

CFG = dict(task="digits", model="lenet300", seed=0, device="cpu", optimizer="adam", lr=1e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("loop") / "run"
    hook = CompressInTheLoop(LoopConfig(every=2, lam=0.05, steps=(0.1, 0.3), kmeans_k=(8,), dct_cutoffs=(0, 3)))
    res = train(TrainConfig(epochs=3, **CFG), run, hooks=[hook], quiet=True, progress=False)
    return run, hook, res


def test_rounds_run_every_k_epochs_and_at_the_end(trained):
    run, hook, _ = trained
    assert [r["epoch"] for r in hook.rounds] == [2, 3]
    # the last epoch re-applies the codes of the last search to the weights trained since
    assert [r["search"] for r in hook.rounds] == [True, False]
    assert hook.rounds[1]["codecs"] == hook.rounds[0]["codecs"]
    saved = json.loads((run / CHOSEN).read_text())
    assert saved["codecs"] == hook.chosen and len(saved["rounds"]) == 2
    for r in hook.rounds:
        assert r["bytes"] == sum(r["tensor_bytes"].values()) > 0


def test_the_trained_model_is_exactly_what_its_codes_decode_to(trained):
    _, hook, res = trained
    state = res.model.state_dict()
    for name, spec in hook.chosen.items():
        decoded, _ = codec_from_spec(spec).roundtrip(state[name])
        assert torch.equal(decoded, state[name]), name


def test_the_compressed_file_reproduces_the_run_accuracy(trained, tmp_path, capsys):
    from frugal.cli import main

    run, _, res = trained
    f = tmp_path / "m.frugal"
    assert main(["compress", str(run), "-o", str(f), "--device", "cpu"]) == 0  # uses compression.json
    capsys.readouterr()
    assert main(["eval", str(f), "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_acc"] == res.test_acc and ev["reproduced"]


def _state(model, run_dir):
    data = load_task("digits")
    cfg = TrainConfig(epochs=1, **CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainState(cfg, model, opt, data, torch.device("cpu"), run_dir, log=lambda s: None)


def test_a_larger_lambda_never_gives_a_larger_code(trained, tmp_path):
    import copy

    _, _, res = trained
    sizes = []
    for lam in (0.0, 0.01, 0.1, 1.0, 10.0):
        m = copy.deepcopy(res.model)  # every lambda starts from the same weights
        hook = CompressInTheLoop(LoopConfig(lam=lam, steps=(0.05, 0.2, 0.8), kmeans_k=(4, 16), dct_cutoffs=(0, 2)))
        sizes.append(hook.compress(_state(m, tmp_path))["bytes"])
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0], sizes


@pytest.mark.parametrize("masks", ["fixed", "reopen"])
def test_fixed_masks_keep_pruned_weights_at_zero(trained, tmp_path, masks):
    import copy

    m = copy.deepcopy(trained[2].model)
    hook = CompressInTheLoop(LoopConfig(codecs=("prune",), prune_fractions=(0.9,), steps=(0.01,), masks=masks))
    state = _state(m, tmp_path)
    hook.compress(state)
    w = m.hidden[0].weight
    zeros = (w == 0).clone()
    assert zeros.float().mean() >= 0.9
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        state.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        state.optimizer.step()
        hook.after_step(state)
    regrown = (w[zeros] != 0).any().item()
    assert regrown == (masks == "reopen")


def test_a_final_search_is_available(tmp_path):
    hook = CompressInTheLoop(LoopConfig(every=1, lam=0.05, steps=(0.3,), kmeans_k=(8,), dct_cutoffs=(0,),
                                        final="search"))
    train(TrainConfig(epochs=2, train_limit=256, **CFG), tmp_path, hooks=[hook], quiet=True, progress=False)
    assert [r["search"] for r in hook.rounds] == [True, True]


def test_bad_loop_settings_are_named():
    with pytest.raises(ValueError, match="masks must be one of"):
        LoopConfig(masks="frozen")
    with pytest.raises(ValueError, match="final must be one of"):
        LoopConfig(final="none")
    with pytest.raises(ValueError, match="unknown codec families"):
        LoopConfig(codecs=("jpeg",))
    with pytest.raises(ValueError, match="unknown compression setting"):
        LoopConfig.from_dict({"lambda": 1})


def test_compress_bench_method_writes_real_files_that_reproduce_each_row(tmp_path):
    from frugal.bench import BenchConfig, bench
    from frugal.compress.container import read_model_file
    from frugal.train import evaluate

    bench(BenchConfig(out=str(tmp_path), budget="tiny", methods=("compress",), tasks=("digits",), seeds=1,
                      device="cpu"), log=lambda s: None)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    variants = [r["variant"] for r in rows]
    from frugal.compress.bench import NNCODEC_QPS
    from frugal.compress.peers import nncodec_status

    nnc = [r for r in rows if " nncodec " in r["variant"]]
    assert len(nnc) == (len(NNCODEC_QPS) if nncodec_status() is None else 0)
    assert [r["file_bytes"] for r in nnc] == sorted((r["file_bytes"] for r in nnc), reverse=True)  # coarser, smaller
    rows = [r for r in rows if r not in nnc]
    variants = [r["variant"] for r in rows]
    assert variants[0] == "lenet300 dense" and len(rows) == 13
    assert sum("loop" in v for v in variants) == 3 and sum("torch-prune λ" in v for v in variants) == 3
    assert sum(" code λ=" in v for v in variants) == 3
    # each code run's control is pruned to that run's share of zeros
    zeros = {r["lam"]: r["zero_fraction"] for r in rows if " code λ=" in r["variant"]}
    ctrls = [r for r in rows if "torch-prune (code's sparsity" in r["variant"]]
    assert len(ctrls) == 3 and all(r["target_sparsity"] == zeros[r["lam"]] for r in ctrls)
    data = load_task("digits")
    for r in rows:
        f = tmp_path / r["run_dir"] / "model.frugal"
        assert f.stat().st_size == r["file_bytes"]
        model, _ = read_model_file(f)
        assert evaluate(model, data.test, data.mean, data.std, torch.device("cpu"))[0] == r["test_acc"], r["variant"]
    # small coded files are kept beside results.json, the same bytes
    from frugal.compress.bench import KEEP_BYTES

    kept = [r for r in rows if "file" in r]
    assert kept and all(r["file_bytes"] <= KEEP_BYTES and (" loop " in r["variant"] or " code " in r["variant"])
                        for r in kept)
    assert {r["variant"] for r in rows if r["file_bytes"] <= KEEP_BYTES and " loop " in r["variant"]} <= {
        r["variant"] for r in kept}
    for r in kept:
        assert (tmp_path / r["file"]).read_bytes() == (tmp_path / r["run_dir"] / "model.frugal").read_bytes()
    dense = rows[0]
    assert dense["file_bytes"] > 4 * dense["params"]  # raw float32 plus the header
    md = (tmp_path / "report.md").read_text()
    assert "file bytes" in md and "zero weights" in md


def test_compress_bench_trains_each_model_with_its_own_settings(tmp_path, monkeypatch):
    from frugal.bench import BenchConfig, bench
    from frugal.compress import bench as cb

    monkeypatch.setattr(cb, "LAMBDAS", (0.03,))
    monkeypatch.setattr(cb, "CODE_LAMBDAS", (0.01,))
    monkeypatch.setattr(cb, "NNCODEC_QPS", ())
    monkeypatch.setattr(cb, "PLANS", {**cb.PLANS, "digits": [cb.CompressPlan("lenet300", quick=10, full=30, lr=4e-3)]})
    bench(BenchConfig(out=str(tmp_path), budget="tiny", methods=("compress",), tasks=("digits",), seeds=1,
                      device="cpu"), log=lambda s: None)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    lrs = {r["variant"]: json.loads((tmp_path / r["run_dir"] / "config.json").read_text())["config"]["lr"]
           for r in rows}
    # the dense, loop and code runs train at the model's rate; the control fine-tunes at a tenth of it
    assert lrs == {"lenet300 dense": 4e-3, "lenet300 loop λ=0.03": 4e-3, "lenet300 torch-prune λ=0.03": 4e-4,
                   "lenet300 code λ=0.01": 4e-3, "lenet300 torch-prune (code's sparsity, λ=0.01)": 4e-4}


def test_pareto_front_keeps_exactly_the_undominated_codes():
    from frugal.compress.loop import pareto_front
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(0, 6, (12,), generator=g).tolist()  # small ranges: many ties
        errors = torch.randint(0, 6, (12,), generator=g).tolist()
        front = pareto_front(sizes, errors)
        pts = list(zip(sizes, errors))
        for i, (s, e) in enumerate(pts):
            beaten = any(s2 <= s and e2 <= e and (s2, e2) != (s, e) for s2, e2 in pts)
            if beaten:
                assert i not in front
            else:  # undominated: exactly one of its exact copies is kept
                copies = [j for j, q in enumerate(pts) if q == (s, e)]
                assert [j for j in copies if j in front] == [copies[0]]
    assert pareto_front([3, 1, 2], [1, 3, 2]) == [0, 1, 2]
    assert pareto_front([1, 2], [1, 2]) == [0]


def test_the_prefilter_scores_fewer_codes_and_still_compresses(tmp_path, monkeypatch):
    from frugal.compress import loop as loop_module
    skipped, real = [], loop_module.pareto_front

    def counting(sizes, errors):
        keep = real(sizes, errors)
        skipped.append(len(sizes) - len(keep))
        return keep

    monkeypatch.setattr(loop_module, "pareto_front", counting)
    hook = CompressInTheLoop(LoopConfig(every=1, lam=0.05, steps=(0.1, 0.3), kmeans_k=(8,), dct_cutoffs=(0, 3)))
    res = train(TrainConfig(epochs=1, train_limit=256, **CFG), tmp_path, hooks=[hook], quiet=True, progress=False)
    assert sum(skipped) > 0  # some codes were dominated and never scored
    fp32 = 4 * sum(p.numel() for p in res.model.parameters())
    assert hook.rounds[-1]["bytes"] < 0.5 * fp32


def test_tied_sets_each_weight_to_its_cluster_mean():
    from frugal.coding.tied import tied

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 7, generator=gen)
    cluster = torch.randint(-1, 4, (6, 7), generator=gen)
    out = tied(w, cluster)
    for c in range(4):
        sel = cluster == c
        assert torch.allclose(out[sel], w[sel].mean().expand(int(sel.sum())))
    assert (out[cluster == -1] == 0).all()


class _Snapshot(Hook):
    """Keeps the weights as they are at the end of each epoch, before the hooks after it run."""

    def end_of_epoch(self, state):
        self.weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}


@pytest.mark.parametrize("tie", [True, False])
def test_tied_weights_make_the_final_requantisation_free(tmp_path, tie):
    snap = _Snapshot()
    hook = CompressInTheLoop(LoopConfig(every=2, lam=0.05, codecs=("kmeans",), kmeans_k=(8,), tie=tie))
    res = train(TrainConfig(epochs=3, train_limit=512, **CFG), tmp_path, hooks=[snap, hook], quiet=True,
                progress=False)
    requant = hook.rounds[-1]
    assert not requant["search"]
    shared = [n for n, s in requant["codecs"].items() if s["codec"] == "kmeans"]
    assert shared
    final = res.model.state_dict()
    # with ties, training between the rounds moved only the shared values: the last round finds the
    # weights already on <= k values and leaves them exactly as they were
    for n in shared:
        assert torch.equal(final[n], snap.weights[n]) == tie, n
        assert (snap.weights[n].unique().numel() <= 8) == tie, n


def test_ties_round_trip_through_a_checkpoint(trained, tmp_path):
    import copy

    m = copy.deepcopy(trained[2].model)
    hook = CompressInTheLoop(LoopConfig(codecs=("kmeans",), kmeans_k=(4,), tie=True))
    state = _state(m, tmp_path)
    hook.compress(state)
    torch.save(hook.state_dict(), tmp_path / "h.pt")
    again = CompressInTheLoop(LoopConfig(codecs=("kmeans",), kmeans_k=(4,), tie=True))
    again.load_state_dict(torch.load(tmp_path / "h.pt", weights_only=True))  # what a checkpoint is read with
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    state.optimizer.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    state.optimizer.step()
    twin = copy.deepcopy(m)
    hook.after_step(state)
    again.after_step(_state(twin, tmp_path))
    for a, b in zip(m.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    w = m.hidden[0].weight
    assert w.unique().numel() <= 4 and (w == 0).any()


def test_group_shrink_is_the_group_lasso_proximal_step():
    from frugal.compress.loop import group_shrink

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    w[2] *= 0.01  # a weak output unit: shrinks to exactly 0
    t = 0.05
    ref = w.clone()
    for o in range(5):  # rows, one at a time, from the definition
        n = ref[o].norm()
        ref[o] = ref[o] * max(0.0, 1 - t * 6.0 / float(n))  # sqrt(4 x 3 x 3) = 6
    for i in range(4):
        n = ref[:, i].norm()
        ref[:, i] = ref[:, i] * max(0.0, 1 - t * math.sqrt(45) / float(n)) if n > 0 else ref[:, i]
    out = w.clone()
    group_shrink(out, t)
    assert torch.allclose(out, ref)
    assert (out[2] == 0).all() and (out[0] != 0).all()
    only_inputs = w.clone()
    group_shrink(only_inputs, t, rows=False)
    assert (only_inputs[2] != 0).all()


def test_dead_units_give_a_structured_code_that_loses_nothing_more_than_quantisation():
    from frugal.coding.codecs import Prune, Structured, Uniform
    from frugal.compress.loop import candidates, dead_units

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 30, generator=gen)
    w[::3] = 0  # 14 dead output units
    w[:, 5:25] = 0  # 20 dead inputs
    rows, inputs = dead_units(w)
    assert int(rows * 40) == 14 and int(inputs * 30) == 20
    step = 0.1
    code = Structured(rows, inputs, step)
    decoded, nbytes = code.roundtrip(w)
    assert torch.equal(decoded, Uniform(step).roundtrip(w)[0])  # only the quantisation differs from w
    assert nbytes < Prune(0.0, step).roundtrip(w)[1]  # positions cost a bit per unit, not a symbol per weight
    assert code in candidates(w, LoopConfig(steps=(step / float(w.std()),)))
    assert dead_units(torch.randn(4, 3)) is None and dead_units(torch.zeros(4, 3)) is None


def test_the_group_setting_shrinks_every_layer_but_the_class_rows(tmp_path):
    import copy

    from frugal.compress.loop import group_shrink
    from frugal.train import build_model, model_spec

    data = load_task("digits")
    model = build_model(model_spec(TrainConfig(epochs=1, **CFG), data), device="cpu")
    before = copy.deepcopy(model)
    hook = CompressInTheLoop(LoopConfig(group=0.7))
    hook.after_step(_state(model, tmp_path))  # SGD at lr 0.1: t = 0.07 per step
    hidden = model.hidden[0].weight
    assert (hidden == 0).all(1).sum() > 0  # dead output units
    for layer, ref in zip(model.hidden, before.hidden):
        group_shrink(ref.weight, 0.07)
        assert torch.allclose(layer.weight, ref.weight)
    group_shrink(before.out.weight, 0.07, rows=False)  # the class rows are not shrunk as groups
    assert torch.allclose(model.out.weight, before.out.weight)
    assert torch.equal(model.hidden[0].bias, before.hidden[0].bias)  # biases are not groups
    with pytest.raises(ValueError, match="group"):
        LoopConfig(group=-1.0)
    later = _state(model, tmp_path)
    later.epoch = 1
    after_first = copy.deepcopy(model)
    CompressInTheLoop(LoopConfig(group=0.7, group_epochs=1)).after_step(later)  # epoch 1: past group_epochs
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), after_first.parameters()))


def test_a_round_cuts_out_dead_units_and_keeps_ties_through_them(trained, tmp_path):
    import copy

    m = copy.deepcopy(trained[2].model)
    with torch.no_grad():
        m.hidden[0].weight[::2] = 0  # half the hidden units dead, as group lasso leaves them
    hook = CompressInTheLoop(LoopConfig(codecs=("kmeans",), kmeans_k=(4,), tie=True))
    hook.compress(_state(m, tmp_path))
    spec = hook.chosen["hidden.0.weight"]
    assert spec == {"codec": "units", "inner": {"codec": "kmeans", "k": 4, "iters": 20}}
    w = m.hidden[0].weight
    assert torch.equal(codec_from_spec(spec).roundtrip(w)[0], w)
    assert "hidden.0.weight" in hook._ties  # the k-means values inside stay shared
    assert hook.rounds[-1]["tensor_bytes"]["hidden.0.weight"] == len(codec_from_spec(spec).encode(w))


def test_batchnorm_statistics_are_estimated_again_as_plain_averages():
    from frugal.compress.loop import recalibrate_batchnorm

    data = load_task("digits")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 3, 3)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(3, momentum=0.3), torch.nn.ReLU())
    model.eval()
    assert recalibrate_batchnorm(model, data, 256, "cpu", batch=64)
    assert not model.training and model[1].momentum == 0.3  # eval mode again, its momentum kept
    # the reference: per batch of 64, the conv outputs' mean and unbiased variance per channel, averaged
    from frugal.train import normalize

    with torch.no_grad():
        outs = [conv(normalize(data.train.x[i:i + 64], data.mean, data.std)) for i in range(0, 256, 64)]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).reshape(3, -1).var(1) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means)
    torch.testing.assert_close(model[1].running_var, variances)
    # nothing to do without batch norm, or with n = 0
    lin = torch.nn.Linear(4, 2)
    assert not recalibrate_batchnorm(lin, data, 256, "cpu")
    before = model[1].running_mean.clone()
    assert not recalibrate_batchnorm(model, data, 0, "cpu") and torch.equal(model[1].running_mean, before)
    with pytest.raises(ValueError, match="recalibrate must be >= 0"):
        LoopConfig(recalibrate=-1)


def test_a_round_leaves_batchnorm_statistics_that_fit_the_coded_weights(tmp_path):
    from frugal.compress.loop import recalibrate_batchnorm

    hook = CompressInTheLoop(LoopConfig(every=1, lam=0.05, steps=(0.2,), kmeans_k=(8,), dct_cutoffs=(0,),
                                        recalibrate=300))
    res = train(TrainConfig(epochs=1, **{**CFG, "model": "resnet", "train_limit": 512}), tmp_path / "run",
                hooks=[hook], quiet=True, progress=False)
    assert [r["recalibrated"] for r in hook.rounds] == [True]
    bns = [m for m in res.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    kept = [m.running_var.clone() for m in bns]
    data = load_task("digits")
    recalibrate_batchnorm(res.model, data, 300, "cpu")  # again, on the final weights: nothing changes
    for m, v in zip(bns, kept):
        torch.testing.assert_close(m.running_var, v)


def test_variants_pick_a_part_of_the_compress_plan_and_train_what_it_needs(tmp_path, monkeypatch):
    from frugal.bench import BenchConfig, bench
    from frugal.compress import bench as cb

    monkeypatch.setattr(cb, "LAMBDAS", (0.03, 0.3))
    bench(BenchConfig(out=str(tmp_path), budget="tiny", methods=("compress",), tasks=("digits",), seeds=1,
                      device="cpu", variants=("lenet300 torch-prune λ=0.3",)), log=lambda s: None)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["lenet300 torch-prune λ=0.3"]
    runs = sorted(p.name for p in (tmp_path / "runs" / "compress" / "digits").iterdir() if p.is_dir())
    # the control's prerequisites: the dense net it prunes, the loop run whose sparsity it matches
    assert runs == ["lenet300-dense-seed0", "lenet300-loop-0.3-seed0", "lenet300-torch-prune-0.3-seed0"]
