"""How much sooner does the quick bench end on two one-thread Ray workers than in one process?

Runs `frugal bench --quick` (every idea's headline comparison, one seed) twice in turn, each into a
fresh folder: with the local executor (one job after another, torch's own thread count) and with
`--executor ray --jobs 2 --threads 1` (a private Ray instance of 2 CPUs, one job per CPU). Prints
both wall-clock times (the whole command, Ray's start included), their ratio, and each job's
seconds from the Ray run's records. Needs the data cached and as many idle cores as workers. Prints
JSON.

    python -m frugal.benchmarks.executor_speed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from frugal.benchmarks import add_out_arg, publish
from frugal.utils import versions


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="Ray workers (CPUs of its private instance)")
    p.add_argument("--data-dir", default=None)
    add_out_arg(p)
    a = p.parse_args(argv)
    quick = [sys.executable, "-m", "frugal.cli", "bench", "--quick", *(["--data-dir", a.data_dir] if a.data_dir else [])]
    runs = {"local": [], "ray": ["--executor", "ray", "--jobs", str(a.jobs), "--threads", "1"]}
    seconds, jobs = {}, {}
    with tempfile.TemporaryDirectory(prefix="executor-speed-") as tmp:
        for name, extra in runs.items():
            out = Path(tmp) / name
            t0 = time.perf_counter()
            res = subprocess.run([*quick, *extra, "--out", str(out)], capture_output=True, text=True)
            seconds[name] = time.perf_counter() - t0
            if res.returncode != 0:
                raise SystemExit(f"the {name} bench failed (status {res.returncode}):\n{res.stderr[-3000:]}")
            jobs[name] = [{"job": f"{j['method']} {j['task']}" + (f" [{j['part']}]" if j["part"] else ""),
                           "seconds": j["seconds"]} for j in json.loads((out / "results.json").read_text())["jobs"]]
    out = {"benchmark": "executor_speed", "local_seconds": seconds["local"], "ray_seconds": seconds["ray"],
           "ratio": seconds["ray"] / seconds["local"], "ray_workers": a.jobs, "cpus": os.cpu_count(),
           "local_jobs": jobs["local"], "ray_jobs": jobs["ray"], "versions": versions()}
    return publish(out, "frugal.benchmarks.executor_speed", argv, a.out)


if __name__ == "__main__":
    main()
