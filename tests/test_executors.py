"""The job graph and its executors (frugal.executors), and the bench run on each executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frugal.executors import Job, LocalExecutor, ProcessExecutor, check_graph, run_graph


def _log_job(spec):
    """Append the job's name to its log file; fail while `fail_left` says so (a counter file)."""
    path, name, fails = spec
    if fails:
        left = Path(fails)
        n = int(left.read_text())
        if n > 0:
            left.write_text(str(n - 1))
            raise RuntimeError(f"{name} failed on purpose")
    with open(path, "a") as f:
        f.write(name + "\n")
    return name.upper()


def _die_once(spec):
    """Kill its own worker the first time (as the kernel's OOM killer would), succeed the next."""
    marker = Path(spec)
    if not marker.exists():
        marker.write_text("died")
        os._exit(9)
    return "second try"


def _sleep_and_report(spec):
    Path(spec).write_text(str(os.getpid()))
    time.sleep(60)


def test_the_graph_is_checked_for_unknown_jobs_duplicates_and_cycles():
    with pytest.raises(ValueError, match="waits for 'x', which is not in the graph"):
        check_graph([Job("a", None, after=("x",))])
    with pytest.raises(ValueError, match="two jobs are named 'a'"):
        check_graph([Job("a", None), Job("a", None)])
    with pytest.raises(ValueError, match="cycle: a -> b -> c -> a"):
        check_graph([Job("a", None, after=("b",)), Job("b", None, after=("c",)), Job("c", None, after=("a",))])


def test_jobs_run_after_what_they_wait_for_and_the_driver_sees_each_result(tmp_path):
    log = tmp_path / "order"
    jobs = [Job("d", (log, "d", None), after=("b", "c")), Job("b", (log, "b", None), after=("a",)),
            Job("c", (log, "c", None), after=("a",)), Job("a", (log, "a", None))]
    seen = []
    out = run_graph(jobs, _log_job, LocalExecutor(), on_done=lambda j, r: seen.append((j.name, r)))
    assert log.read_text().split() == ["a", "b", "c", "d"]  # dependencies first, then list order
    assert seen == [("a", "A"), ("b", "B"), ("c", "C"), ("d", "D")]
    assert out.done == {"a": "A", "b": "B", "c": "C", "d": "D"} and not out.failed and not out.blocked


def test_a_failed_job_is_retried_a_bounded_number_of_times_then_reported_with_what_waited_for_it(tmp_path):
    log, fails = tmp_path / "order", tmp_path / "fails"
    fails.write_text("1")  # fails once: the retry succeeds
    lines = []
    out = run_graph([Job("a", (log, "a", str(fails))), Job("b", (log, "b", None), after=("a",))], _log_job,
                    LocalExecutor(), retries=1, log=lines.append)
    assert out.done == {"a": "A", "b": "B"} and any("a: failed (RuntimeError: a failed on purpose); starting it "
                                                    "again (try 2 of 2)" in s for s in lines)
    fails.write_text("5")  # fails every try
    log.unlink()
    jobs = [Job("a", (log, "a", str(fails))), Job("b", (log, "b", None), after=("a",)),
            Job("c", (log, "c", None), after=("b",)), Job("e", (log, "e", None))]
    out = run_graph(jobs, _log_job, LocalExecutor(), retries=2, log=lines.append)
    assert fails.read_text() == "2"  # three tries, no more
    assert list(out.failed) == ["a"] and "a failed on purpose" in out.failed["a"]
    assert out.blocked == {"b": "a", "c": "a"}
    assert out.done == {"e": "E"} and log.read_text().split() == ["e"]  # the independent job still ran


def _bad_input(spec):
    with open(spec, "a") as f:
        f.write("tried\n")
    raise ValueError(f"{spec} is not a frugal file; give a file frugal wrote")


def test_a_job_that_fails_on_its_input_is_not_started_again(tmp_path):
    """The same input fails the same way: no retry; the error keeps its type for the exit status."""
    tries = tmp_path / "tries"
    lines = []
    out = run_graph([Job("a", str(tries))], _bad_input, LocalExecutor(), retries=3, no_retry=(ValueError,),
                    log=lines.append)
    assert tries.read_text() == "tried\n" and isinstance(out.errors["a"], ValueError)
    assert any("a: failed after 1 try" in s for s in lines)


