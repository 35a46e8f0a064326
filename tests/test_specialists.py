import dataclasses

import numpy as np
import pytest
import torch

from frugal.data import load_task
from frugal.specialists import Specialist, Tapped, TreeConfig, build_tree, load_tree
from frugal.specialists.build import same_nodes
from frugal.specialists.tree import make_specialist
from frugal.train import TrainConfig, normalize, train

CFG = TreeConfig(k=3, depth=1, epochs=1, min_cluster=50, widths=(8, 16))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("spec") / "base"
    train(TrainConfig(task="digits", model="convnet", epochs=2, device="cpu", optimizer="adam", lr=3e-3,
                      augment="shift"), run,
          quiet=True, progress=False)
    return run


@pytest.fixture(scope="module")
def digits_x():
    d = load_task("digits")
    return normalize(d.test.x, d.mean, d.std), d


@pytest.fixture(scope="module")
def tree1(base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tree1")
    tree, record = build_tree(base_run, None, out, CFG, backend="serial", log=lambda s: None)
    return tree, record, out


def test_building_is_deterministic_under_a_seed(base_run, tree1, digits_x, tmp_path):
    tree, _, _ = tree1
    again, _ = build_tree(base_run, None, tmp_path, CFG, backend="serial", log=lambda s: None)
    x, _ = digits_x
    assert torch.equal(tree.root.centroids, again.root.centroids)
    with torch.no_grad():
        assert torch.equal(tree(x), again(x)) and torch.equal(tree.routes, again.routes)


def test_nodes_train_with_their_base_runs_augmentation_unless_told(tree1, base_run, tmp_path):
    import json

    def augments(out):
        return {json.loads(f.read_text())["config"]["augment"] for f in (out / "runs").glob("*/config.json")}

    assert augments(tree1[2]) == {"shift"}
    build_tree(base_run, None, tmp_path, dataclasses.replace(CFG, augment="none"), backend="serial", log=lambda s: None)
    assert augments(tmp_path) == {"none"}


def test_process_pool_trains_the_same_nodes_as_the_serial_runner(base_run, tree1, tmp_path):
    _, record, serial_dir = tree1
    build_tree(base_run, None, tmp_path / "pool", CFG, backend="process", workers=2, log=lambda s: None)
    names = [n for n in record["nodes"] if n != "root"]
    assert names and all((tmp_path / "pool" / f"{n}.safetensors").exists() for n in names)
    assert same_nodes(serial_dir, tmp_path / "pool")
    build_tree(base_run, None, tmp_path / "seed1", dataclasses.replace(CFG, seed=1), backend="serial", log=lambda s: None)
    assert not same_nodes(serial_dir, tmp_path / "seed1")  # the comparison can fail


def test_a_finished_build_is_loaded_not_built_again(base_run, tree1, digits_x):
    tree, record, out = tree1
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob("*.safetensors")}
    again, again_record = build_tree(base_run, None, out, CFG, backend="serial", log=lambda s: None)
    assert again_record["levels"] == record["levels"]  # the original times, not a rebuild's
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.safetensors")} == stamps
    x, _ = digits_x
    with torch.no_grad():
        assert torch.equal(again(x), tree(x))
    # another config is not built over it
    with pytest.raises(ValueError, match=r"built differently.*'epochs': '1 -> 2'"):
        build_tree(base_run, None, out, dataclasses.replace(CFG, epochs=2), backend="serial", log=lambda s: None)
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.safetensors")} == stamps


def test_a_stopped_build_resumes_its_nodes_and_ends_with_the_same_tree(base_run, tree1, tmp_path):
    import shutil

    from frugal.specialists.build import BUILD_FILE
    from frugal.specialists.tree import TREE_FILE

    _, record, out = tree1
    stopped = tmp_path / "stopped"
    shutil.copytree(out, stopped)
    names = sorted(n for n in record["nodes"] if n != "root")
    for f in (BUILD_FILE, TREE_FILE, f"{names[0]}.safetensors"):
        (stopped / f).unlink()
    _, resumed = build_tree(base_run, None, stopped, CFG, backend="serial", log=lambda s: None)
    assert resumed["levels"][0]["resumed"] and not record["levels"][0]["resumed"]
    assert same_nodes(out, stopped)


def test_a_saved_tree_loads_and_predicts_identically(tree1, digits_x):
    tree, _, out = tree1
    x, _ = digits_x
    with torch.no_grad():
        assert torch.equal(load_tree(out)(x), tree(x))


