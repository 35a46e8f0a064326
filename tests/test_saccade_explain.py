import pytest

from frugal.cli import main


@pytest.mark.parametrize("model", ["saccadic", "ram"])
def test_explain_writes_a_grid_for_a_trained_attention_model(tmp_path, model, capsys):
    run = tmp_path / model
    assert main(["train", "--task", "digits", "--model", model, "--epochs", "1", "--device", "cpu",
                 "--out", str(run)]) == 0
    out = tmp_path / "explain.png"
    assert main(["explain", str(run), "--n", "8", "--out", str(out), "--device", "cpu"]) == 0
    assert str(out) in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_explain_refuses_a_model_without_attention(tmp_path, capsys):
    run = tmp_path / "plain"
    assert main(["train", "--task", "digits", "--model", "lenet300", "--epochs", "1", "--device", "cpu",
                 "--out", str(run)]) == 0
    assert main(["explain", str(run)]) == 2
    assert "has no attention to explain" in capsys.readouterr().err


def test_saccade_bench_method_runs_all_variants_and_shows_explanations(tmp_path, monkeypatch):
    import json

    import dataclasses

    import torch

    import frugal.saccade.bench as saccade_bench
    from frugal.bench import BenchConfig, bench
    from frugal.data import load_task

    # the twin teaches the saccadic variant
    monkeypatch.setitem(saccade_bench.TASKS, "digits", dataclasses.replace(saccade_bench.TASKS["digits"], teacher=0.5))
    bench(BenchConfig(out=str(tmp_path), budget="tiny", methods=("saccade",), tasks=("digits",), seeds=1,
                      device="cpu"), log=lambda s: None)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by = {r["variant"]: r for r in rows}
    trajectories = {f"{v}{p}" for v in ("trajectory", "trajectory-free")
                    for p in ("", " halt 0.9", " halt 0.99", " halt 0.999", " glimpses 1", " glimpses 2", " glimpses 3",
                              " halt 0.99 max 3", " halt 0.999 max 3")}
    assert set(by) == {"blockcnn", "saccadic", "ram", "saccadic top 22%", "saccadic top 24%", "saccadic top 28%",
                       "saccadic top 50%", *trajectories}
    # the same trained policy at a test-time share of the blocks: MACs follow it
    assert by["saccadic top 28%"]["macs"] < by["saccadic top 50%"]["macs"] < by["blockcnn"]["macs"] * 1.1
    assert by["saccadic top 50%"]["attended_fraction"] == pytest.approx(0.5, abs=0.07)
    assert 0 <= by["saccadic"]["attended_fraction"] <= 1 and "attended_fraction" not in by["blockcnn"]
    # the saccadic model starts from its trained dense twin, and its cost includes the twin's
    cfg = json.loads((tmp_path / "runs/saccade/digits/saccadic-seed0/config.json").read_text())["config"]
    assert cfg["init_from"].endswith("blockcnn-seed0")
    assert by["saccadic"]["teacher_weight"] == by["saccadic top 24%"]["teacher_weight"] == 0.5
    assert by["blockcnn"]["teacher_weight"] == by["ram"]["teacher_weight"] == 0.0
    # the control of the trajectory trains as many epochs as the twin and the fine-tuning together
    assert by["ram"]["epochs"] == by["blockcnn"]["epochs"] + by["trajectory"]["epochs"]
    ck = torch.load(tmp_path / "runs/saccade/digits/saccadic-seed0/checkpoint.pt", weights_only=False)
    assert ck["hooks"] == [{"weight": 0.5}]  # kept with the run: a resume must bring the same teacher
    assert by["saccadic"]["train_seconds_total"] == pytest.approx(
        by["saccadic"]["train_seconds"] + by["blockcnn"]["train_seconds"])
    # the trajectory model: fine-tuned from the twin, which teaches it where to look; each halt is
    # the same weights stopping earlier, so it never takes more glimpses or MACs than without one
    traj = json.loads((tmp_path / "runs/saccade/digits/trajectory-seed0/config.json").read_text())["config"]
    assert traj["init_from"].endswith("blockcnn-seed0")
    ck = torch.load(tmp_path / "runs/saccade/digits/trajectory-seed0/checkpoint.pt", weights_only=False)
    assert ck["hooks"] == [saccade_bench.TRAJECTORY_TEACHER | {"temperature": 2.0}]
    for h in ("0.9", "0.99", "0.999"):
        r = by[f"trajectory halt {h}"]
        assert r["mean_glimpses"] <= by["trajectory"]["mean_glimpses"] and r["macs"] <= by["trajectory"]["macs"]
        assert sum(json.loads(r["glimpse_counts"]).values()) == len(load_task("digits").test)  # every test image
        assert 1 <= r["mean_glimpses"] <= r["max_glimpses"] <= 4  # digits: a 2x2 grid of 1-block windows
    # the halt's control: a fixed number of glimpses for every image, each one more block's compute
    fixed = [by[f"trajectory glimpses {k}"] for k in (1, 2, 3)]
    assert [(r["mean_glimpses"], r["max_glimpses"]) for r in fixed] == [(1, 1), (2, 2), (3, 3)]
    assert fixed[0]["macs"] < fixed[1]["macs"] < fixed[2]["macs"] < by["trajectory"]["macs"]
    # a halt with a cap: never more glimpses than either alone
    for h in ("0.99", "0.999"):
        capped, halt = by[f"trajectory halt {h} max 3"], by[f"trajectory halt {h}"]
        assert capped["max_glimpses"] <= 3 and capped["mean_glimpses"] <= halt["mean_glimpses"]
        assert capped["mean_glimpses"] <= fixed[2]["mean_glimpses"] and capped["halt"] == float(h)
    # measured again, only the test-time points --variants asks for are measured
    from frugal.bench import BenchContext

    ctx = BenchContext(out_dir=tmp_path, budget="tiny", device=torch.device("cpu"),
                       variants=("trajectory halt 0.9?", "trajectory-free*max 3"))
    again = saccade_bench.at_halts(ctx, by["trajectory"], "digits", 0)
    assert set(again) == {"trajectory halt 0.99"}
    assert again["trajectory halt 0.99"]["test_acc"] == by["trajectory halt 0.99"]["test_acc"]
    # glimpses of free blocks: as many blocks as the window has (digits: 1), anywhere, from the same twin
    free = json.loads((tmp_path / "runs/saccade/digits/trajectory-free-seed0/config.json").read_text())["config"]
    assert free["model_kw"]["blocks"] == 1 and "window" not in free["model_kw"]
    assert free["init_from"] == traj["init_from"] and traj["model_kw"]["window"] == 1
    assert [by[f"trajectory-free glimpses {k}"]["mean_glimpses"] for k in (1, 2, 3)] == [1, 2, 3]
    md = (tmp_path / "report.md").read_text()
    assert "## Figures" in md and "explain-digits-saccadic.png" in md and "explain-digits-ram.png" in md
    assert "explain-digits-trajectory.png" in md and "explain-digits-trajectory-free.png" in md
    assert "glimpses (mean)" in md
    assert "test images by the glimpses they took" in md  # the distribution of glimpses gets its table
    assert "blocks attended (test)" in md  # the method's own field gets its table


