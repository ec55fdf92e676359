"""Progress reports from a running trial to the sweep's search, and a stop back: how long each takes.

    python -m bench.progress_latency [--trials 4] [--lines 200] [--grace 5]
        [--address ray://... | --cluster NAME [--cluster-config PATH] | --sim]

Each trial's program prints a JSON line every 0.1 s holding the wall-clock time it was printed; the sweep's
search (a wrapper of the plain one, as the runner calls it) notes when it sees each report. The search
prunes every trial at its step 30. Half the programs exit on SIGTERM, the other half ignore it, so that only
the SIGKILL `--grace` seconds later ends them; each notes when SIGTERM reached it, and the search when the
sweep saw the trial end (an upper bound of the program's exit: the worker's wrap-up and the sweep's poll are
in it). Goals (issue 19): report latency p95 at most 1 s; decision to the program's exit at most the grace
period + 1 s.

Runs on a local Ray by default; `--address` or `--cluster` (through its SSH tunnel, as a sweep's --cluster)
for a running cluster; `--sim` brings up a 2-node cluster on the local Exoscale's namespace hosts (root; only
Ray installed on them), measures through its tunnel and removes it. The hosts share this machine's clock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

PROGRAM = r"""
import json, os, signal, sys, time
lines, ignore = int(sys.argv[1]), sys.argv[2] == "1"
def term(*_):  # os.write: a print here may land inside the main loop's print (a reentrant call, an error)
    os.write(1, (json.dumps({"term": time.time()}) + "\n").encode())
    if not ignore:
        sys.exit(143)
signal.signal(signal.SIGTERM, term)
for i in range(1, lines + 1):
    print(json.dumps({"step": i, "t": time.time()}), flush=True)
    time.sleep(0.1)
