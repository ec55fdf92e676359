"""Time to a ready 4-node Ray cluster on the local Exoscale with namespace hosts (needs root), both ways:

- static: `up -n 4`, `install`, `start` (what `make cluster-up NODES=4` runs); ready when `start` returns
  (it waits until Ray has registered every node);
- elastic with min = max: `up --min-workers 3 --max-workers 3` (`ray up` makes the head; Ray's autoscaler
  then adds the 3 workers, each installed over SSH from the head); ready when `status` shows 4 Ray nodes
  alive.

Each cluster is removed (`down`) after its round; within a round one way then the other, the first
alternating from round to round (static first in the first), so both see the same machine and each goes first
as often (the first cluster on fresh hosts fills the hosts' shared uv cache). The hosts share this machine's
cores: a run beside other work is slower for both.

    python -m bench.ready_time [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

from bench.common import ROOT, cli, scratch_dir, sim_with_hosts
from cloud.sim.local import cluster_toml

NODES = 4
READY_TIMEOUT_S = 1800.0


def ray_nodes_alive(env: dict[str, str], config: str) -> int:
    r = subprocess.run(
        [sys.executable, "exoscale.py", "--config", config, "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    m = re.search(r"Ray: (\d+) node\(s\) alive", r.stdout)
    return int(m.group(1)) if m else 0


PHASES: dict[str, list[float]] = {"up": [], "install": [], "start": []}  # the static path's steps, each round
HEAD_UP: list[
    float
] = []  # the elastic path's `up` (`ray up`: the head made, installed, Ray and the autoscaler started)


def static(env: dict[str, str], config: str) -> float:
    t0 = time.perf_counter()
    for step in (["up", "-n", str(NODES)], ["install"], ["start"]):
        t = time.perf_counter()
        cli(env, "--config", config, *step)
        PHASES[step[0]].append(time.perf_counter() - t)
    return time.perf_counter() - t0


def elastic(env: dict[str, str], config: str) -> float:
    t0 = time.perf_counter()
    cli(env, "--config", config, "up", "--min-workers", str(NODES - 1), "--max-workers", str(NODES - 1))
    HEAD_UP.append(time.perf_counter() - t0)
    while ray_nodes_alive(env, config) < NODES:
        if time.perf_counter() - t0 > READY_TIMEOUT_S:
            raise SystemExit(f"the elastic cluster had not {NODES} Ray nodes alive after {READY_TIMEOUT_S:g} s")
        time.sleep(2.0)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    work = scratch_dir("bench-ready-")
    times: dict[str, list[float]] = {"static": [], "elastic": []}
    with sim_with_hosts() as sim:
        env = {**os.environ, **sim.client_env(work / "state"), "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(work)}
        for i in range(args.rounds):
            pair = [("static", static), ("elastic", elastic)]
            order = pair if i % 2 == 0 else pair[::-1]  # who goes first alternates (the first pays cold caches)
            for kind, run in order:
                config = str(cluster_toml(work / f"{kind}{i}.toml", f"ready-{kind}-{i}"))
                try:
                    times[kind].append(run(env, config))
                finally:
                    subprocess.run(
                        [sys.executable, "exoscale.py", "--config", config, "down", "--yes"],
                        cwd=ROOT,
                        env=env,
                        capture_output=True,
                        timeout=900,
                    )
                if kind == "static":
                    steps = ", ".join(f"{k} {v[-1]:.1f} s" for k, v in PHASES.items() if v)
                else:
                    steps = f"head up {HEAD_UP[-1]:.1f} s, workers {times[kind][-1] - HEAD_UP[-1]:.1f} s more"
                print(
                    f"round {i + 1}: {kind} ready in {times[kind][-1]:.1f} s ({steps})",
                    file=sys.stderr,
                    flush=True,
                )
    result = {
        k: {"runs_s": [round(x, 1) for x in v], "median_s": round(statistics.median(v), 1)} for k, v in times.items()
    }
    result["static"]["steps_median_s"] = {k: round(statistics.median(v), 1) for k, v in PHASES.items() if v}
    result["elastic"]["head_up_median_s"] = round(statistics.median(HEAD_UP), 1)
    result["elastic_over_static"] = round(result["elastic"]["median_s"] / result["static"]["median_s"], 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
