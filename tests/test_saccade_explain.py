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