def test_the_shifted_chain_trains_its_own_twin_and_fine_tunes_from_it_on_shifted_images(tmp_path, monkeypatch):
    import dataclasses
    import json

    import torch

    import frugal.saccade.bench as saccade_bench
    from frugal.bench import BenchConfig, bench

    plain = [p.name for p in saccade_bench.saccade_parts(None, "digits")]
    monkeypatch.setitem(saccade_bench.TASKS, "digits", dataclasses.replace(saccade_bench.TASKS["digits"], shifted=True))
    parts = {p.name: p for p in saccade_bench.saccade_parts(None, "digits")}
    assert set(parts) == set(plain) | {"shift-blockcnn", "shift-trajectory-free"}  # only where the plan says so
    assert parts["shift-trajectory-free"].after == ("shift-blockcnn",) and parts["trajectory-free"].after == ("twin",)
    bench(BenchConfig(out=str(tmp_path), budget="tiny", methods=("saccade",), tasks=("digits",), seeds=1,
                      device="cpu", variants=("shift-trajectory-free halt 0.99 max 3",)), log=lambda s: None)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    # the point asked for, with the trained model's and its twin's rows (the rows it is measured against)
    assert {r["variant"] for r in rows} == {"shift-blockcnn", "shift-trajectory-free",
                                            "shift-trajectory-free halt 0.99 max 3"}
    runs = tmp_path / "runs/saccade/digits"
    assert not (runs / "blockcnn-seed0").exists()  # the plain twin is not needed
    twin = json.loads((runs / "shift-blockcnn-seed0/config.json").read_text())["config"]
    free = json.loads((runs / "shift-trajectory-free-seed0/config.json").read_text())["config"]
    assert twin["augment"] == free["augment"] == "shift" and twin["model"] == "blockcnn"
    assert free["init_from"].endswith("shift-blockcnn-seed0") and free["model_kw"]["blocks"] == 1
    ck = torch.load(runs / "shift-trajectory-free-seed0/checkpoint.pt", weights_only=False)
    assert ck["hooks"] == [saccade_bench.TRAJECTORY_TEACHER | {"temperature": 2.0}]


@pytest.mark.parametrize("name", ["saccadic", "ram", "trajectory"])
def test_explain_leaves_the_model_in_the_mode_it_found(tmp_path, name):
    import torch

    from frugal.models import create_model

    model = create_model(name, image_size=(28, 28)).train()
    x = torch.randn(2, 1, 28, 28)
    model.explain(x, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                  tmp_path / "e.png")
    assert model.training and (tmp_path / "e.png").stat().st_size > 0
