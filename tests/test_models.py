import pytest
import torch

from frugal.models import count_params, create_model, list_models

# (in_channels, image_size) a model must accept; lenet5 needs >= 16x16
SHAPES = [(1, (28, 28)), (1, (60, 60)), (3, (32, 32))]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1][0]}x{s[1][1]}")
def test_every_model_runs_and_every_parameter_gets_a_gradient(name, shape):
    torch.manual_seed(0)
    c, size = shape
    model = create_model(name, in_channels=c, image_size=size, num_classes=7)
    x = torch.randn(4, c, *size)
    out = model(x)
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    loss = out.logsumexp(1).sum()
    if hasattr(model, "extra_loss"):  # a model's own auxiliary losses are part of its training loss
        extra = model.extra_loss(x, out, torch.randint(0, 7, (4,)))
        loss = loss + (extra if extra is not None else 0)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


def test_published_parameter_counts():
    # LeNet-5-Caffe: 20*25+20 + 50*20*25+50 + 800*500+500 + 500*10+10
    assert count_params(create_model("lenet5")) == 431_080
    # LeNet-300-100: 784*300+300 + 300*100+100 + 100*10+10
    assert count_params(create_model("lenet300")) == 266_610


def test_resnet_blocks_option_changes_depth():
    shallow = create_model("resnet", blocks=1)
    deep = create_model("resnet", blocks=3)
    assert count_params(deep) > 2 * count_params(shallow)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'lenet6'; known: .*lenet5"):
        create_model("lenet6")


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['depth'\]"):
        create_model("resnet", depth=3)


def test_wrong_input_shape_says_what_was_expected():
    model = create_model("lenet5", image_size=(28, 28))
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        model(torch.zeros(2, 1, 32, 32))


def test_too_small_image_for_lenet5():
    with pytest.raises(ValueError, match="at least 16x16"):
        create_model("lenet5", image_size=(8, 8))


@pytest.mark.parametrize("name", list_models())
def test_every_model_is_sized_on_the_meta_device_as_it_is_built(name):
    """model_size counts what the real build holds (an independent count: the built model's state),
    without memory for values, so a spec read from a file can be refused before it is built."""
    from frugal.models import SizeLimits, model_size

    tensors, entries = model_size(name, SizeLimits(), in_channels=1, image_size=(28, 28), num_classes=10)
    model = create_model(name, in_channels=1, image_size=(28, 28), num_classes=10)
    state = list(model.parameters()) + list(model.buffers())
    assert entries >= sum(t.numel() for t in state) and tensors >= len(state)
    assert entries <= 2 * sum(t.numel() for t in state) + 10_000  # a parametrization registers its weight twice


@pytest.mark.parametrize("kw, what", [(dict(name="resnet", width=1, blocks=20000), "tensors"),
                                      (dict(name="lenet300", image_size=(3000, 3000)), "tensor entries"),
                                      (dict(name="resnet", width=100_000), "tensor entries")])
def test_a_model_past_a_size_limit_is_refused_before_it_is_built(kw, what):
    import time

    from frugal.models import ModelTooLarge, SizeLimits

    t0 = time.perf_counter()
    with pytest.raises(ModelTooLarge, match=f"more than [0-9,]+ {what}"):
        create_model(**kw, limits=SizeLimits())
    assert time.perf_counter() - t0 < 2.0


def test_a_model_without_meta_kernels_is_counted_as_it_is_built():
    """p4-tied kernels compare tensors while they are built, which the meta device cannot: the
    bounds are then counted during the real build, and still hold."""
    from frugal.models import ModelTooLarge, SizeLimits

    m = create_model("constrained", base="convnet", kind="p4", limits=SizeLimits(), image_size=(28, 28))
    assert count_params(m) > 0
    with pytest.raises(ModelTooLarge):
        create_model("constrained", base="convnet", kind="p4", width=64, limits=SizeLimits(entries=10_000))


def test_an_idea_that_fails_to_import_is_named_and_the_others_still_load(monkeypatch):
    from importlib.metadata import EntryPoint

    import frugal.plugins as plugins

    good = EntryPoint("kernels", "frugal.kernels", "frugal.ideas")
    broken = EntryPoint("broken", "no_such_frugal_idea_module", "frugal.ideas")
    monkeypatch.setattr(plugins, "entry_points", lambda group: [broken, good])
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failed", {})
    with pytest.warns(UserWarning, match="'broken'.*no_such_frugal_idea_module"):
        plugins.load_ideas()
    assert "broken" in plugins.failed_ideas() and "constrained" in list_models()


def test_no_idea_imports_another_and_the_spine_imports_none():
    """Shared blocks live in the spine (frugal.layers, frugal.coding); ideas plug in by entry point."""
    import re
    from pathlib import Path

    root = Path(__file__).parent.parent / "frugal"
    ideas = ("saccade", "compress", "kernels", "specialists", "dream")
    pattern = re.compile(r"^\s*(?:from|import)\s+frugal\.(" + "|".join(ideas) + r")\b", re.M)
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if rel[0] == "benchmarks":  # scripts that measure one idea
            continue
        own = rel[0] if rel[0] in ideas else None
        for m in pattern.finditer(path.read_text()):
            assert m.group(1) == own, f"{path.relative_to(root)} imports frugal.{m.group(1)}"


def test_the_report_reads_the_method_registry_without_importing_the_bench():
    """report <-> bench: the bench checks rows with the report's check_rows, the report lists the
    methods; the registry lives apart (frugal.methods), so neither module needs the other first."""
    import subprocess
    import sys

    code = "import sys, frugal.report; assert 'frugal.bench' not in sys.modules, 'frugal.report imported the bench'"
    subprocess.run([sys.executable, "-c", code], check=True)
    from frugal.bench import register_method as via_bench
    from frugal.methods import register_method

    assert via_bench is register_method  # ideas register through either name