"""

PRUNE_AT = 30


class TimedSearch:
    """The plain fixed list, noting when each report arrives and each trial ends, pruning every trial at
    PRUNE_AT."""

    def __init__(self, trials):
        from pipeline.search import FixedSearch

        self.inner = FixedSearch(trials)
        self.latencies: list[float] = []
        self.decided: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def next(self):
        return self.inner.next()

    def report(self, trial_id: str, step: float, value: float) -> bool:
        now = time.time()
        self.latencies.append(now - value)
        if step >= PRUNE_AT and trial_id not in self.decided:
            self.decided[trial_id] = now
            return True
        return False

    def tell(self, trial_id: str, status: str, value: float | None) -> None:
        self.ended[trial_id] = time.time()

    def close(self) -> None:
        pass


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


def sim_cluster(stack: ExitStack) -> tuple[str, str]:
    """A 2-node cluster on the local Exoscale's hosts, only Ray and numpy (the tasks' data objects) installed:
    (name, its cluster.toml)."""
    from bench.common import cli, scratch_dir, sim_with_hosts
    from cloud.sim.local import cluster_toml

    sim = sim_with_hosts()
    stack.callback(sim.close)
    work = scratch_dir("bench-progress-")
    env = {**os.environ, **sim.client_env(work / "state")}
    os.environ.update(env)  # the cluster's state and the API for --cluster below, in this process
    name = "bench-progress"
    config = str(cluster_toml(work / "cluster.toml", name, packages='["numpy"]'))
    stack.callback(cli, env, "--config", config, "down", "--yes")
    for step in (["up", "-n", "2"], ["install"], ["start"]):
        cli(env, "--config", config, *step)
    return name, config


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--lines", type=int, default=200, help="lines each program would print (it is pruned at 30)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL (the sweep's default)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default=None)
    where.add_argument("--cluster", default=None, help="a raysweep cluster, reached through its SSH tunnel")
    where.add_argument("--sim", action="store_true", help="a 2-node cluster of local Exoscale hosts (root)")
    p.add_argument("--cluster-config", default=None)
    a = p.parse_args(argv)

    with ExitStack() as stack:
        cluster, config = a.cluster, a.cluster_config
        if a.sim:
            cluster, config = sim_cluster(stack)
        address = a.address
        if cluster:
            from cloud.connect import connect_cluster

            conn = connect_cluster(cluster, config)
            stack.callback(conn.close)
            address = conn.address
        return measure(a, address, f"cluster {cluster} (SSH tunnel)" if cluster else address or "local Ray")


def measure(a: argparse.Namespace, address: str | None, where: str) -> dict:
    from pipeline import tasks
    from pipeline.lines import ProgressSpec, Watch
    from pipeline.progress import ProgressHub
    from pipeline.runner import ResultStore, run_trials
    from pipeline.spec import Trial

    tasks.ensure_ray(address, num_cpus=None if address else 2)
    d = Path(tempfile.mkdtemp(prefix="progress-latency-"))
    prog = tasks.blob(PROGRAM, "prog.py")
    watch = Watch(progress=ProgressSpec(key="t", step="step"))
    trials = [Trial(f"t{i}", {"i": i}) for i in range(a.trials)]
    ignores = {t.id: i % 2 == 1 for i, t in enumerate(trials)}
    terms: dict[str, float] = {}
    submitted: dict[str, tasks.Execute] = {}

    def submit(trial, report_to):
        argv = ["python3", prog, str(a.lines), "1" if ignores[trial.id] else "0"]
        submitted[trial.id] = tasks.Execute(argv, watch=watch, report_to=report_to, cpus=0.5)
        return submitted[trial.id]

    search = TimedSearch(trials)
    hub = ProgressHub.start(grace_s=a.grace)
    store = ResultStore(d / "out", ["i"], "value", {})
    try:
        results = run_trials(trials, submit, store, search=search, hub=hub, poll_s=0.2)
    finally:
        hub.close()
    for tid, task in submitted.items():  # the program printed when SIGTERM reached it: in its stdout's tail
        watched = task.wait().watched
        for line in (watched.tail if watched is not None else b"").decode().splitlines():
            if line.startswith('{"term"'):
                terms[tid] = json.loads(line)["term"]
                break
    to_term = [terms[t] - search.decided[t] for t in search.decided if t in terms]
    exit_on_term = [search.ended[t] - search.decided[t] for t in search.decided if not ignores[t]]
    exit_on_kill = [search.ended[t] - search.decided[t] for t in search.decided if ignores[t]]
    statuses = sorted({r.status for r in results})
    out = {
        "bench": "progress_latency",
        "where": where,
        "reports": len(search.latencies),
        "latency_p50_s": round(statistics.median(search.latencies), 3),
        "latency_p95_s": round(p95(search.latencies), 3),
        "latency_max_s": round(max(search.latencies), 3),
        "grace_s": a.grace,
        "decision_to_sigterm_s": [round(x, 3) for x in to_term],
        "decision_to_end_exits_on_sigterm_s": [round(x, 3) for x in exit_on_term],
        "decision_to_end_ignores_sigterm_s": [round(x, 3) for x in exit_on_kill],
        "sigterm_seen": f"{len(to_term)} of {len(search.decided)}",  # else a program died otherwise: not measured
        "stop_goal_met": len(to_term) == len(search.decided)
        and all(x <= a.grace + 1 for x in exit_on_term + exit_on_kill),
        "statuses": statuses,
    }
    print(
        f"progress_latency ({where}): {out['reports']} reports, latency p50 {out['latency_p50_s']} s, "
        f"p95 {out['latency_p95_s']} s, max {out['latency_max_s']} s (goal p95 <= 1 s); decision to SIGTERM in the "
        f"program: {', '.join(f'{x:.2f}' for x in to_term)} s ({out['sigterm_seen']} programs); decision to the trial's end seen by the sweep: "
        f"exits on SIGTERM {', '.join(f'{x:.2f}' for x in exit_on_term)} s, ignores it (SIGKILL after "
        f"{a.grace:g} s) {', '.join(f'{x:.2f}' for x in exit_on_kill)} s (goal <= grace + 1 s); statuses {statuses}"
    )
    print("JSON", json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
