import dataclasses
import json

import numpy as np
import pytest

from frugal.bench import BenchConfig, bench, get_method, list_methods, register_method
from frugal.report import aggregate, write_report


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench(BenchConfig(out=str(out), budget="tiny", tasks=("digits",), seeds=2, device="cpu"), log=lambda s: None)
    return out


def test_bench_writes_one_row_per_seed_with_every_measured_field(tiny_bench):
    res = json.loads((tiny_bench / "results.json").read_text())
    rows = res["rows"]
    assert [(r["method"], r["task"], r["seed"]) for r in rows] == [("baseline", "digits", 0), ("baseline", "digits", 1)]
    for r in rows:
        for key in ("test_acc", "val_acc", "params", "nonzero_params", "macs", "fp32_bytes", "zstd_bytes",
                    "train_seconds", "run_dir"):
            assert key in r, key
        # convnet on 8x8: conv 1->16 (144) + BN (32), conv 16->32 (4,608) + BN (64), fc 32->10 (330);
        # fp32 bytes add BN running means and variances (2 x 48)
        assert 0 <= r["test_acc"] <= 1 and r["params"] == 5_178 and r["fp32_bytes"] == 4 * (5_178 + 96)
    assert rows[0]["test_acc"] != rows[1]["test_acc"] or rows[0]["val_acc"] != rows[1]["val_acc"]  # seeds differ
    assert res["meta"]["config"]["budget"] == "tiny" and "torch" in res["meta"]["versions"]


def test_report_shows_mean_and_std_over_seeds(tiny_bench):
    rows = json.loads((tiny_bench / "results.json").read_text())["rows"]
    accs = [100 * r["test_acc"] for r in rows]
    md = (tiny_bench / "report.md").read_text()
    assert f"{np.mean(accs):.2f} ± {np.std(accs, ddof=1):.2f}" in md
    html = (tiny_bench / "report.html").read_text()
    assert "<table>" in html and "acc_vs_macs.png" in html
    for png in ("acc_vs_macs.png", "acc_vs_bytes.png", "samples/digits.png"):
        assert (tiny_bench / png).stat().st_size > 1000, png


def test_bench_started_again_keeps_finished_rows(tiny_bench):
    before = json.loads((tiny_bench / "results.json").read_text())["rows"]
    logs = []
    bench(BenchConfig(out=str(tiny_bench), budget="tiny", tasks=("digits",), seeds=2, device="cpu"), log=logs.append)
    after = json.loads((tiny_bench / "results.json").read_text())["rows"]
    assert after == before
    assert sum("done before, kept" in s for s in logs) == 2


def test_report_rebuilds_from_results_alone(tiny_bench, tmp_path):
    (tmp_path / "results.json").write_text((tiny_bench / "results.json").read_text())
    md, html = write_report(tmp_path)
    assert md.read_text() .count("| digits | baseline |") == 1


def test_bench_refuses_an_out_dir_of_another_budget(tiny_bench):
    with pytest.raises(ValueError, match="holds a 'tiny' bench"):
        bench(BenchConfig(out=str(tiny_bench), budget="quick", tasks=("digits",), seeds=1), log=lambda s: None)


def test_aggregate_latency_ratio_only_within_one_process():
    rows = [dict(task="t", method="baseline", seed=0, test_acc=0.9, latency_ms=2.0, process_id="a"),
            dict(task="t", method="idea", seed=0, test_acc=0.8, latency_ms=1.0, process_id="a"),
            dict(task="t", method="other", seed=0, test_acc=0.8, latency_ms=1.0, process_id="b")]
    agg = {e["method"]: e for e in aggregate(rows)}
    assert agg["idea"]["latency_vs_baseline"] == 0.5
    assert "latency_vs_baseline" not in agg["other"]


def test_registered_method_runs_through_the_bench(tmp_path):
    name = "constant-test-method"
    if name not in list_methods():
        @register_method(name, tasks=("digits",))
        def run(ctx, task, seed):
            return [dict(test_acc=0.5 + seed / 10, params=1, macs=1.0, zstd_bytes=10, variant="v")]
    bench(BenchConfig(out=str(tmp_path), budget="tiny", methods=(name,), seeds=2), log=lambda s: None)
    md = (tmp_path / "report.md").read_text()
    assert "| digits | constant-test-method | v | – | 2 | 55.00 ± 7.07 |" in md


def test_variants_are_refused_for_a_method_that_trains_its_plan_as_a_whole(tmp_path):
    with pytest.raises(ValueError, match=r"baseline trains its plan as a whole.*use it with: .*kernels"):
        bench(BenchConfig(out=str(tmp_path), budget="tiny", tasks=("digits",), variants=("x*",)), log=lambda s: None)
    assert not (tmp_path / "results.json").exists()


