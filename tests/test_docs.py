"""The guides' examples run as they stand: every ```python block of docs/byo.md, in order, in one
namespace, in a fresh folder (a block whose first line is `# NAME.py` is written to that file)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).parent.parent / "docs"


def blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_the_bring_your_own_guide_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("FRUGAL_TRUST_MODELS", raising=False)
    found = blocks(DOCS / "byo.md")
    assert len(found) >= 5
    ns: dict = {"__name__": "byo_guide"}
    for code in found:
        first = code.splitlines()[0]
        m = re.fullmatch(r"# (\w+\.py)\b.*", first)
        if m:
            (tmp_path / m.group(1)).write_text(code)
            continue
        exec(compile(code, f"docs/byo.md block", "exec"), ns)
    sys.modules.pop("mynets", None)
    # what the blocks claim, checked
    assert ns["res"].test_acc > 0.5 and type(ns["model"]).__name__ == "MyNet"
    assert ns["size"] == (tmp_path / "mine.frugal").stat().st_size
    assert type(ns["again"]).__name__ == "MyNet" and ns["result"].kernels > 0
    assert (tmp_path / "bench-mine" / "results.json").exists()
    assert ns["record"]["bytes"] > 0 and ns["loop"].chosen
    assert ns["gate"].gated == ["block_a.0", "block_b.0"] and 0 < ns["gate"].attended() <= 1
    assert ns["built"]["levels"][0]["jobs"] >= 1 and ns["tree"].root.tapped.taps == ["block_a", "block_b"]
    with torch.no_grad():
        assert torch.equal(ns["loaded"](ns["x"]), ns["logits"])
