"""Hostile and broken inputs to run folders, bench folders and the command line, each built here.

What frugal promises about files a user is handed (docs/files.md): no
code in them runs (a marker file a payload would write stays absent), no crafted file exhausts the
machine (under 2 s and 200 MB), and every fault ends with exit status 2 and a message that names the
input. Model files have their own red-team tests (test_red_team_model_file.py), data folders theirs
(test_red_team_data.py).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from frugal.cli import main
from frugal.train import CHECKPOINT, WEIGHTS, TrainConfig, read_checkpoint, train

DIGITS = dict(task="digits", model="convnet", batch_size=64, lr=3e-3, device="cpu", train_limit=64)
TRAIN_ARGS = ["train", "--task", "digits", "--model", "convnet", "--batch-size", "64", "--lr", "0.003",
              "--device", "cpu", "--train-limit", "64"]


class Payload:
    """What a hostile checkpoint carries: unpickling it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plant_payload(checkpoint, marker) -> None:
    """Rewrite a checkpoint with the payload inside (or write one that is only the payload)."""
    ck = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else {}
    ck["history"] = [Payload(marker)]
    buf = io.BytesIO()
    torch.save(ck, buf)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("red") / "run"
    train(TrainConfig(epochs=1, **DIGITS), run, quiet=True)
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(finished_run, dest)
    return dest


def test_the_payload_is_live_so_the_tests_below_can_fail(run_copy, tmp_path):
    marker = tmp_path / "marker"
    plant_payload(run_copy / CHECKPOINT, marker)
    torch.load(run_copy / CHECKPOINT, weights_only=False)  # what frugal did before: the code runs
    assert marker.read_text() == "ran"


