"""An elastic cluster vs a static one on the same sweep, on the local Exoscale with namespace hosts (needs root).

Both clusters have at most 3 nodes of 1 Ray CPU each (3 slots): the static one is `up -n 3` + `install` +
`start`; the elastic one is `up --max-workers 2 --idle-minutes 0.5` (Ray's autoscaler adds up to 2 workers
to the head). The same workload runs on each through `--cluster`'s connection (Ray client over the tunnel):

- a burst of BURST tasks of SECONDS each (1 CPU each): needs all 3 slots for a while;
- then a tail of TAIL tasks of SECONDS each, one after the other, on the head: needs one node.

Measured, in one run:
1. node-seconds: every instance's lifetime (its `created-at` from the API until the first poll that no
   longer lists it; the API is polled every second), summed per cluster, from `up` to the end of `down`.
   Goal: elastic / static <= 0.7.
2. makespan of the workload (first task queued to last result): goal elastic / static <= 1.3.
3. for each worker the autoscaler added, the time from "the burst queues" to "a task runs on it", by phase:
   request (queued -> the instance's `created-at`), boot (-> state running), SSH (-> Ray's updater tag
   `ray-node-status` past `waiting-for-ssh`), install + Ray start + join (-> the first task on that node
   started, as the task itself recorded); beside it, how long after that first task the updater tagged the
   node `up-to-date` (it does so once `ray start` returned, which can be after the raylet ran a task). The
   tags are the autoscaler's own (Exoscale labels), read by the same polling; timestamps are this
   machine's clock, which the hosts share.

    python -m bench.elastic [--quick] [--burst 9] [--tail 8] [--seconds 15]

Workers' Ray tags live in the head's tag file now (their pool gives them only its labels), so the polls see
the SSH phase of the head alone: a worker's `ray-node-status` columns stay empty.

`--scale-out` measures something else, without hosts (no root needed): how long the node provider takes from
the autoscaler's decision (`create_node(count=N)`) to N workers `running` in the API, through the node type's
instance pool (one scale-instance-pool) against N create-instance calls in parallel (16 at most, as the
provider made workers before the pools), on the local Exoscale with 0.5 s operations, N = 1 and 8, the median of
`--rounds` rounds each. Goal: the pool no slower, and its N=8 / N=1 ratio <= 1.3.

    python -m bench.elastic --scale-out [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from bench.common import ROOT, cli, median, report, scratch_dir, sim_driver, sim_with_hosts, wait_for
from cloud.sim.local import cluster_toml

PAST_SSH = ("syncing-files", "setting-up", "up-to-date")


@dataclass
class Life:
    """One instance as the polls saw it: epoch seconds."""

    name: str
    role: str
    created: float
    running: float | None = None
    past_ssh: float | None = None
    up_to_date: float | None = None
    ip: str | None = None
    gone: float | None = None


@dataclass
class Poller:
    """Lists the instances every `every` seconds through the API, in a thread; `lives[cluster][id]`."""

    driver: object
    every: float = 1.0
    lives: dict[str, dict[str, Life]] = field(default_factory=dict)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Poller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a refused or failed poll: the next one sees the same
                self.errors += 1
            self._stop.wait(self.every)

    def poll(self) -> None:
        nodes = self.driver.list_nodes()  # type: ignore[attr-defined]
        now = time.time()
        seen: set[str] = set()
        for n in nodes:
            labels = n.extra.get("labels", {})
            cluster = labels.get("cluster")
            if cluster is None:
                continue
            seen.add(n.id)
            lives = self.lives.setdefault(cluster, {})
            life = lives.get(n.id)
            if life is None:
                created = (
                    datetime.fromisoformat(n.created_at.replace("Z", "+00:00")).timestamp() if n.created_at else now
                )
                life = lives[n.id] = Life(n.name, labels.get("role", "?"), created)
            if life.running is None and n.extra.get("state") == "running":
                life.running = now
            status = labels.get("ray-node-status")
            if life.past_ssh is None and status in PAST_SSH:
                life.past_ssh = now
            if life.up_to_date is None and status == "up-to-date":
                life.up_to_date = now
            if n.public_ips:
                life.ip = n.public_ips[0]
        for lives in self.lives.values():
            for i, life in lives.items():
                if life.gone is None and i not in seen:
                    life.gone = now

    def node_seconds(self, cluster: str, start: float = 0.0, end: float = float("inf")) -> float:
        now = time.time()
        return sum(
            max(0.0, min(end, life.gone or now) - max(start, life.created))
            for life in self.lives.get(cluster, {}).values()
        )


def drive(name: str, burst: int, tail: int, seconds: float) -> None:
    """The workload, run in a process of its own (one Ray client per process): prints `RESULT {json}`."""
    from cloud.connect import connect_cluster

    with connect_cluster(name) as conn:
        import ray

        ray.init(address=conn.address, logging_level=logging.ERROR)

        @ray.remote(num_cpus=1)
        def work(s: float) -> dict:
            import time as t

            import ray as r

            t0 = t.time()
            t.sleep(s)
            return {"start": t0, "end": t.time(), "ip": r.util.get_node_ip_address()}

        queued = time.time()
        done = ray.get([work.remote(seconds) for _ in range(burst)], timeout=burst * seconds + 900)
        on_head = work.options(resources={"node:__internal_head__": 0.001})
        for _ in range(tail):
            done.append(ray.get(on_head.remote(seconds), timeout=seconds + 600))
        print("RESULT " + json.dumps({"queued": queued, "end": time.time(), "tasks": done}), flush=True)


def run_workload(env: dict[str, str], name: str, a: argparse.Namespace) -> dict:
    budget = (a.burst + a.tail) * a.seconds + 1200
    args = ["--drive", name, "--burst", str(a.burst), "--tail", str(a.tail), "--seconds", str(a.seconds)]
    r = subprocess.run(
        [sys.executable, "-m", "bench.elastic", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=budget,
    )
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"the workload on {name} failed:\n{r.stdout[-1500:]}\n{r.stderr[-2500:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def worker_phases(lives: dict[str, Life], result: dict) -> list[dict]:
    """Per worker: seconds from the burst queueing to each phase's end (None where not seen)."""
    out = []
    for life in sorted(lives.values(), key=lambda x: x.created):
        if life.role != "worker":
            continue
        starts = [t["start"] for t in result["tasks"] if t["ip"] == life.ip]
        first = min(starts) if starts else None
        # Ray's updater tags a node up-to-date only after `ray start` returned: its raylet may run a task
        # first, so install and Ray start end at the first task, and the tag's lag is reported beside.
        marks = {"request": life.created, "boot": life.running, "ssh": life.past_ssh, "install_start": first}
        phases: dict[str, float | None] = {}
        prev: float | None = result["queued"]
        for k, t in marks.items():
            phases[k] = round(t - prev, 1) if t is not None and prev is not None else None
            prev = t
        phases["total"] = round(first - result["queued"], 1) if first is not None else None
        lag = life.up_to_date - first if life.up_to_date is not None and first is not None else None
        phases["up_to_date_tag_after_first_task"] = round(lag, 1) if lag is not None else None
        out.append({"name": life.name, **phases})
    return out


