"""Does one bench place its jobs on two Ray nodes? A head and a worker node started on this machine.

Starts a Ray head and a second Ray node with `ray start` (one CPU each, told apart by a custom
resource), runs one bench on that cluster with `--executor ray --address`, and prints which node
ran each job, read from the job records in its results.json, and whether both nodes ran jobs.
Also runs the same plan with the local executor and says whether the rows are the same (every
measured field but times). It stops the cluster with `ray stop` at the end, which stops every
Ray process of this user on the machine: run it where no other Ray runs. Prints JSON.

    python -m frugal.benchmarks.ray_nodes --seeds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from frugal.benchmarks import add_out_arg, publish
from frugal.utils import versions

TIMES = ("seconds", "latency", "per_s", "process_id")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measured(out: Path) -> dict[str, dict]:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return {f"{r['method']} {r['task']} {r['seed']} {r['variant']}": {k: v for k, v in r.items()
                                                                   if not any(t in k for t in TIMES)} for r in rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["baseline", "saccade", "dream"])
    p.add_argument("--task", default="digits")
    add_out_arg(p)
    a = p.parse_args(argv)
    ray = shutil.which("ray")
    if ray is None:
        raise SystemExit("the `ray` command is missing: pip install -e '.[ray]'")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # a throw-away cluster on the loopback address: no token (Ray's token authentication is for
    # clusters others can reach); workers at normal priority (Ray's default niceness is 15)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    nodes = {"head": [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                      "--resources", '{"frugal_head": 1}', *common],
             "worker": [ray, "start", "--address", address, "--resources", '{"frugal_worker": 1}', *common]}
    plan = ["--budget", "tiny", "--methods", *a.methods, "--tasks", a.task, "--seeds", str(a.seeds),
            "--device", "cpu", "--threads", "1"]
    try:
        for cmd in nodes.values():
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
        with tempfile.TemporaryDirectory(prefix="ray-nodes-") as tmp:
            outs = {"ray": Path(tmp) / "ray", "local": Path(tmp) / "local"}
            bench = [sys.executable, "-m", "frugal.cli", "bench", *plan]
            subprocess.run([*bench, "--executor", "ray", "--address", address, "--out", str(outs["ray"])], env=env,
                           check=True, capture_output=True, text=True, timeout=1800)
            subprocess.run([*bench, "--out", str(outs["local"])], env=env, check=True, capture_output=True, text=True,
                           timeout=1800)
            records = json.loads((outs["ray"] / "results.json").read_text())["jobs"]
            same_rows = _measured(outs["ray"]) == _measured(outs["local"])
            n_rows = len(_measured(outs["ray"]))
        roles = _node_roles(address, env)
    finally:
        subprocess.run([ray, "stop"], env=env, capture_output=True, timeout=300)
    jobs = [{"job": f"{j['method']} {j['task']} seed {j['seed']}" + (f" [{j['part']}]" if j["part"] else ""),
             "node": roles.get(j["node"], j["node"]), "seconds": j["seconds"]} for j in records]
    per_node = {role: sum(1 for j in jobs if j["node"] == role) for role in nodes}
    out = {"benchmark": "ray_nodes", "bench": " ".join(["frugal bench", *plan, "--executor ray --address", address]),
           "nodes": {role: {"cpus": 1, "resource": f"frugal_{role}"} for role in nodes}, "jobs": jobs,
           "jobs_per_node": per_node, "placed_on_both": all(per_node.values()), "rows": n_rows,
           "rows_same_as_local": same_rows, "versions": versions()}
    return publish(out, "frugal.benchmarks.ray_nodes", argv, a.out)


def _node_roles(address: str, env: dict[str, str]) -> dict[str, str]:
    """Node id -> 'head' or 'worker', by the custom resource each node was started with."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))" % address)
    res = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                         timeout=300)
    resources = json.loads(res.stdout.strip().splitlines()[-1])
    return {node: ("head" if "frugal_head" in r else "worker") for node, r in resources.items()}


if __name__ == "__main__":
    main()