def test_a_pickle_payload_in_a_run_folder_does_not_run_under_resume(run_copy, tmp_path, capsys):
    marker = tmp_path / "marker"
    plant_payload(run_copy / CHECKPOINT, marker)
    assert main(TRAIN_ARGS + ["--epochs", "1", "--out", str(run_copy), "--resume"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert str(run_copy / CHECKPOINT) in err and "pickle" in err and "exec" in err


def test_a_pickle_payload_under_a_bench_out_folder_does_not_run(tmp_path, capsys):
    marker = tmp_path / "marker"
    plant_payload(tmp_path / "out" / "runs" / "baseline" / "digits" / "seed0" / CHECKPOINT, marker)
    rc = main(["bench", "--budget", "tiny", "--tasks", "digits", "--seeds", "1", "--device", "cpu",
               "--out", str(tmp_path / "out")])
    assert rc == 2 and not marker.exists()
    assert "seed0/checkpoint.pt" in capsys.readouterr().err


def test_a_pickle_payload_given_as_round0_to_dream_budget_does_not_run(run_copy, tmp_path):
    from frugal.benchmarks import dream_budget

    marker = tmp_path / "marker"
    plant_payload(run_copy / CHECKPOINT, marker)
    with pytest.raises(ValueError, match="pickle"):
        dream_budget.main(["--task", "digits", "--budget", "tiny", "--round0", str(run_copy), "--out",
                           str(tmp_path / "out"), "--variants", "plain", "--corrupted-n", "0", "--device", "cpu"])
    assert not marker.exists()


def test_round0_copies_only_the_run_s_own_regular_files(run_copy, tmp_path):
    from frugal.train import copy_run

    (run_copy / "notes.txt").write_text("mine")
    dest = copy_run(run_copy, tmp_path / "copy")
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in run_copy.iterdir() if p.name != "notes.txt"
                                                            and not p.name.startswith("."))
    (run_copy / "log.txt").unlink()
    (run_copy / "log.txt").symlink_to("/dev/zero")  # copying its target would never end
    with pytest.raises(ValueError, match="not regular files"):
        copy_run(run_copy, tmp_path / "copy2")


def test_a_checkpoint_written_by_frugal_still_reads(finished_run):
    ck = read_checkpoint(finished_run / CHECKPOINT)
    assert ck["epochs_done"] == 1 and set(ck["model"]) == set(torch.load(finished_run / CHECKPOINT,
                                                                           weights_only=True)["model"])


# --- crafted run folders: config.json and model.safetensors ------------------------------------------


def craft(run, *, config=None, spec=None, weights=None):
    """Overwrite parts of a run folder: config.json's text, its model_spec, or the weights' bytes."""
    meta = json.loads((run / "config.json").read_text())
    if spec is not None:
        meta["model_spec"] = spec
    (run / "config.json").write_text(config if config is not None else json.dumps(meta))
    if weights is not None:
        (run / WEIGHTS).write_bytes(weights)
    return run


BIG_SPECS = {
    "20,000 residual blocks": {"name": "resnet", "in_channels": 1, "image_size": [8, 8], "num_classes": 10,
                               "kw": {"width": 1, "blocks": 20000}},
    "lenet300 at 1000x1000": {"name": "lenet300", "in_channels": 1, "image_size": [1000, 1000], "num_classes": 10},
    "lenet300 at 3000x3000": {"name": "lenet300", "in_channels": 1, "image_size": [3000, 3000], "num_classes": 10},
    "100,000 classes": {"name": "convnet", "in_channels": 1, "image_size": [8, 8], "num_classes": 100_000,
                        "kw": {"width": 4096}},
}
BAD_CONFIGS = {
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "truncated": None,  # filled in from the real file
    "not an object": "[1, 2, 3]",
    "spec of the wrong type": None,
}


@pytest.mark.parametrize("case", sorted(BIG_SPECS))
def test_a_spec_of_a_huge_model_is_refused_before_it_is_built(run_copy, case, capsys):
    craft(run_copy, spec=BIG_SPECS[case])
    t0 = time.perf_counter()
    assert main(["measure", str(run_copy), "--device", "cpu"]) == 2
    assert time.perf_counter() - t0 < 2.0
    err = capsys.readouterr().err
    assert "config.json" in err and "model_spec" in err


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from frugal.train import load_run

    def peak_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    load_run(sys.argv[1])  # warm: imports, the allocator
    out = {}
    for case, run in json.loads(sys.argv[2]).items():
        open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from now
        base, t0 = peak_kb(), time.perf_counter()
        try:
            load_run(run)
            what = "loaded"
        except ValueError as e:
            what = "refused"
        out[case] = dict(outcome=what, seconds=time.perf_counter() - t0, extra_mb=(peak_kb() - base) / 1024)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-memory reset")
def test_crafted_run_folders_cost_under_2_s_and_200_mb_each(finished_run, tmp_path):
    runs = {}
    for i, (case, spec) in enumerate(sorted(BIG_SPECS.items())):
        runs[case] = str(craft(shutil.copytree(finished_run, tmp_path / f"r{i}"), spec=spec))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(finished_run), json.dumps(runs)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for case, r in json.loads(out.stdout).items():
        assert r["outcome"] == "refused", case
        assert r["seconds"] < 2.0 and r["extra_mb"] < 200, (case, r)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_damaged_config_json_is_named(run_copy, case, capsys):
    text = BAD_CONFIGS[case]
    if case == "truncated":
        text = (run_copy / "config.json").read_text()[:40]
    if case == "spec of the wrong type":
        meta = json.loads((run_copy / "config.json").read_text())
        meta["model_spec"]["image_size"] = "big"
        text = json.dumps(meta)
    craft(run_copy, config=text)
    assert main(["measure", str(run_copy), "--device", "cpu"]) == 2
    assert str(run_copy / "config.json") in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other model"])
def test_a_damaged_weights_file_is_named(run_copy, damage, capsys):
    good = (run_copy / WEIGHTS).read_bytes()
    if damage == "other model":
        from safetensors.torch import save

        bad = save({"x": torch.zeros(3)})
    else:
        bad = good[: len(good) // 2] if damage == "truncated" else b"\xff" * 64
    craft(run_copy, weights=bad)
    assert main(["measure", str(run_copy), "--device", "cpu"]) == 2
    assert str(run_copy / WEIGHTS) in capsys.readouterr().err


# --- what a killed run leaves, and how it resumes ----------------------------------------------------


HOLD_TEMP = """
import fcntl, sys, time
with open(sys.argv[1], "ab") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(60)
"""


def test_temp_files_of_killed_writes_are_removed_on_the_next_start_and_live_ones_kept(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(epochs=1, **DIGITS), run, quiet=True)
    old = time.time() - 3600
    stale = run / f".{CHECKPOINT}.k1ll3d.tmp"
    live = run / f".{WEIGHTS}.wr1t1ng.tmp"
    fresh = run / ".metrics.json.n0wnow.tmp"
    for p in (stale, live, fresh):
        p.write_bytes(b"\0" * 1000)
    for p in (stale, live):
        os.utime(p, (old, old))
    writer = subprocess.Popen([sys.executable, "-c", HOLD_TEMP, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        train(TrainConfig(epochs=1, **DIGITS), run, resume=True, quiet=True)  # a finished run resumes at its end
        assert not stale.exists()
        assert live.exists() and fresh.exists()  # a writer holds one; the other may not have locked it yet
    finally:
        writer.kill()
        writer.wait()
    assert "removed" in (run / "log.txt").read_text()


def test_resuming_with_another_thread_count_warns_that_the_run_is_no_longer_bit_identical(tmp_path):
    before = torch.get_num_threads()
    try:
        train(TrainConfig(epochs=1, threads=1, **DIGITS), tmp_path, quiet=True)
        with pytest.warns(UserWarning, match="not be bit-identical.*--threads 1"):
            train(TrainConfig(epochs=1, threads=2, **DIGITS), tmp_path, resume=True, quiet=True)
        assert "warning: resuming" in (tmp_path / "log.txt").read_text()
    finally:
        torch.set_num_threads(before)


def test_a_finite_but_exploding_loss_stops_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TRAIN_ARGS + ["--epochs", "2", "--out", str(out)]
                + ["--lr", "1e6"]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "learning rate" in err
    assert not (out / WEIGHTS).exists()  # no finished run claims a result


# --- the command line: every bad argument named ------------------------------------------------------


@pytest.mark.parametrize("args, named", [
    (["--threads", "0"], "threads"),
    (["--model-kw", "[8]"], "--model-kw"),
    (["--model-kw", "{bad"], "--model-kw"),
    (["--model-kw", '{"blocks": 2}'], "blocks"),
])
def test_bad_train_flags_are_named(tmp_path, args, named, capsys):
    assert main(TRAIN_ARGS + ["--epochs", "1", "--out", str(tmp_path / "run")] + args) == 2
    assert named in capsys.readouterr().err


def test_bench_threads_zero_is_refused(tmp_path, capsys):
    assert main(["bench", "--budget", "tiny", "--tasks", "digits", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads" in capsys.readouterr().err


def test_an_out_folder_below_a_regular_file_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(TRAIN_ARGS + ["--epochs", "1", "--out", str(tmp_path / "file" / "run")]) == 2
    assert str(tmp_path / "file") in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_full_disk_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(TRAIN_ARGS + ["--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*.tmp")) and not list((tmp_path / "run").glob(".*.tmp"))


@pytest.mark.parametrize("row, named", [
    ({"method": "baseline", "task": "digits", "seed": 0}, "'test_acc'"),
    ({"method": "baseline", "task": "digits", "test_acc": 0.5}, "'seed'"),
    ({"method": "baseline", "task": "digits", "seed": 0, "test_acc": "high"}, "'test_acc'"),
    ({"method": "baseline", "task": "digits", "seed": 0, "test_acc": 0.5, "macs": "many"}, "['macs']"),
    ({"method": "baseline", "task": "digits", "seed": 0, "test_acc": 0.5, "corrupted": [1]}, "['corrupted']"),
    ("a row", "not an object"),
])
def test_a_results_file_with_malformed_rows_is_named(tmp_path, row, named, capsys):
    good = {"method": "baseline", "task": "digits", "seed": 1, "test_acc": 0.9}
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "rows": [good, row]}))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and named in err


def test_a_yaml_config_that_expands_without_bound_is_refused(tmp_path, capsys):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 8)]  # 10 x 8^7 values from 1 KB, under a field that is written out whole
    text = "model_kw:\n  " + "\n  ".join(lines) + "\n"
    (tmp_path / "bomb.yaml").write_text(text)
    t0 = time.perf_counter()
    assert main(TRAIN_ARGS + ["--config", str(tmp_path / "bomb.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - t0 < 2.0
    assert "bomb.yaml" in capsys.readouterr().err


def test_a_config_field_of_the_wrong_type_is_named(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("epochs: many\n")
    assert main(TRAIN_ARGS + ["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "epochs must be int" in capsys.readouterr().err


def test_every_stateful_training_aid_resumes_from_a_weights_only_checkpoint(tmp_path):
    """Whatever a hook keeps in the checkpoint must be tensors, numbers, strings and containers:
    the checkpoint is read without pickle, so anything else would make the run unresumable."""
    from frugal.compress.loop import CompressInTheLoop, LoopConfig
    from frugal.kernels.penalty import KernelPenalty, PenaltyConfig, SharedValues

    loop = dict(task="digits", model="lenet300", device="cpu", train_limit=128, batch_size=64)
    hooks = {"compress": ([CompressInTheLoop(LoopConfig(every=1, lam=0.05, steps=(0.1,), kmeans_k=(4,),
                                                        dct_cutoffs=(0,), tie=True))], loop),
             "gmm": ([KernelPenalty(PenaltyConfig(kind="gmm", components=4))], DIGITS),
             "shared": ([SharedValues({"features.0.0": torch.zeros(16, 1, 3, 3, dtype=torch.long)})], DIGITS)}
    for name, (hs, cfg) in hooks.items():
        train(TrainConfig(epochs=1, **cfg), tmp_path / name, hooks=hs, quiet=True)
        saved = read_checkpoint(tmp_path / name / CHECKPOINT)["hooks"]
        assert saved and saved[0], name
        again = train(TrainConfig(epochs=1, **cfg), tmp_path / name, hooks=hs, resume=True, quiet=True)
        assert again.history, name