def scale_out(rounds: int) -> dict:
    """See the module's docstring (`--scale-out`)."""
    from libcloud.compute.base import NodeImage, NodeSize
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

    from cloud import config as config_mod
    from cloud import provision, ray_config
    from cloud.fanout import parallel_map
    from cloud.ray_provider import MAX_PARALLEL, ExoscaleNodeProvider
    from cloud.sim.local import start
    from cloud.sim.model import Faults

    secret = "bench-secret-" + uuid.uuid4().hex
    sim = start("EXObench", secret, faults=Faults(op_delay_s=0.5))
    work = scratch_dir("bench-scale-out-")
    env = sim.client_env(work / "state")
    os.environ.update(env)
    name = f"bso{uuid.uuid4().hex[:4]}"
    try:
        cfg = config_mod.load(None, env=env, name=name, ray_cpus=1)
        config = ExoscaleNodeProvider.bootstrap_config(ray_config.build(cfg, 0, 8, 1.0))
        nc = config["available_node_types"][ray_config.WORKER_TYPE]["node_config"]
        pc = config["provider"]
        provider = ExoscaleNodeProvider(pc, name)
        provider.ensure_pools(config)
        driver = provider.driver
        tags = {TAG_RAY_NODE_KIND: "worker", TAG_RAY_USER_NODE_TYPE: ray_config.WORKER_TYPE}
        size = NodeSize(nc["instance_type_id"], "", 0, 0, 0, 0.0, driver)
        image = NodeImage(nc["template_id"], "", driver)

        def running(ids: list[str]) -> None:  # one listing a poll, whatever N
            want = set(ids)
            wait_for(
                f"{len(ids)} workers running",
                lambda: (
                    want <= {str(x.id) for x in driver.list_nodes({"cluster": name}) if x.extra["state"] == "running"}
                ),
                120,
                every=0.05,
            )

        def through_pool(n: int) -> float:
            t0 = time.perf_counter()
            ids = list(provider.create_node(nc, tags, n))
            running(ids)
            took = time.perf_counter() - t0
            provider.terminate_nodes(ids)
            return took

        def by_create_instance(n: int) -> float:
            labels = {"cluster": name, "managed-by": "raysweep", "role": "worker"}
            t0 = time.perf_counter()
            nodes = parallel_map(
                lambda i: provision.create_instance(
                    driver,
                    f"{name}-w{i}-{uuid.uuid4().hex[:4]}",
                    size,
                    image,
                    key_name=pc["ssh_key_name"],
                    group=pc["security_group_id"],
                    disk_size=int(nc.get("disk_size", 50)),
                    labels=labels,
                ),
                list(range(n)),
                MAX_PARALLEL,
            )
            running([str(x.id) for x in nodes])
            took = time.perf_counter() - t0
            parallel_map(lambda x: provision.destroy_instance(driver, x), nodes, MAX_PARALLEL)
            return took

        times: dict[str, dict[int, list[float]]] = {"pool": {1: [], 8: []}, "create": {1: [], 8: []}}
        for _ in range(rounds):  # interleaved, so that a slow moment of the machine hits both
            for n in (1, 8):
                times["pool"][n].append(through_pool(n))
                times["create"][n].append(by_create_instance(n))
        provision.down(driver, cfg.spec)
    finally:
        sim.close()
    med = {k: {n: median(v) for n, v in d.items()} for k, d in times.items()}
    return report(
        "elastic_scale_out",
        rounds=rounds,
        pool_1_s=med["pool"][1],
        pool_8_s=med["pool"][8],
        create_1_s=med["create"][1],
        create_8_s=med["create"][8],
        pool_ratio_8_1=med["pool"][8] / med["pool"][1],
        create_ratio_8_1=med["create"][8] / med["create"][1],
        pool_vs_create_8=med["pool"][8] / med["create"][8],
        goal="pool <= create-instance, pool 8/1 <= 1.3",
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--scale-out", action="store_true", help="the pool's scale-out against create-instance (no hosts)")
    p.add_argument("--rounds", type=int, default=5, help="--scale-out: rounds per case (median)")
    p.add_argument("--quick", action="store_true", help="a smoke run: burst 6, tail 3, 5 s tasks")
    p.add_argument("--burst", type=int, default=9)
    p.add_argument("--tail", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--drive", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.scale_out:
        return scale_out(a.rounds)
    if a.drive:
        drive(a.drive, a.burst, a.tail, a.seconds)
        return {}
    if a.quick:
        a.burst, a.tail, a.seconds = 6, 3, 5.0
    workload = (
        f"burst of {a.burst} x {a.seconds:g} s tasks (1 CPU each, 3 slots), then {a.tail} x {a.seconds:g} s "
        f"one after the other on the head; elastic: 0-2 workers, idle 0.5 min"
    )
    print(workload, file=sys.stderr)
    sim = sim_with_hosts()
    work = scratch_dir("bench-elastic-")
    env = {**os.environ, **sim.client_env(work / "state"), "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(work)}
    tag = uuid.uuid4().hex[:4]
    static, elastic = f"bst{tag}", f"bel{tag}"
    configs = {n: cluster_toml(work / f"{n}.toml", n) for n in (static, elastic)}
    live: list[str] = []
    poller = Poller(sim_driver(sim))
    try:
        poller.start()
        t0 = time.time()
        live.append(static)
        for step in (["up", "-n", "3"], ["install"], ["start"]):
            cli(env, "--config", str(configs[static]), *step)
        print(f"static cluster up in {time.time() - t0:.0f} s; running the workload", file=sys.stderr)
        rs = run_workload(env, static, a)
        cli(env, "--config", str(configs[static]), "down", "--yes")
        live.remove(static)

        t0 = time.time()
        live.append(elastic)
        cli(env, "--config", str(configs[elastic]), "up", "--max-workers", "2", "--idle-minutes", "0.5", timeout=1200)
        print(f"elastic head up in {time.time() - t0:.0f} s; running the workload", file=sys.stderr)
        re_ = run_workload(env, elastic, a)

        def no_workers() -> bool:
            return all(x.gone or x.role != "worker" for x in poller.lives.get(elastic, {}).values())

        wait_for("the elastic cluster's idle workers to be removed", no_workers, 300, every=2)
        cli(env, "--config", str(configs[elastic]), "down", "--yes")
        live.remove(elastic)
        time.sleep(2 * poller.every)  # the last deletion seen by a poll
    finally:
        for name in live:
            try:
                cli(env, "--config", str(configs[name]), "down", "--yes", timeout=600)
            except BaseException as e:  # keep tearing down the rest
                print(f"down {name} failed: {e}", file=sys.stderr)
        poller.stop()
        sim.close()
    ns_s, ns_e = poller.node_seconds(static), poller.node_seconds(elastic)
    mk_s, mk_e = rs["end"] - rs["queued"], re_["end"] - re_["queued"]
    phases = worker_phases(poller.lives[elastic], re_)
    workers = sum(1 for x in poller.lives[elastic].values() if x.role == "worker")
    return report(
        "elastic",
        workload=workload,
        node_seconds_static=round(ns_s),
        node_seconds_elastic=round(ns_e),
        node_seconds_ratio=ns_e / ns_s,
        node_seconds_during_workload=f"{poller.node_seconds(elastic, re_['queued'], re_['end']):.0f} vs "
        f"{poller.node_seconds(static, rs['queued'], rs['end']):.0f}",
        makespan_static_s=mk_s,
        makespan_elastic_s=mk_e,
        makespan_ratio=mk_e / mk_s,
        workers_added=workers,
        queue_to_run_by_phase=phases,
        api_poll_errors=poller.errors,
        goal="node-seconds <= 0.7, makespan <= 1.3",
    )


if __name__ == "__main__":
    main()