def test_unknown_method_and_task_are_named():
    with pytest.raises(ValueError, match=r"unknown bench method 'nope'; known: .*baseline"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown task 'no-such-task'; known: .*mnist.*folder:"):
        bench(BenchConfig(out="unused", tasks=("no-such-task",)), log=lambda s: None)
    name = "digits-only-test-method"
    if name not in list_methods():
        register_method(name, tasks=("digits",))(lambda ctx, task, seed: [])
    with pytest.raises(ValueError, match="nothing to run"):  # a known task no asked method has a plan for
        bench(BenchConfig(out="unused", methods=(name,), tasks=("translated-mnist-60",)), log=lambda s: None)


def test_every_idea_has_a_plan_for_any_task():
    """The user's own data: each idea runs a default plan on a task it has none for."""
    ideas = {"compress", "dream", "kernels", "saccade", "specialists"}
    assert ideas <= set(list_methods())
    assert all(list_methods()[m].knows("folder:/any/where") for m in ideas | {"baseline"})


def test_report_has_a_corrupted_suite_table_averaged_over_seeds(tmp_path):
    rows = [dict(task="mnist", method="baseline", variant="lenet5", seed=s, test_acc=0.99,
                 corrupted={"rotate-s1": 0.9 + s / 100, "stripe-s5": 0.5}, corrupted_mean_acc=0.7) for s in (0, 1)]
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    md, html = write_report(tmp_path)
    text = md.read_text()
    assert "| task | method | variant | seeds | corruption | s1 | s5 | mean |" in text
    assert "| mnist | baseline | lenet5 | 2 | rotate | 90.5 | – | 90.5 |" in text
    assert "| mnist | baseline | lenet5 | 2 | stripe | – | 50.0 | 50.0 |" in text
    assert "<td>90.5</td>" in html.read_text()


HOLD_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write("4242\\n"); f.flush()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_bench_on_the_same_out_is_refused_and_the_folder_is_free_once_its_driver_dies(tmp_path, capsys):
    """One driver per --out: it alone writes results.json. Its lock dies with it, however it dies."""
    import subprocess
    import sys

    from frugal.bench import BenchBusy
    from frugal.cli import main

    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / ".bench.lock"), "60"],
                              stdout=subprocess.PIPE, text=True)
    cfg = BenchConfig(out=str(tmp_path), budget="tiny", tasks=("digits",), seeds=1, device="cpu")
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BenchBusy, match="another frugal bench is running on"):
            bench(cfg, log=lambda s: None)
        rc = main(["bench", "--budget", "tiny", "--tasks", "digits", "--seeds", "1", "--device", "cpu",
                   "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert rc == 2 and str(tmp_path) in err and "pid 4242" in err and "--executor process" in err
        assert not (tmp_path / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()
    bench(cfg, log=lambda s: None)  # the holder died without unlocking: the folder is free
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in res["rows"]] == [0]
    assert [(j["method"], j["seed"], j["rows"]) for j in res["jobs"]] == [("baseline", 0, 1)]
    assert not list(tmp_path.rglob("*.claim"))  # runs are not claimed by files any more


def test_a_run_that_ends_without_a_row_is_reported_in_the_exit_status(tmp_path, capsys):
    from frugal.bench import BenchIncomplete
    from frugal.cli import EXIT_INCOMPLETE, main

    name = "test-no-rows"
    register_method(name, tasks=("digits",))(lambda ctx, t, s: [])
    with pytest.raises(BenchIncomplete, match=f"{name} digits seed 0"):
        bench(BenchConfig(out=str(tmp_path / "a"), budget="tiny", methods=(name,), tasks=("digits",), seeds=1,
                          device="cpu"), log=lambda s: None)
    rc = main(["bench", "--budget", "tiny", "--methods", name, "--tasks", "digits", "--seeds", "1", "--device", "cpu",
               "--out", str(tmp_path / "b")])
    assert rc == EXIT_INCOMPLETE == 3
    assert f"{name} digits seed 0" in capsys.readouterr().err


def test_baseline_latency_ratio_is_one_and_others_pair_with_their_seed():
    rows = [dict(task="t", method="baseline", seed=0, test_acc=0.9, latency_ms=2.0, process_id="a"),
            dict(task="t", method="baseline", seed=1, test_acc=0.9, latency_ms=4.0, process_id="a"),
            dict(task="t", method="idea", seed=0, test_acc=0.8, latency_ms=1.0, process_id="a"),
            dict(task="t", method="idea", seed=1, test_acc=0.8, latency_ms=1.0, process_id="a")]
    agg = {e["method"]: e for e in aggregate(rows)}
    assert agg["baseline"]["latency_vs_baseline"] == 1.0
    assert agg["idea"]["latency_vs_baseline"] == (1 / 2 + 1 / 4) / 2


def test_corrupted_suite_variants_side_by_side_average_severities_and_seeds():
    from frugal.report import corrupted_by_variant

    def row(variant, seed, c, method="m"):
        return dict(task="mnist", method=method, variant=variant, seed=seed, test_acc=0.9, corrupted=c)

    rows = [row("plain", 0, {"blur-s1": 0.9, "blur-s2": 0.7, "fog-s1": 0.5}),
            row("plain", 1, {"blur-s1": 0.8, "blur-s2": 0.6, "fog-s1": 0.3}),
            row("dreams", 0, {"blur-s1": 1.0, "blur-s2": 1.0, "fog-s1": 0.1}),
            row("lenet5", 0, {"blur-s1": 0.5}, method="baseline")]  # one variant: no side-by-side table
    ((title, (header, body)),) = corrupted_by_variant(rows)
    assert "mnist" in title and "`m`" in title
    assert header == ["corruption", "plain (2 seeds)", "dreams (1 seed)"]
    assert body == [["blur", "75.0", "100.0"], ["fog", "40.0", "10.0"], ["mean", "63.3", "70.0"]]


def test_a_method_s_own_fields_get_a_table_of_means(tmp_path):
    from frugal.report import method_tables

    name = "test-own-fields"
    register_method(name, tasks=("digits",), fields=(("kept", "fraction kept", "{:.1%}"),))(lambda ctx, t, s: [])
    rows = [{"method": name, "task": "digits", "variant": "v", "seed": s, "test_acc": 0.5, "kept": k}
            for s, k in ((0, 0.2), (1, 0.4))]
    rows.append({"method": "baseline", "task": "digits", "variant": "convnet", "seed": 0, "test_acc": 0.9})
    tables = dict(method_tables(rows))
    header, body = tables[f"Method `{name}`: its own measurements (mean ± std over seeds)"]
    # std over seeds with ddof 1: |0.4 - 0.2| / sqrt(2)
    assert header == ["task", "variant", "seeds", "fraction kept"] and body == [["digits", "v", "2", "30.0% ± 14.1%"]]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    md, _ = write_report(tmp_path)
    assert "| digits | v | 2 | 30.0% ± 14.1% |" in md.read_text()
    rows[1]["seed"], rows[1]["variant"] = 0, "w"  # one seed: no std
    assert dict(method_tables(rows))[f"Method `{name}`: its own measurements (mean ± std over seeds)"][1] == [
        ["digits", "v", "1", "20.0%"], ["digits", "w", "1", "40.0%"]]


def test_a_method_s_distributions_get_a_table_of_shares(tmp_path):
    from frugal.report import count_tables

    name = "test-own-counts"  # (a field name is the same field in every method's rows: dream has "steps")
    register_method(name, tasks=("digits",), counts=(("hops", "images by hops"),))(lambda ctx, t, s: [])
    rows = [{"method": name, "task": "digits", "variant": "v", "seed": s, "test_acc": 0.5, "hops": c}
            for s, c in ((0, '{"1": 3, "2": 1}'), (1, '{"1": 1, "10": 3}'))]
    rows.append({"method": name, "task": "digits", "variant": "w", "seed": 0, "test_acc": 0.5})  # nothing counted
    ((title, (header, body)),) = count_tables(rows)
    assert title == f"Method `{name}`: images by hops (share, summed over seeds)"
    assert header == ["task", "variant", "seeds", "counted", "1", "2", "10"]  # values in numeric order
    assert body == [["digits", "v", "2", "8", "50.0%", "12.5%", "37.5%"]]  # summed over the seeds, then shared
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    md, _ = write_report(tmp_path)
    assert "| digits | v | 2 | 8 | 50.0% | 12.5% | 37.5% |" in md.read_text()
    for bad in ('{"1": -1}', '{"1": 1.5}', '[1, 2]', "not json", 3, '{"1": true}'):
        rows[0]["hops"] = bad
        (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
        with pytest.raises(ValueError, match=r"\['hops'\] of the wrong type"):
            write_report(tmp_path)


def test_report_rebuilds_a_benchmark_script_s_results(tmp_path):
    res = {"benchmark": "fuzz", "command": "python -m frugal.benchmarks.fuzz --cases 3", "cases": 3,
           "outcomes": {"ModelFileError": 2, "identical": 1},
           "by_kind": {"flip": {"ModelFileError": 2}, "splice": {"identical": 1}}, "versions": {"torch": "x"},
           "slowest_case": {"kind": "flip", "nested": {"a": 1}}, "bases": [1, 2]}
    (tmp_path / "results.json").write_text(json.dumps(res))
    md, html = write_report(tmp_path)
    text = md.read_text()
    assert "`python -m frugal.benchmarks.fuzz --cases 3`" in text and "| cases | 3 |" in text
    assert "| ModelFileError | 2 |" in text
    assert "| flip | 2 | – |" in text and "| splice | – | 1 |" in text
    assert "<td>ModelFileError</td>" in html.read_text()


def test_a_method_that_trains_the_baseline_s_exact_run_reuses_it(tmp_path):
    """The same config and seed give the same run: a copy of the baseline's, not a second training."""
    from frugal.bench import baseline_config, train_and_measure

    name = "same-as-baseline-test-method"
    if name not in list_methods():
        @register_method(name, tasks=("digits",))
        def run(ctx, task, seed):
            cfg = baseline_config(task, ctx.budget, seed, device=str(ctx.device))
            other = dataclasses.replace(cfg, lr=cfg.lr / 2)
            return [{**train_and_measure(ctx, cfg, ctx.run_dir(name, task, seed, "same")), "variant": "same"},
                    {**train_and_measure(ctx, other, ctx.run_dir(name, task, seed, "other")), "variant": "other"}]
    bench(BenchConfig(out=str(tmp_path), budget="tiny", methods=("baseline", name), tasks=("digits",), seeds=1,
                      device="cpu"), log=lambda s: None)
    rows = {r["variant"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    base = rows["convnet"]
    assert rows["same"]["test_acc"] == base["test_acc"] and rows["same"]["train_seconds"] == base["train_seconds"]
    same_log = (tmp_path / rows["same"]["run_dir"] / "log.txt").read_text()
    assert "resumed from epoch 1" in same_log and "resumed" not in (tmp_path / rows["other"]["run_dir"] / "log.txt").read_text()


def test_the_plan_s_jobs_wait_for_their_parts_and_for_the_baseline_and_leave_out_unpicked_parts(tmp_path):
    import torch

    from frugal.bench import BenchContext, build_jobs

    def graph(variants=(), methods=("baseline", "saccade", "compress")):
        cfg = BenchConfig(out=str(tmp_path), methods=methods, tasks=("digits",), seeds=1, variants=variants,
                          executor="process")
        ctx = BenchContext(tmp_path, "tiny", torch.device("cpu"), variants=variants)
        plan = [(get_method(m), "digits", 0) for m in methods]
        return {j.name.replace(" digits seed 0", ""): set(j.after) for j in build_jobs(cfg, plan, ctx, "d", "", ())}

    g = graph()
    base = "baseline digits seed 0"
    assert g["baseline"] == set()
    assert g["saccade [twin]"] == {base} and g["saccade [ram]"] == {base}
    assert g["saccade [saccadic]"] == g["saccade [trajectory]"] == {base, "saccade digits seed 0 [twin]"}
    assert g["compress [lenet300 code 0.01]"] == {base}  # beside the dense net; its control waits for both
    assert g["compress [lenet300 code 0.01 control]"] == {base, "compress digits seed 0 [lenet300 dense]",
                                                          "compress digits seed 0 [lenet300 code 0.01]"}
    # --variants: parts whose plain labels it does not match are left out, and nothing waits for them
    g = graph(variants=("lenet300 code λ=0.01", "saccadic*"), methods=("saccade", "compress"))
    assert set(g) == {"saccade [saccadic]", "compress [lenet300 dense]", "compress [lenet300 code 0.01]"}
    assert g["saccade [saccadic]"] == set()  # the twin's part is left out: the saccadic part trains it itself


def test_a_part_whose_plan_grew_runs_again_and_the_others_are_kept(tmp_path):
    """A part finished under the whole plan is done only while its list of variants is the same: a
    test-time point added to it later must be measured, not skipped as done before."""
    from frugal.methods import Part

    plan = {"a": ["a"], "b": ["b"]}
    calls = []

    def run(ctx, task, seed):
        calls.append(ctx.part)
        return [{"method": "grows-test", "task": task, "seed": seed, "variant": v, "test_acc": 0.5,
                 "params": 1, "macs": 1}
                for v in plan["a"] + plan["b"] if ctx.wants(v)]

    if "grows-test" not in list_methods():
        register_method("grows-test", tasks=("digits",), selectable=True,
                        parts=lambda ctx, task: tuple(Part(k, tuple(v)) for k, v in plan.items()))(
            lambda ctx, task, seed: run(ctx, task, seed))
    cfg = BenchConfig(out=str(tmp_path), budget="tiny", methods=("grows-test",), tasks=("digits",), seeds=1,
                      device="cpu")
    bench(cfg, log=lambda s: None)
    assert sorted(calls) == [("a",), ("b",)]
    calls.clear()
    plan["b"].append("b point")  # the plan grows: part b has a new variant
    logs = []
    bench(cfg, log=logs.append)
    assert calls == [("b", "b point")] and sum("done before, kept" in s for s in logs) == 1
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert sorted(r["variant"] for r in rows) == ["a", "b", "b point"]
