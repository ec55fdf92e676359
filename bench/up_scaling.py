"""`exoscale.py up` for 1 vs 4 nodes on the local Exoscale with namespace hosts (needs root): the cloud
half of cluster-up alone (key, group, instances created, running, answering SSH), as a user runs it.
Paired rounds, 1 node then 4, each followed by `down`; the median of the per-round ratios.
Goal: time(4) / time(1) <= 1.2.

    python -m bench.up_scaling [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import cli, median, report, scratch_dir, sim_with_hosts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    sim = sim_with_hosts(offer_packages=False)  # as bench.cluster: 0.5 s operations
    work = scratch_dir("bench-up-")
    env = {**os.environ, **sim.client_env(work / "state")}
    one, four = [], []
    try:
        for i in range(a.rounds):
            for n, out in ((1, one), (4, four)):
                name = f"bench-up{n}-{i}"
                t0 = time.perf_counter()
                cli(env, "--name", name, "up", "-n", str(n), timeout=900)
                out.append(time.perf_counter() - t0)
                cli(env, "--name", name, "down", "--yes", timeout=900)
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