def test_routing_sends_inputs_to_their_cluster_and_far_inputs_stay_with_the_base(tree1, digits_x):
    tree, _, _ = tree1
    x, _ = digits_x
    with torch.no_grad():
        tree(x)
        routed = tree.routes[:, 0]
        assert (routed >= 0).float().mean() > 0.5
        far = torch.full((3, 1, 8, 8), 50.0)  # nothing like any training image
        out = tree(far)
        assert (tree.routes[:, 0] == -1).all()
        assert torch.equal(out, tree.root.net(far))


def test_lateral_inputs_really_come_from_the_parent(base_run, digits_x):
    from frugal.train import load_run

    x, d = digits_x
    base, _, _ = load_run(base_run)
    base.eval()
    spec = make_specialist(Tapped(base), d, (8, 16), "cpu", residual=False).eval()
    with torch.no_grad():
        before = spec(x[:8])
        first = next(m for m in base.modules() if isinstance(m, torch.nn.Conv2d))
        first.weight.mul_(1.5)  # perturb the parent's first stage
        after = spec(x[:8])
    assert not torch.allclose(before, after)
    assert isinstance(spec, Specialist) and not any(p is first.weight for p in spec.parameters())  # parent not trained


def test_each_stage_reads_its_twin_tap_and_only_that_one(digits_x):
    from frugal.models import create_model
    from frugal.specialists.nets import twin_taps

    # one tap per stage: stage j reads tap j - 1; the ResNet's stem and blocks (28, 28, 14, 7 on mnist):
    # the second stage (input 14x14) reads the 14x14 block
    assert twin_taps([24, 8], 2, 28) == [0] and twin_taps([28, 28, 14, 7], 2, 28) == [2]
    assert twin_taps([28, 28, 14, 7], 3, 28) == [2, 3]
    x, d = digits_x
    torch.manual_seed(0)
    base = create_model("resnet", in_channels=1, image_size=(8, 8), num_classes=10).eval()
    parent = Tapped(base)
    assert len(parent.taps) == 4
    spec = make_specialist(parent, d, (4, 8), "cpu", residual=False).eval()
    assert spec.reads == [2]
    with torch.no_grad():
        logits, acts, pen = parent(x[:8])
        out = spec(x[:8], parent_out=(logits, acts, pen))
        for i in range(len(acts)):
            changed = [a + 1.0 if j == i else a for j, a in enumerate(acts)]
            moved = not torch.allclose(out, spec(x[:8], parent_out=(logits, changed, pen)))
            assert moved == (i == 2), i  # the read tap changes the output; the others cannot
    with pytest.raises(ValueError, match="one stage per parent tap"):
        Specialist(parent, 1, 10, (4, 8), [a.shape[1] for a in acts], pen.shape[1])
    with pytest.raises(ValueError, match="reads must name one of"):
        Specialist(parent, 1, 10, (4, 8), [a.shape[1] for a in acts], pen.shape[1], reads=[4])


def test_an_untrained_residual_specialist_is_its_parent(base_run, digits_x):
    from frugal.train import load_run

    x, d = digits_x
    base, _, _ = load_run(base_run)
    spec = make_specialist(Tapped(base.eval()), d, (8, 16), "cpu").eval()
    with torch.no_grad():
        assert torch.equal(spec(x[:8]), base(x[:8]))


def test_bad_tree_settings():
    with pytest.raises(ValueError, match="routing must be one of"):
        TreeConfig(routing="nearest")
    with pytest.raises(ValueError, match="k >= 2"):
        TreeConfig(k=1)
    with pytest.raises(ValueError, match="augment must be one of"):
        TreeConfig(augment="rotate")


def _record_start(job):
    import time
    return job["name"], time.perf_counter()


def test_costliest_jobs_start_first_and_results_keep_job_order():
    from frugal.specialists.runner import run_jobs

    jobs = [{"name": n} for n in "abcd"]
    out = run_jobs(_record_start, jobs, backend="serial", costs=[1, 5, 2, 9])
    assert [name for name, _ in out] == list("abcd")  # job order
    started = [name for name, t in sorted(out, key=lambda r: r[1])]
    assert started == list("dbca")  # costliest first
    with pytest.raises(ValueError, match="one cost per job"):
        run_jobs(_record_start, jobs, backend="serial", costs=[1, 2])