def test_the_process_pool_runs_jobs_side_by_side_and_survives_a_worker_that_dies(tmp_path):
    log = tmp_path / "order"
    out = run_graph([Job(n, (log, n, None)) for n in "abcd"], _log_job, ProcessExecutor(2))
    assert sorted(log.read_text().split()) == list("abcd") and out.done == dict(zip("abcd", "ABCD"))
    lines = []
    out = run_graph([Job("z", str(tmp_path / "marker"))], _die_once, ProcessExecutor(2), retries=1, log=lines.append)
    assert out.done == {"z": "second try"}  # the pool was started again for the retry
    assert any("z: failed" in s and "starting it again" in s for s in lines)


def test_ctrl_c_in_the_driver_stops_the_running_workers(tmp_path):
    pidfile = tmp_path / "pid"
    ex = ProcessExecutor(2)  # both start at once
    started = []

    def interrupt(job, result):  # the first job's end: the user presses Ctrl-C while the second runs
        started.append(_wait_pid(pidfile))
        raise KeyboardInterrupt

    jobs = [Job("quick", str(tmp_path / "q")), Job("slow", str(pidfile))]
    with pytest.raises(KeyboardInterrupt):
        run_graph(jobs, _pid_then_sleep, ex, on_done=interrupt)
    pid = started[0]
    for _ in range(100):  # terminated: gone within a few seconds, long before its 60 s sleep ends
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid)


def _pid_then_sleep(spec):
    if spec.endswith("q"):
        return "quick"
    return _sleep_and_report(spec)


