"""Creating 1 vs N nodes in parallel threads through the driver, against the local Exoscale API with
1 s operation latency, in one run. Goal: time(N) / time(1) <= 1.5.

    python -m bench.parallel_create [--nodes 8] [--op-delay 1.0]
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import report
from cloud.exoscale_driver import ExoscaleV2NodeDriver
from cloud.sim.local import start
from cloud.sim.model import Faults

KEY, SECRET = "EXObench", "bench-secret"


def create(driver, n, tag):
    with ThreadPoolExecutor(max_workers=n) as pool:
        nodes = list(
            pool.map(
                lambda i: driver.create_node(
                    f"{tag}-{i}", "standard.small", "Linux Ubuntu 24.04 LTS 64-bit", ex_labels={"bench": tag}
                ),
                range(n),
            )
        )
    assert len({x.id for x in nodes}) == n
    return nodes


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--op-delay", type=float, default=1.0)
    a = p.parse_args(argv)
    with start(KEY, SECRET, faults=Faults(op_delay_s=a.op_delay)) as sim:
        d = ExoscaleV2NodeDriver(KEY, SECRET, host=sim.server.host, port=sim.server.port, secure=False)
        d.list_sizes(), d.list_images()  # warm the connection of this thread
        t0 = time.perf_counter()
        create(d, 1, "one")
        t1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        create(d, a.nodes, "many")
        tn = time.perf_counter() - t0
    return report(
        "parallel_create", op_delay_s=a.op_delay, nodes=a.nodes, one_s=t1, n_s=tn, ratio=tn / t1, goal="<= 1.5"
    )


if __name__ == "__main__":
    main()
