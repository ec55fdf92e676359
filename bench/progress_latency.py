"""Progress reports from a running trial to the sweep's search, and a stop back: how long each takes.

    python -m bench.progress_latency [--trials 4] [--lines 40] [--address ray://...]

Each trial's program prints a JSON line every 0.1 s holding the wall-clock time it was printed; the sweep's
search (a wrapper of the plain one, as the runner calls it) notes when it sees each report. The search
prunes every trial at its step 30; the program notes when SIGTERM reaches it, and the runner when the trial
is over. Goals (issue 19): report latency p95 at most 1 s; decision to exit at most the grace period + 1 s.
Runs on a local Ray by default (same machine: one clock), or on --address.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROGRAM = r"""
import json, os, signal, sys, time
out = sys.argv[1]
def term(*_):
    with open(out, "a") as f:
        f.write(json.dumps({"term": time.time()}) + "\n")
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
for i in range(1, int(sys.argv[2]) + 1):
    print(json.dumps({"step": i, "t": time.time()}), flush=True)
    time.sleep(0.1)
"""

PRUNE_AT = 30


class TimedSearch:
    """The plain fixed list, noting when each report arrives and pruning every trial at PRUNE_AT."""

    def __init__(self, trials):
        from pipeline.search import FixedSearch

        self.inner = FixedSearch(trials)
        self.latencies: list[float] = []
        self.decided: dict[str, float] = {}

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
        pass

    def close(self) -> None:
        pass


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--lines", type=int, default=60, help="lines each program would print (it is pruned at 30)")
    p.add_argument("--address", default=None)
    a = p.parse_args(argv)

    from pipeline import tasks
    from pipeline.lines import ProgressSpec, Watch
    from pipeline.progress import ProgressHub
    from pipeline.runner import ResultStore, run_trials
    from pipeline.spec import Trial

    tasks.ensure_ray(a.address, num_cpus=None if a.address else 2)
    d = Path(tempfile.mkdtemp(prefix="progress-latency-"))
    prog = tasks.blob(PROGRAM, "prog.py")
    watch = Watch(progress=ProgressSpec(key="t", step="step"))
    trials = [Trial(f"t{i}", {"i": i}) for i in range(a.trials)]
    ends: dict[str, float] = {}

    def submit(trial, report_to):
        marker = str(d / f"{trial.id}.term")
        return tasks.Execute(["python3", prog, marker, str(a.lines)], watch=watch, report_to=report_to, cpus=0.5)

    search = TimedSearch(trials)
    hub = ProgressHub.start()
    store = ResultStore(d / "out", ["i"], "value", {})
    try:
        results = run_trials(trials, submit, store, search=search, hub=hub, poll_s=0.2)
    finally:
        hub.close()
    for r in results:
        text = (d / f"{r.id}.term").read_text() if (d / f"{r.id}.term").exists() else ""
        if text:
            ends[r.id] = json.loads(text.splitlines()[0])["term"]
    stop_s = [ends[t] - search.decided[t] for t in search.decided if t in ends]
    statuses = sorted({r.status for r in results})
    out = {
        "bench": "progress_latency",
        "where": a.address or "local Ray",
        "reports": len(search.latencies),
        "latency_p50_s": round(statistics.median(search.latencies), 3),
        "latency_p95_s": round(p95(search.latencies), 3),
        "latency_max_s": round(max(search.latencies), 3),
        "decision_to_sigterm_s": [round(x, 3) for x in stop_s],
        "statuses": statuses,
    }
    print(
        f"progress_latency ({out['where']}): {out['reports']} reports, latency p50 {out['latency_p50_s']} s, "
        f"p95 {out['latency_p95_s']} s, max {out['latency_max_s']} s (goal p95 <= 1 s); decision to SIGTERM in the "
        f"program: {', '.join(f'{x:.2f}' for x in stop_s)} s (goal: grace + 1 s); statuses {statuses}"
    )
    print("JSON", json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