def _wait_pid(pidfile: Path) -> int:
    for _ in range(600):
        text = pidfile.read_text() if pidfile.exists() else ""
        if text:
            return int(text)
        time.sleep(0.05)
    raise AssertionError("the slow job never started")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (terminated, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------
# The bench on each executor

PLAN = ["--budget", "tiny", "--methods", "baseline", "saccade", "dream", "--tasks", "digits", "--seeds", "2",
        "--device", "cpu", "--threads", "1"]
TIMES = ("seconds", "latency", "per_s", "process_id")


def _measured(out: Path) -> dict[tuple, dict]:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return {(r["method"], r["task"], r["seed"], r["variant"]): {k: v for k, v in r.items()
                                                                if not any(t in k for t in TIMES)} for r in rows}


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    from frugal.cli import main

    out = tmp_path_factory.mktemp("local")
    assert main(["bench", *PLAN, "--out", str(out)]) == 0
    return _measured(out)


def test_the_process_executor_measures_the_same_rows_as_the_local_one(local_rows, tmp_path, capsys):
    from frugal.cli import main

    assert main(["bench", *PLAN, "--executor", "process", "--jobs", "2", "--out", str(tmp_path)]) == 0
    assert _measured(tmp_path) == local_rows
    assert len(local_rows) > 20  # baseline, twin, saccadic at 5 fractions, RAM, dream's 4: per seed
    jobs = json.loads((tmp_path / "results.json").read_text())["jobs"]
    assert len(jobs) == 22  # per seed: baseline; saccade's twin, saccadic, ram, 2 trajectories; dream's other
    # net, 2 rounds, 2 controls
    by = {(j["method"], j["seed"], j["part"]): j for j in jobs}
    # dependencies held: a saccadic model was tuned from its finished twin; round 1 dreamed with round 0's
    # net; dream came after the baseline
    for s in (0, 1):
        assert by[("saccade", s, "saccadic")]["finished"] >= by[("saccade", s, "twin")]["finished"]
        assert by[("dream", s, "round 1")]["finished"] >= by[("dream", s, "round 0")]["finished"]
        assert by[("dream", s, "other net")]["finished"] >= by[("baseline", s, "")]["finished"]
    assert len({j["pid"] for j in jobs}) == 2  # two workers, neither of them the driver
    assert os.getpid() not in {j["pid"] for j in jobs}
    capsys.readouterr()
    assert main(["bench", *PLAN, "--executor", "process", "--out", str(tmp_path)]) == 0  # again: nothing to run
    out = capsys.readouterr().out
    assert out.count("done before, kept") == 22 and "job(s) to run" not in out


def test_the_ray_executor_measures_the_same_rows_as_the_local_one(local_rows, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    from frugal.cli import main

    assert main(["bench", *PLAN, "--executor", "ray", "--jobs", "2", "--out", str(tmp_path)]) == 0
    assert _measured(tmp_path) == local_rows
    jobs = json.loads((tmp_path / "results.json").read_text())["jobs"]
    assert len(jobs) == 22 and all(j["node"] for j in jobs)
    import ray
    assert not ray.is_initialized()  # the private instance was stopped with the bench


def test_a_killed_driver_restarted_runs_only_the_jobs_that_had_not_finished(tmp_path):
    """The driver is killed (SIGKILL: no clean-up at all) after its first job's record is written."""
    cmd = [sys.executable, "-m", "frugal.cli", "bench", "--budget", "tiny", "--methods", "baseline", "saccade",
           "--tasks", "digits", "--seeds", "1", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = tmp_path / "results.json"
    try:
        for _ in range(1200):
            if results.exists() and json.loads(results.read_text()).get("jobs"):
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait()
    done = [(j["method"], j["part"]) for j in json.loads(results.read_text())["jobs"]]
    assert done and len(done) < 6  # killed part-way through its 6 jobs
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    kept = again.stdout.count("done before, kept")
    assert kept == len(done) and f"{6 - len(done)} of 6 job(s) to run" in again.stdout
    jobs = json.loads(results.read_text())["jobs"]
    assert sorted((j["method"], j["part"]) for j in jobs) == sorted(
        [("baseline", ""), ("saccade", "twin"), ("saccade", "saccadic"), ("saccade", "ram"), ("saccade", "trajectory"),
         ("saccade", "trajectory-free")])


def test_ctrl_c_cancels_the_bench_cleanly_and_the_same_command_resumes(tmp_path):
    cmd = [sys.executable, "-m", "frugal.cli", "bench", "--budget", "tiny", "--methods", "baseline", "saccade",
           "--tasks", "digits", "--seeds", "1", "--device", "cpu", "--threads", "1", "--executor", "process",
           "--jobs", "2", "--out", str(tmp_path)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        if (tmp_path / "runs").exists():
            break
        time.sleep(0.05)
    time.sleep(1.0)
    first.send_signal(signal.SIGINT)  # Ctrl-C reaches the driver
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "cancelled" in err, err
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr


def test_the_tree_runner_on_ray_returns_what_the_serial_runner_does():
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    from frugal.specialists.runner import run_jobs
    from frugal.utils import json_extent

    jobs = [1, [1, 2], {"a": [1, {"b": 2}]}]
    assert run_jobs(json_extent, jobs, backend="ray", workers=2) == run_jobs(json_extent, jobs, backend="serial")


HOLD = """
import fcntl, sys, time
with open(sys.argv[1], "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_bench_job_waits_for_a_finished_run_another_job_holds_and_reloads_it(tmp_path):
    """Two jobs may reload one finished run at once (a tree and a control, both from the base)."""
    from frugal.train import TRAIN_LOCK, TrainConfig, train, waiting_for_held_runs

    cfg = TrainConfig(task="digits", model="convnet", epochs=1, train_limit=128, device="cpu", threads=1)
    first = train(cfg, tmp_path / "run", quiet=True, progress=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run" / TRAIN_LOCK), "2"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="being trained by another process"):
            train(cfg, tmp_path / "run", resume=True, quiet=True, progress=False)  # outside a job: refused
        t0 = time.perf_counter()
        with waiting_for_held_runs():
            again = train(cfg, tmp_path / "run", resume=True, quiet=True, progress=False)
        assert time.perf_counter() - t0 > 0.5  # it waited for the holder
        assert again.test_acc == first.test_acc and again.steps == first.steps
        with waiting_for_held_runs(), pytest.raises(FileExistsError):
            train(cfg, tmp_path / "run", resume=False, quiet=True, progress=False)  # a new run is never waited into
    finally:
        holder.kill()
        holder.wait()
