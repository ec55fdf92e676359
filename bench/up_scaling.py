"""`exoscale.py up` for 1 vs 4 nodes on the local Exoscale with namespace hosts (needs root): the cloud
half of cluster-up alone (key, group, instances created, running, answering SSH), as a user runs it.
Paired rounds, 1 node then 4, each followed by `down`; the median of the per-round ratios.
Goal: time(4) / time(1) <= 1.2.

    python -m bench.up_scaling [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.common import median, report, scratch_dir
from cloud.sim import local
from cloud.sim.hosts import missing_requirements
from cloud.sim.model import Faults

ROOT = Path(__file__).resolve().parent.parent
KEY, SECRET = "EXObench", "bench-secret-" + uuid.uuid4().hex


def cli(env: dict[str, str], *args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "exoscale.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    if r.returncode != 0:
        raise SystemExit(f"exoscale.py {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if missing_requirements():
        raise SystemExit(f"needs {', '.join(missing_requirements())}")
    sim = local.start(KEY, SECRET, faults=Faults(op_delay_s=0.5), hosts=True)  # as bench.cluster: 0.5 s operations
    work = scratch_dir("bench-up-")
    env = {
        **os.environ,
        "EXOSCALE_API_KEY": KEY,
        "EXOSCALE_API_SECRET": SECRET,
        "EXOSCALE_API_ENDPOINT": sim.endpoint,
        "RAYSWEEP_STATE_DIR": str(work / "state"),
    }
    one, four = [], []
    try:
        for i in range(a.rounds):
            for n, out in ((1, one), (4, four)):
                name = f"bench-up{n}-{i}"
                out.append(cli(env, "--name", name, "up", "-n", str(n)))
                cli(env, "--name", name, "down", "--yes")
    finally:
        sim.close()
    ratios = [f / o for o, f in zip(one, four)]
    return report(
        "up_scaling",
        up_1_node_s=median(one),
        up_4_nodes_s=median(four),
        ratio=median(ratios),
        rounds=" ".join(f"{o:.1f}/{f:.1f}" for o, f in zip(one, four)),
        goal="<= 1.2",
    )


if __name__ == "__main__":
    main()
