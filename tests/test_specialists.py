import pytest
import torch
from safetensors.torch import load_file

from frugal.data import load_task
from frugal.specialists import Specialist, Tapped, TreeConfig, build_tree, load_tree
from frugal.specialists.tree import make_specialist
from frugal.train import TrainConfig, normalize, train

CFG = TreeConfig(k=3, depth=1, epochs=1, min_cluster=50, widths=(8, 16))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("spec") / "base"
    train(TrainConfig(task="digits", model="convnet", epochs=2, device="cpu", optimizer="adam", lr=3e-3), run,
          quiet=True, progress=False)
    return run


@pytest.fixture(scope="module")
def digits_x():
    d = load_task("digits")
    return normalize(d.test.x, d.mean, d.std), d


@pytest.fixture(scope="module")
def tree1(base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tree1")
    tree, record = build_tree(base_run, out, CFG, backend="serial", log=lambda s: None)
    return tree, record, out


def test_building_is_deterministic_under_a_seed(base_run, tree1, digits_x, tmp_path):
    tree, _, _ = tree1
    again, _ = build_tree(base_run, tmp_path, CFG, backend="serial", log=lambda s: None)
    x, _ = digits_x
    assert torch.equal(tree.root.centroids, again.root.centroids)
    with torch.no_grad():
        assert torch.equal(tree(x), again(x)) and torch.equal(tree.routes, again.routes)


def test_process_pool_trains_the_same_nodes_as_the_serial_runner(base_run, tree1, tmp_path):
    _, record, serial_dir = tree1
    build_tree(base_run, tmp_path, CFG, backend="process", workers=2, log=lambda s: None)
    names = [n for n in record["nodes"] if n != "root"]
    assert names
    for name in names:
        a, b = load_file(str(serial_dir / f"{name}.safetensors")), load_file(str(tmp_path / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
