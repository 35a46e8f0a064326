import json
import subprocess
import sys

import pytest

from frugal.cli import main


def frugal(*args):
    """Run the real command in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "frugal.cli", *args], capture_output=True, text=True)


def test_train_measure_bench_report_end_to_end_on_digits(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--task", "digits", "--model", "lenet300", "--epochs", "2", "--lr", "0.003",
                 "--device", "cpu", "--out", str(run)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["test_acc"] > 0.5

    assert main(["measure", str(run), "--device", "cpu"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["test_acc"] == trained["test_acc"]  # the reloaded weights give the same accuracy
    assert measured["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert measured["macs"] == 64 * 300 + 300 * 100 + 100 * 10
    assert measured["latency_ms"] > 0 and measured["throughput"] > 0 and measured["threads"] >= 1
    assert (run / "measure.json").exists()

    out = tmp_path / "bench"
    p = frugal("bench", "--budget", "tiny", "--tasks", "digits", "--out", str(out), "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "test acc" in p.stdout and (out / "report.html").exists()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "| digits | baseline | convnet | 1 ep × 256 | 1 |" in (out / "report.md").read_text()  # with its plan


def test_train_from_a_yaml_config_with_flag_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: digits\nmodel: convnet\nepochs: 3\nlr: 0.003\nmodel_kw: {width: 8}\n")
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    assert meta["config"]["epochs"] == 1 and meta["config"]["model_kw"] == {"width": 8}


@pytest.mark.parametrize("args, msg", [
    (["train", "--task", "digits", "--model", "lenet6", "--out", "{tmp}/x"], "unknown model 'lenet6'; known:"),
    (["train", "--task", "no-such-data", "--out", "{tmp}/x"], "unknown data set 'no-such-data'"),
    (["train", "--task", "digits", "--optimizer", "lbfgs", "--out", "{tmp}/x"], "unknown optimizer 'lbfgs'"),
    (["measure", "{tmp}/nothing-here"], "is not a finished run"),
    (["report", "{tmp}"], "no results.json"),
    (["bench", "--methods", "magic", "--out", "{tmp}/b"], "unknown bench method 'magic'"),
    (["data", "fetch", "cifar10"], "unknown data set 'cifar10'"),
])
def test_bad_input_exits_2_with_a_message_that_names_it(tmp_path, args, msg):
    p = frugal(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert msg in p.stderr
    assert "Traceback" not in p.stderr


def test_data_list_shows_every_data_set(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist", "fashion-mnist", "digits", "cluttered-mnist-60", "cluttered-mnist-100"):
        assert name in out


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lenet5" in out and "431,080" in out


def test_every_train_flag_comes_from_the_config_with_its_help():
    """One place for a setting: each TrainConfig field is a `frugal train` flag whose help is the
    field's own text."""
    import dataclasses

    from frugal.cli import build_parser
    from frugal.train import TrainConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    flags = {a.dest: a for a in sub.choices["train"]._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in flags, f.name
        assert f.metadata["help"] and flags[f.name].help.startswith(f.metadata["help"]), f.name
    assert all(a.help for a in flags.values()), [d for d, a in flags.items() if not a.help]
