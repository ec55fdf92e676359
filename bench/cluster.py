"""Cluster benchmarks on the local Exoscale API with namespace hosts (needs root), in one run:

1. cluster-up (up + install + start, as `make cluster-up` runs them) for 1 vs 4 nodes, by phase: wall
   seconds, and for install and start the CPU seconds the nodes spent (all processes of each sim host,
   read from its /proc), since the sim's hosts share this machine's cores: a phase whose wall time grows
   with its CPU seconds is waiting for cores, not for the toolkit. Goals: up(4) / up(1) <= 1.2 and
   cluster-up(4) / cluster-up(1) <= 1.5.
2. The sweep's per-trial overhead on the 3-node sim cluster (through the SSH tunnel) vs on a local Ray
   with as many CPUs: a grid of trials of a program that prints a number at once, so that what is
   measured is the machinery, not the training. overhead per trial = makespan * slots / trials.
   Goal: cluster / local <= 1.3.

    python -m bench.cluster [--trials 24]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, cli, report, scratch_dir, sim_with_hosts
from cloud.remote import Remote
from cloud.sim.local import cluster_toml
from cloud.state import StateStore

QUICK_PROGRAM = "import sys; print(0.5)\n"


def nodes_cpu_seconds(state_root: Path, name: str) -> float:
    """CPU seconds all processes of the cluster's hosts have used so far (own + reaped children; each host
    has its own PID namespace and /proc)."""
    store = StateStore(state_root / name)
    st = store.load()
    assert st is not None, f"no state for {name}"
    total = 0
    for r in Remote(store.private_key(), store.known_hosts).run(
        st.ordered(), "cat /proc/[0-9]*/stat 2>/dev/null; true"
    ):
        assert r.ok, r.error
        for line in r.stdout.splitlines():
            fields = line.rsplit(")", 1)[-1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def cluster_up(env, config, name, n):
    """make cluster-up's three steps: {"up": wall s, "install": wall s, "start": wall s, "install_cpu": node
    CPU s, "start_cpu": node CPU s}."""
    phases = {}
    state_root = Path(env["RAYSWEEP_STATE_DIR"])
    for step in (["up", "-n", str(n)], ["install"], ["start"]):
        cpu0 = nodes_cpu_seconds(state_root, name) if step[0] != "up" else 0.0
        t0 = time.perf_counter()
        cli(env, "--config", str(config), *step)
        phases[step[0]] = time.perf_counter() - t0
        if step[0] != "up":
            phases[f"{step[0]}_cpu"] = nodes_cpu_seconds(state_root, name) - cpu0
    return phases


def sweep_overhead(program, extra_args, env, out, trials):
    sizes = ",".join(str(8 * (i + 1)) for i in range(trials // 2))
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.mnist",
            "--data",
            "mnist-5k",
            "--sizes",
            sizes,
            "--dropouts",
            "0.0,0.5",
            "--program",
            program,
            "--fresh",
            "--out",
            str(out),
            *extra_args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode != 0:
        raise SystemExit(f"sweep failed:\n{r.stderr[-2000:]}")
    doc = json.loads((out / "results.json").read_text())
    return doc["grid_seconds"], time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=24)
    a = p.parse_args(argv)
    # the hosts are offered uv and a package index as the internet would: install needs no cluster.toml setting
    sim = sim_with_hosts()
    work = scratch_dir("bench-cluster-")
    env = {**os.environ, **sim.client_env(work / "state")}
    try:
        c1 = cluster_toml(work / "one.toml", "bench-one")
        c4 = cluster_toml(work / "four.toml", "bench-four")
        t1 = cluster_up(env, c1, "bench-one", 1)
        cli(env, "--config", str(c1), "down", "--yes")
        t4 = cluster_up(env, c4, "bench-four", 4)
        cli(env, "--config", str(c4), "down", "--yes")

        c3 = cluster_toml(work / "three.toml", "bench-three")
        cluster_up(env, c3, "bench-three", 3)
        # the quick program, already present on every node and here (--program PATH)
        prog = work / "quick.py"
        prog.write_text(QUICK_PROGRAM)
        cli(env, "--config", str(c3), "scp", str(prog), "quick.py")  # -> /home/ubuntu/quick.py
        cl_grid, _ = sweep_overhead(
            "/home/ubuntu/quick.py",
            ["--cluster", "bench-three", "--cluster-config", str(c3)],
            env,
            work / "cl",
            a.trials,
        )
        local_grid, _ = sweep_overhead(str(prog), ["--local-cpus", "3"], env, work / "lo", a.trials)
        cli(env, "--config", str(c3), "down", "--yes")
    finally:
        sim.close()
    slots = 3
    cl, lo = cl_grid * slots / a.trials, local_grid * slots / a.trials
    phases = {f"{k}_1_vs_4_s": f"{t1[k]:.1f}/{t4[k]:.1f}" for k in t1}
    up_phase_ratio = t4["up"] / t1["up"]
    w1, w4 = (sum(t[k] for k in ("up", "install", "start")) for t in (t1, t4))
    return report(
        "cluster",
        up_phase_ratio=up_phase_ratio,
        up_phase_goal="<= 1.2",
        cluster_up_1_node_s=w1,
        cluster_up_4_nodes_s=w4,
        cluster_up_ratio=w4 / w1,
        cluster_up_goal="<= 1.5",
        **phases,
        trials=a.trials,
        slots=slots,
        cluster_grid_s=cl_grid,
        local_grid_s=local_grid,
        cluster_overhead_s_per_trial=cl,
        local_overhead_s_per_trial=lo,
        overhead_ratio=cl / lo,
        overhead_goal="<= 1.3",
    )


if __name__ == "__main__":
    main()
