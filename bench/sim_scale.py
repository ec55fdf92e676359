"""Provisioning 1 vs N instances through the project's driver against the API-only local Exoscale (no hosts),
with a share of requests refused 429/503 and operations pending for a while, in one run. The local Exoscale
runs in a process of its own, as Exoscale runs apart from its clients (in-process, the driver's threads and
the server would share one interpreter lock).

Reports the ratio of wall times, median over paired rounds (goal: time(N) / time(1) <= 2), and how many
HTTP requests each instance cost (creation, its operation's polls, the read-back and every retried refusal).

    python -m bench.sim_scale [--nodes 50] [--rounds 3] [--error-rate 0.05] [--op-delay 0.5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import median, report
from cloud.exoscale_driver import ExoscaleV2NodeDriver
from cloud.sim.local import start
from cloud.sim.model import Faults
from cloud.sim.server import HTTPFaults

KEY, SECRET = "EXObench", "bench-secret-" + uuid.uuid4().hex
SIZE, IMAGE = "standard.small", "Linux Ubuntu 24.04 LTS 64-bit"


def provision(driver: ExoscaleV2NodeDriver, n: int, tag: str) -> float:
    """Seconds to create n instances in parallel, each waited for until its operation succeeded."""
    size, image = driver.ex_get_size(SIZE), driver.ex_get_image(IMAGE)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        nodes = list(
            pool.map(lambda i: driver.create_node(f"{tag}-{i}", size, image, ex_labels={"bench": tag}), range(n))
        )
    seconds = time.perf_counter() - t0
    if len({x.id for x in nodes}) != n:
        raise SystemExit(f"expected {n} distinct instances, got {len({x.id for x in nodes})}")
    return seconds


def serve(args: argparse.Namespace, secret: str, ready: Any, stop: Any, requests: Any, refused: Any) -> None:
    """The local Exoscale in a child process, counting requests and refusals into shared values."""
    faults = Faults(op_delay_s=args.op_delay)
    http_faults = HTTPFaults(error_rate=args.error_rate, seed=args.seed)
    with start(KEY, secret, faults=faults, http_faults=http_faults, seed=args.seed) as sim:
        handle = sim.app.handle

        def counted(
            method: str, target: str, headers: dict[str, str], body: bytes, source_ip: str = "127.0.0.1"
        ) -> tuple[int, dict, bytes]:
            status, out_headers, data = handle(method, target, headers, body, source_ip)
            with requests.get_lock():
                requests.value += 1
                refused.value += status in (429, 503)
            return status, out_headers, data

        sim.app.handle = counted  # type: ignore[method-assign]  # a bench-only probe
        ready.put((sim.server.host, sim.server.port))
        stop.wait()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--error-rate", type=float, default=0.05)
    p.add_argument("--op-delay", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    count, refusals = ctx.Value("i", 0), ctx.Value("i", 0)
    child = ctx.Process(target=serve, args=(a, SECRET, ready, stop, count, refusals), daemon=True)
    child.start()
    try:
        host, port = ready.get(timeout=120)
        driver = ExoscaleV2NodeDriver(KEY, SECRET, host=host, port=port, secure=False)
        driver.list_sizes()  # warm this thread's connection
        ones, manys, requests, refused = [], [], 0, 0
        for r in range(a.rounds):
            ones.append(provision(driver, 1, f"one{r}"))
            before = (count.value, refusals.value)
            manys.append(provision(driver, a.nodes, f"many{r}"))
            requests += count.value - before[0]
            refused += refusals.value - before[1]
        one, many = median(ones), median(manys)
    finally:
        stop.set()
        child.join(30)
    return report(
        "sim_scale",
        nodes=a.nodes,
        rounds=a.rounds,
        error_rate=a.error_rate,
        op_delay_s=a.op_delay,
        one_s=one,
        n_s=many,
        ratio=many / one,
        goal="<= 2",
        requests_per_instance=requests / (a.nodes * a.rounds),
        refused_per_instance=refused / (a.nodes * a.rounds),
    )


if __name__ == "__main__":
    main()
