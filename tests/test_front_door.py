"""The front door: the README (size, links, every quoted figure from a `results/` folder made by a
command in the repository), the report's summary table, and the headline bench."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from frugal.bench import BenchConfig, Summary, bench, list_methods, register_method
from frugal.report import summary_lines

ROOT = Path(__file__).parent.parent
FIGURE = re.compile(r"\d+\.\d+ ± \d+\.\d+%|\d+\.\d+x|\d+(?:\.\d+)?% of the")


def _links(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)\)", text) if not re.match(r"(https?|mailto):", m.group(1))]


def test_the_readme_is_a_front_door_of_at_most_12_kb_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    for doc in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "results").rglob("README.md")]:
        for link in _links(doc.read_text()):
            path = link.partition("#")[0]
            assert not path or (doc.parent / path).exists(), f"{doc.relative_to(ROOT)} links to missing {link}"
    assert "<!-- test-command -->" in readme and "<!-- /test-command -->" in readme  # what CI reads


def _made_by(folder: Path) -> str:
    """The command recorded in a results folder's results.json: a bench's argv or a script's command."""
    res = json.loads((folder / "results.json").read_text())
    if "meta" in res:
        argv = res["meta"].get("argv") or []
        return " ".join(argv[1:]) if argv and "bench" in argv else ""
    return res.get("command", "")


def test_every_figure_the_readme_quotes_comes_from_a_results_folder_with_its_command():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What each idea buys"):readme.index("## Quick start")]
    rows = [ln for ln in table.splitlines() if ln.startswith("| [")]
    assert len(rows) == 5  # one per idea
    for row in rows:
        if not FIGURE.search(row):
            assert "not yet in `results/`" in row, row  # an idea without figures says so
            continue
        folders = [link for link in _links(row) if link.startswith("results/")]
        assert folders, f"a figure without its results/ folder: {row[:80]}"
        reports = ""
        for link in folders:
            folder = ROOT / Path(link).parent
            made = _made_by(folder)
            assert made.startswith(("bench", "python -m frugal.benchmarks.")), f"{folder}: no command recorded"
            reports += (folder / "report.md").read_text()
        for figure in re.findall(r"\d+\.\d+ ± \d+\.\d+", row):  # each mean ± std is one the report computed
            assert figure in reports, f"{figure} is in no report of {folders}"


def test_every_results_folder_says_what_made_it():
    for res in (ROOT / "results").glob("*/results.json"):
        assert _made_by(res.parent), f"{res} records no command"
        assert (res.parent / "README.md").exists(), f"{res.parent} has no README"


def _rows(variants: dict[str, list[float]], cost: dict[str, float]) -> list[dict]:
    return [{"method": "summary-test", "task": "t", "seed": s, "variant": v, "test_acc": a, "macs": cost[v]}
            for v, accs in variants.items() for s, a in enumerate(accs)]


def test_the_summary_picks_the_best_point_and_the_nearest_control_and_says_beats_matches_or_loses():
    if "summary-test" not in list_methods():
        register_method("summary-test", tasks=("t",),
                        summary=Summary(claim="c", idea="idea *", reference="plain", control="ctrl *",
                                        pick="cheapest"))(lambda ctx, task, seed: [])
    cost = {"plain": 100, "idea a": 50, "idea b": 20, "ctrl 50": 50, "ctrl 20": 20}
    # idea b is the cheapest within half a point of plain; the control of the nearest cost is ctrl 20
    lines = summary_lines(_rows({"plain": [0.90, 0.90], "idea a": [0.90, 0.90], "idea b": [0.897, 0.897],
                                 "ctrl 50": [0.80, 0.80], "ctrl 20": [0.85, 0.85]}, cost))
    (ln,) = [x for x in lines if x["method"] == "summary-test"]
    assert (ln["idea"]["variant"], ln["control"]["variant"], ln["verdict"]) == ("idea b", "ctrl 20", "beats")
    lines = summary_lines(_rows({"plain": [0.9, 0.9], "idea b": [0.85, 0.87], "ctrl 20": [0.86, 0.86]}, cost))
    assert [x["verdict"] for x in lines if x["method"] == "summary-test"] == ["matches"]  # within the seeds' spread
    lines = summary_lines(_rows({"plain": [0.9, 0.9], "idea b": [0.80, 0.80], "ctrl 20": [0.86, 0.86]}, cost))
    assert [x["verdict"] for x in lines if x["method"] == "summary-test"] == ["loses to"]


def test_the_headline_bench_runs_each_idea_s_headline_comparison_with_its_control(tmp_path):
    """`frugal bench --quick` alone runs the headline comparisons; here on digits at the tiny budget."""
    ideas = ("compress", "kernels", "dream", "saccade", "specialists")
    bench(BenchConfig(out=str(tmp_path), budget="tiny", methods=("baseline", *ideas), tasks=("digits",), seeds=1,
                      device="cpu", headline=True), log=lambda s: None)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    variants = {m: sorted(r["variant"] for r in rows if r["method"] == m) for m in ideas}
    assert variants["compress"] == ["lenet300 code λ=0.03", "lenet300 dense",
                                    "lenet300 torch-prune (code's sparsity, λ=0.03)"]
    assert variants["dream"] == ["control augment", "round 0 (plain)", "round 1"]
    assert variants["saccade"] == ["blockcnn", "saccadic"]
    assert variants["specialists"][0] == "base" and variants["specialists"][1].startswith("equal-MACs CNN")
    assert "tree d1" in variants["specialists"] and "tree d2" not in variants["specialists"]
    assert "plain" in variants["kernels"] and len([v for v in variants["kernels"] if v.startswith("constrained")]) == 1
    assert all(r["selection"] == "headline" for r in rows)
    md = (tmp_path / "report.md").read_text()
    summary = md[md.index("## Summary"):md.index("## Every row")]
    for idea in ideas:  # dream's line compares corrupted accuracy, which the tiny budget does not measure
        assert (f"| {idea} |" in summary) == (idea != "dream"), idea
    assert re.search(r"\| (beats|matches|loses to) \|", summary)


def test_the_quick_command_alone_is_the_headline_bench(monkeypatch):
    from frugal import cli

    seen = {}
    monkeypatch.setattr("frugal.bench.bench", lambda cfg, log: seen.setdefault("cfg", cfg) and Path("x/results.json"))
    cli.main(["bench", "--quick", "--out", "unused"])
    assert seen["cfg"].headline and set(seen["cfg"].methods) == set(list_methods())
    seen.clear()
    cli.main(["bench", "--quick", "--methods", "kernels", "--out", "unused"])
    assert not seen["cfg"].headline and seen["cfg"].methods == ("kernels",)