def test_spatial_features_are_computed_only_where_the_gate_fires(base_run, digits_x):
    from frugal.measure import count_macs
    from frugal.specialists import SpatialSpecialist, choose_features
    from frugal.specialists.nets import probe
    from frugal.train import load_run

    x, d = digits_x
    base, _, _ = load_run(base_run)
    parent = Tapped(base.eval())
    channels, thr = choose_features(parent, x[:64], tap=0, n=2, quantile=0.9)
    _, pen, _ = probe(parent, x[:2])
    spatial = SpatialSpecialist(parent, 1, (8, 8), 10, tap=0, channels=channels, thresholds=thr, penultimate=pen,
                                block=4).eval()
    with torch.no_grad():
        assert torch.equal(spatial(x[:16]), base(x[:16]))  # untrained: exactly the base
    assert 0 < spatial.computed_fraction < 1
    off = SpatialSpecialist(parent, 1, (8, 8), 10, tap=0, channels=channels, thresholds=torch.full((2,), 1e9),
                            penultimate=pen, block=4).eval()
    base_macs = count_macs(base, x[:16])
    head_macs = off.head.in_features * off.head.out_features
    assert count_macs(off, x[:16]) == base_macs + head_macs  # every gate off: no conv work at all
    assert off.computed_fraction == 0
    assert count_macs(spatial, x[:16]) > base_macs + head_macs


def test_the_autoencoder_base_learns_without_labels(tmp_path):
    from frugal.models import create_model

    torch.manual_seed(0)
    m = create_model("convae", image_size=(8, 8)).train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    logits = m(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("probe"))  # labels stop at the probe
    m.zero_grad()
    m(x)
    m.extra_loss(x, logits, y).backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith(("features", "to_code")))


def test_specialists_bench_method_runs_the_tree_and_every_control(tmp_path):
    import json

    from frugal.bench import BenchConfig, bench

    def results():
        return {r["variant"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}

    # a part of the plan first: the base and the depth-1 tree
    cfg = BenchConfig(out=str(tmp_path), budget="tiny", methods=("specialists",), tasks=("digits",), seeds=1,
                      device="cpu")
    bench(dataclasses.replace(cfg, variants=("base", "tree d1")), log=lambda s: None)
    part = results()
    assert set(part) == {"base", "tree d1"}
    tree_dir = tmp_path / part["tree d1"]["run_dir"]
    stamps = {f.name: f.stat().st_mtime_ns for f in tree_dir.glob("*.safetensors")}
    assert not (tmp_path / "runs" / "specialists" / "digits" / "spatial-seed0").exists()
    # then the whole plan: the tree is reloaded (same files, same figures), the rest trained
    bench(cfg, log=lambda s: None)
    rows = results()
    assert {f.name: f.stat().st_mtime_ns for f in tree_dir.glob("*.safetensors")} == stamps
    assert rows["tree d1"]["test_acc"] == part["tree d1"]["test_acc"]
    assert rows["tree d1"]["train_seconds_parallel"] == part["tree d1"]["train_seconds_parallel"]
    assert {"base", "tree d1", "tree d2", "spatial", "autoencoder (probe)", "unsupervised tree"} <= set(rows)
    control = next(v for v in rows if v.startswith("equal-MACs CNN"))
    ensemble = next(v for v in rows if v.startswith("ensemble of"))
    assert rows[control]["macs"] <= rows["tree d1"]["macs"]
    assert rows["tree d1"]["params"] > rows["base"]["params"] and rows["spatial"]["params"] > rows["base"]["params"]
    assert rows["tree d1"]["train_seconds_serial"] > 0 and 0 < rows["spatial"]["computed_fraction"] < 1
    assert rows[ensemble]["params"] >= 2 * rows["base"]["params"]
    assert (tmp_path / "figures" / "specialists-digits-clusters.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "specialists-digits-confusion.png").stat().st_size > 1000


def test_cluster_confusions_match_a_confusion_matrix_per_routed_group(tree1, base_run):
    from sklearn.metrics import confusion_matrix

    from frugal.specialists.analysis import biggest_changes, cluster_confusions, main_classes, routed_predictions
    from frugal.train import evaluate, load_run

    d = load_task("digits")
    base = load_run(base_run)[0]
    pred = routed_predictions(tree1[0], base, d.test, d.mean, d.std, "cpu", batch=50)
    assert (pred.base == pred.y).mean() == pytest.approx(evaluate(base, d.test, d.mean, d.std, "cpu")[0])
    confs = cluster_confusions(pred, d.num_classes)
    assert sum(c["tree"].sum() for c in confs.values()) == len(d.test)
    for c, m in confs.items():
        sel = pred.route == c
        for which, p in (("base", pred.base), ("tree", pred.tree)):
            assert np.array_equal(m[which], confusion_matrix(pred.y[sel], p[sel], labels=range(d.num_classes)))
    # the helpers on a made-up pair of matrices
    b = np.array([[50, 10, 0], [5, 30, 0], [0, 0, 2]])
    t = np.array([[58, 2, 0], [6, 29, 0], [0, 0, 2]])
    assert main_classes(b) == [0, 1]  # class 2 is under 5% of the inputs
    assert biggest_changes(b, t, n=2) == [(0, 1, 10, 2), (1, 0, 5, 6)]
