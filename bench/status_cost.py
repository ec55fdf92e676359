"""`exoscale.py status` with cost vs without, on a cluster of N instances of the API-only local Exoscale (no
hosts), which runs in a process of its own with a latency per request (an API round trip).

What is timed is status's API half, the only part the cost changes: without cost, the listing of the
cluster's instances and the local cache refreshed (provision.status, today's status); with cost, the same
listing, each node's type, rate, uptime and cost (cloud.cost) and the cost history's line (cloud.cost_history),
as cloud.clusters.status does it. The SSH half (Ray's view and the autostop line from the head) is the same
in both and left out, so the ratio is an upper bound of the whole command's. A third side is an API whose
instance references give the type's id alone: the names come from the table of types kept under the state
root (listed once, by the warm-up run, as by a cluster's first status).

    python -m bench.status_cost [--nodes 10] [--rounds 15] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import median, report
from cloud import cost, cost_history, provision
from cloud.config import ClusterSpec
from cloud.exoscale_driver import ExoscaleV2NodeDriver
from cloud.names import cluster_labels
from cloud.pricing import PriceTable
from cloud.sim.local import start
from cloud.sim.model import Faults
from cloud.sim.server import HTTPFaults

KEY, SECRET = "EXObench", "bench-secret-" + uuid.uuid4().hex
SIZE, IMAGE = "standard.medium", "Linux Ubuntu 24.04 LTS 64-bit"


def serve(latency: float, secret: str, ready: Any, stop: Any) -> None:
    """The local Exoscale in a child process (given the secret: the child imports this module anew)."""
    with start(KEY, secret, faults=Faults(op_delay_s=0.0), http_faults=HTTPFaults(latency_s=latency), seed=3) as sim:
        ready.put((sim.server.host, sim.server.port))
        stop.wait()


def without_cost(driver, spec: ClusterSpec) -> int:
    return len(provision.status(driver, spec).nodes)


def with_cost(driver, spec: ClusterSpec, prices: PriceTable, ids_only: bool = False) -> int:
    _, nodes = provision.status_nodes(driver, spec)
    if ids_only:
        for n in nodes:
            n.extra["instance_type"] = None
    types = cost.type_names(nodes, driver.ex_list_instance_types, spec.state_dir.parent / cost.TYPES_CACHE)
    c = cost.node_costs(nodes, types, prices)
    cost_history.record(spec.state_dir.parent, spec.name, spec.zone, "status", nodes, types, prices)
    return len(c.nodes)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--latency", type=float, default=0.05, help="seconds per API request")
    a = p.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=serve, args=(a.latency, SECRET, ready, stop), daemon=True)
    child.start()
    try:
        host, port = ready.get(timeout=120)
        driver = ExoscaleV2NodeDriver(KEY, SECRET, host=host, port=port, secure=False)
        name = f"b{uuid.uuid4().hex[:6]}"
        size, image = driver.ex_get_size(SIZE), driver.ex_get_image(IMAGE)
        for i in range(a.nodes):
            driver.create_node(f"{name}-{i}", size, image, ex_labels={**cluster_labels(name), "role": "worker"})
        with tempfile.TemporaryDirectory(prefix="raysweep-bench-status-") as root:
            spec = ClusterSpec(name=name, state_dir=Path(root) / name)
            prices = PriceTable()
            sides: dict[str, list[float]] = {"today": [], "cost": [], "cost_ids_only": []}
            runs = {
                "today": lambda: without_cost(driver, spec),
                "cost": lambda: with_cost(driver, spec, prices),
                "cost_ids_only": lambda: with_cost(driver, spec, prices, ids_only=True),
            }
            for fn in runs.values():  # warm
                fn()
            for r in range(a.rounds):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))  # paired, order alternated
                for side in order:
                    t0 = time.perf_counter()
                    seen = runs[side]()
                    sides[side].append(time.perf_counter() - t0)
                    if seen != a.nodes:
                        raise SystemExit(f"{side}: saw {seen} nodes, expected {a.nodes}")
    finally:
        stop.set()
        child.join(30)
    today, with_c, ids = (median(sides[s]) for s in ("today", "cost", "cost_ids_only"))
    return report(
        "status_cost",
        nodes=a.nodes,
        rounds=a.rounds,
        latency_s=a.latency,
        today_s=today,
        cost_s=with_c,
        ratio=with_c / today,
        cost_ids_only_s=ids,
        ratio_ids_only=ids / today,
        goal="<= 1.2",
    )


if __name__ == "__main__":
    main()
