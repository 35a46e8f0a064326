"""The benchmark scripts run end to end on tiny inputs and print what they measured."""

import json
from pathlib import Path

import pytest
import torch

from frugal.benchmarks import saccade_model, sparse_conv
from frugal.measure import count_macs
from frugal.train import TrainConfig, load_run, normalize, train
from frugal.data import load_task


def test_sparse_conv_benchmark_times_every_form_and_writes_its_command(capsys, tmp_path):
    out = sparse_conv.main(["--channels", "4", "--size", "8", "--batch", "2", "--block", "4",
                            "--density", "1", "0.5", "--repeats", "2", "--threads", "1",
                            "--out", str(tmp_path / "results.json")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == out["rows"] == json.loads((tmp_path / "results.json").read_text())["rows"]
    assert out["command"].startswith("python -m frugal.benchmarks.sparse_conv --channels 4")
    assert {(r["form"], r["density"]) for r in out["rows"]} == {
        (f, d) for f in ("map", "tiles", "drop-in") for d in (1.0, 0.5)}
    for r in out["rows"]:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["density"])


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    runs = {}
    for model in ("saccadic", "blockcnn"):
        cfg = TrainConfig(task="digits", model=model, epochs=1, train_limit=128, seed=0, device="cpu")
        train(cfg, root / model, quiet=True, progress=False)
        runs[model] = root / model
    return runs


def test_saccade_model_benchmark_measures_both_models(twin_runs, capsys):
    out = saccade_model.main(["--sparse", str(twin_runs["saccadic"]), "--dense", str(twin_runs["blockcnn"]),
                              "--batch", "16", "--rounds", "2", "--threads", "1", "--allocator", "default"])
    assert json.loads(capsys.readouterr().out)["speedup"] == pytest.approx(out["speedup"])
    assert out["allocator"] == "default"  # the C library's own thresholds: this process is left as it was
    sparse, _, _ = load_run(twin_runs["saccadic"])
    data = load_task("digits")
    x = normalize(data.test.x[:16], data.mean, data.std, torch.float32)
    assert out["models"]["saccadic"]["macs"] == count_macs(sparse, x)  # from the ops that ran
    assert out["macs_ratio"] == pytest.approx(out["models"]["saccadic"]["macs"] / out["models"]["dense"]["macs"])
    assert 0 <= out["models"]["saccadic"]["attended_fraction"] <= 1
    for m in out["models"].values():
        assert 0 <= m["test_error"] <= 1 and m["ms_per_batch"] > 0


def test_saccade_model_benchmark_times_test_time_fractions(twin_runs, capsys):
    out = saccade_model.main(["--sparse", str(twin_runs["saccadic"]), "--dense", str(twin_runs["blockcnn"]),
                              "--batch", "16", "--rounds", "2", "--threads", "1", "--fractions", "0.25", "1.0",
                              "--allocator", "default"])
    quarter, full = out["models"]["saccadic top 25%"], out["models"]["saccadic top 100%"]
    assert full["attended_fraction"] == 1.0 and quarter["attended_fraction"] < 0.5
    assert quarter["macs"] < full["macs"] and quarter["speedup"] > 0 and full["macs_ratio"] > 1  # + the policy


def test_saccade_model_benchmark_refuses_a_model_that_is_not_saccadic(twin_runs):
    with pytest.raises(SystemExit, match="is not a saccadic or trajectory model"):
        saccade_model.main(["--sparse", str(twin_runs["blockcnn"]), "--dense", str(twin_runs["blockcnn"])])
    with pytest.raises(SystemExit, match="--halts"):
        saccade_model.main(["--sparse", str(twin_runs["saccadic"]), "--dense", str(twin_runs["blockcnn"]),
                            "--halts", "0.9"])


def test_saccade_model_benchmark_times_a_trajectory_at_each_halt(tmp_path, capsys):
    kw = {"width": 8, "block_size": 4}
    twin_cfg = TrainConfig(task="digits", model="blockcnn", model_kw=kw, epochs=1, train_limit=128, seed=0)
    train(twin_cfg, tmp_path / "twin", quiet=True, progress=False)
    cfg = TrainConfig(task="digits", model="trajectory", model_kw={**kw, "window": 1, "glimpses": 3}, epochs=1,
                      train_limit=128, seed=0, init_from=str(tmp_path / "twin"))
    train(cfg, tmp_path / "traj", quiet=True, progress=False)
    out = saccade_model.main(["--sparse", str(tmp_path / "traj"), "--dense", str(tmp_path / "twin"),
                              "--batch", "16", "--rounds", "2", "--threads", "1", "--halts", "0.1", "1.0",
                              "--caps", "2", "--allocator", "default"])
    assert json.loads(capsys.readouterr().out)["speedup"] == pytest.approx(out["speedup"])
    full, early, never = (out["models"][k] for k in ("trajectory", "trajectory halt 0.1", "trajectory halt 1"))
    assert full["max_glimpses"] == never["max_glimpses"] == 3 and full["mean_glimpses"] == 3
    capped = out["models"]["trajectory halt 1 max 2"]  # no image is that sure: each stops at the cap
    assert capped["mean_glimpses"] == capped["max_glimpses"] == 2 and capped["macs"] < never["macs"]
    assert out["models"]["trajectory halt 0.1 max 2"]["mean_glimpses"] == 1
    assert early["mean_glimpses"] == early["max_glimpses"] == 1  # of 10 classes' probabilities one is >= 0.1
    assert early["attended_fraction"] < never["attended_fraction"] and early["macs"] < never["macs"]
    assert out["macs_ratio"] == pytest.approx(full["macs"] / out["models"]["dense"]["macs"])
    with pytest.raises(SystemExit, match="--fractions"):
        saccade_model.main(["--sparse", str(tmp_path / "traj"), "--dense", str(tmp_path / "twin"),
                            "--fractions", "0.5"])
    for bad, says in ((["--caps", "2"], "give --halts too"), (["--halts", "0.9", "--caps", "4"], r"1\.\.3")):
        with pytest.raises(SystemExit, match=says):
            saccade_model.main(["--sparse", str(tmp_path / "traj"), "--dense", str(tmp_path / "twin"), *bad])


def test_the_saccade_benchmark_times_under_a_steady_allocator_by_default(twin_runs, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "-m", "frugal.benchmarks.saccade_model", "--sparse", str(twin_runs["saccadic"]),
                    "--dense", str(twin_runs["blockcnn"]), "--batch", "8", "--rounds", "1", "--threads", "1",
                    "--out", str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text())["allocator"] == "steady"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the process's resident memory from /proc")
@pytest.mark.parametrize("steady", [False, True])
def test_a_steady_allocator_keeps_freed_memory_in_the_process(steady):
    import subprocess
    import sys

    # 64 MiB freed: the C library gives it back to the system (a fresh block costs its page faults
    # again), unless steady_allocator told it to keep it
    code = ("import torch\nfrom frugal.benchmarks import steady_allocator\n"
            f"assert steady_allocator() if {steady} else True\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
            "before = rss()\nx = torch.ones(16 << 20)\ndel x\nprint(rss() - before)")
    kept = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert (kept > 48 << 20) if steady else (kept < 16 << 20)


def test_codec_speed_benchmark_writes_and_reads_whole_files(capsys):
    from frugal.benchmarks import codec_speed

    out = codec_speed.main(["--width", "4", "--repeats", "1"])
    assert json.loads(capsys.readouterr().out)["params"] == out["params"]
    assert {r["codec"]["codec"] for r in out["rows"]} == {"uniform", "prune", "kmeans", "dct", "learned"}
    for r in out["rows"]:
        assert r["bytes"] > 0 and r["encode_s"] > 0 and r["decode_s"] > 0


def test_separable_speed_benchmark_covers_every_conv_layer(capsys):
    from frugal.benchmarks import separable_speed

    out = separable_speed.main(["--batch", "4", "--rounds", "1", "--models", "lenet5"])
    capsys.readouterr()
    assert [r["layer"] for r in out["rows"]] == ["conv1", "conv2"]
    conv2 = out["rows"][1]
    assert conv2["macs_separable"] < conv2["macs_full"] and conv2["free_separable"] == 8 * 5 * (20 + 50)


def test_dream_speed_times_an_epoch_against_a_dreamed_set(capsys):
    from frugal.benchmarks import dream_speed
    one = dream_speed.main(["--task", "digits", "--model", "convnet", "--n", "256", "--steps", "1", "--octaves", "1",
                            "--repeats", "1", "--threads", "1", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["dream_over_epoch"] == pytest.approx(one["dream_over_epoch"])
    assert one["n"] == 256 and one["train_epoch_seconds"] > 0 and one["dream_seconds"] > 0
    assert one["dream_over_epoch"] == pytest.approx(one["dream_seconds"] / one["train_epoch_seconds"])
    before = torch.backends.mkldnn.enabled
    off = dream_speed.main(["--task", "digits", "--model", "convnet", "--n", "64", "--steps", "1", "--octaves", "1",
                            "--repeats", "1", "--threads", "1", "--device", "cpu", "--onednn", "off"])
    assert one["dream"]["onednn"] == "on" and off["dream"]["onednn"] == "off"
    assert torch.backends.mkldnn.enabled == before  # switched back after


def test_tree_parallel_benchmark_times_both_runners_on_the_same_tree(tmp_path, capsys):
    from frugal.benchmarks import tree_parallel

    base = tmp_path / "base"
    train(TrainConfig(task="digits", model="convnet", epochs=1, device="cpu", optimizer="adam", lr=3e-3), base,
          quiet=True, progress=False)
    out = tree_parallel.main(["--base", str(base), "--k", "2", "--epochs", "1", "--min-cluster", "30",
                              "--widths", "4", "8", "--repeats", "1"])
    assert json.loads(capsys.readouterr().out)["speedup"] == pytest.approx(out["speedup"])
    assert out["jobs_per_level"] == [2] and len(out["node_train_sizes"]) == 2
    assert len(out["serial_seconds"]) == len(out["process_seconds"]) == 1
    assert out["speedup"] == pytest.approx(out["serial_seconds"][0] / out["process_seconds"][0])
    assert out["identical_nodes"]  # the two runners wrote the same specialists


def test_tree_parallel_benchmark_refuses_a_folder_that_is_not_a_run(tmp_path):
    from frugal.benchmarks import tree_parallel

    with pytest.raises(SystemExit, match="not a run folder"):
        tree_parallel.main(["--base", str(tmp_path)])


def test_matched_noise_changes_each_image_as_much_as_asked():
    from frugal.benchmarks.dream_budget import matched_noise

    src = load_task("digits").train.subset(64)
    drift = torch.linspace(0.02, 0.2, 64)
    noisy, got = matched_noise(src, drift, seed=0)
    assert noisy.x.dtype == torch.uint8 and noisy.x.shape == src.x.shape and torch.equal(noisy.y, src.y)
    measured = ((noisy.x.float() - src.x.float()) / 255).pow(2).flatten(1).mean(1).sqrt()
    assert torch.allclose(got, measured)
    assert torch.allclose(got, drift, rtol=0.05)  # clipped pixels made up for by a larger noise
    assert torch.equal(matched_noise(src, drift, seed=0)[0].x, noisy.x)


def test_dream_budget_benchmark_separates_budget_from_dreams(tmp_path, capsys):
    from frugal.benchmarks import dream_budget

    args = ["--task", "digits", "--budget", "tiny", "--out", str(tmp_path), "--corrupted-n", "0",
            "--device", "cpu", "--threads", "1"]
    out = dream_budget.main(args + ["--variants", "plain", "dreams", "noise", "dreams-added", "copies-added"])
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("{")  # one line per variant as it is measured, then the whole result
    assert [json.loads(line) for line in lines[:start]] == out["rows"]
    assert json.loads("\n".join(lines[start:]))["rows"] == out["rows"]
    rows = {r["variant"]: r for r in out["rows"]}
    n = out["train_size"]
    assert rows["plain"]["steps"] == rows["dreams"]["steps"] == rows["noise"]["steps"]  # the bench's budget
    assert rows["dreams-added"]["steps"] == rows["copies-added"]["steps"] > rows["dreams"]["steps"]
    assert rows["dreams"]["extra_examples"] == rows["noise"]["extra_examples"] == round(out["mix"] * n)
    assert rows["noise"]["extra_rms_change"] == pytest.approx(rows["dreams"]["extra_rms_change"], rel=0.05)
    assert rows["copies-added"]["extra_rms_change"] == 0
    assert rows["plain"]["test_acc"] == load_run(tmp_path / "rounds" / "round-0")[2]["test_acc"]
    # another run adds its variant; the finished ones are read back, not trained again
    more = dream_budget.main(args + ["--variants", "weighted", "noise"])
    assert {r["variant"]: r["train_seconds"] for r in more["rows"]}["noise"] == rows["noise"]["train_seconds"]
    kept = json.loads((tmp_path / "results.json").read_text())
    assert {r["variant"] for r in kept["rows"]} == set(dream_budget.VARIANTS)
    assert 0 < {r["variant"]: r for r in kept["rows"]}["weighted"]["mean_weight"] < 1


def test_dream_budget_takes_a_finished_run_of_the_same_config_as_round0(tmp_path):
    from frugal.benchmarks import dream_budget
    from frugal.dream.bench import dream_plan

    args = ["--task", "digits", "--budget", "tiny", "--variants", "plain", "--corrupted-n", "0", "--device", "cpu"]
    with pytest.raises(SystemExit, match="not a finished run folder"):
        dream_budget.main(args + ["--out", str(tmp_path / "a"), "--round0", str(tmp_path)])
    base = dream_plan("digits", "tiny", 0, device="cpu")[0]
    r0 = train(base, tmp_path / "r0", quiet=True, progress=False)
    out = dream_budget.main(args + ["--out", str(tmp_path / "b"), "--round0", str(tmp_path / "r0")])
    assert out["rows"][0]["test_acc"] == r0.test_acc and out["rows"][0]["train_seconds"] == r0.train_seconds
    with pytest.raises(ValueError, match="config differs"):  # another plan's run is not taken
        dream_budget.main(args + ["--out", str(tmp_path / "c"), "--round0", str(tmp_path / "r0"),
                                  "--epochs", str(base.epochs + 1)])
