"""Autostop on the local Exoscale with namespace hosts (needs root), minutes made seconds:

1. idle-detection delay: from the end of the last activity (an `exoscale.py ssh` session closed) to the
   daemon's decision to tear down, minus the setting. Its bound is one sampling interval (20 s for real
   minutes, a quarter unit here): the daemon looks that often.
2. teardown time for 1 vs 4 nodes: from that decision until the API lists no instance of the cluster
   (Ray stopped, the workers deleted in parallel, then the head).

    python -m bench.autostop [--unit 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import ROOT, cli, report, scratch_dir, sim_driver, sim_with_hosts, wait_for
from cloud import autostop, autostop_control
from cloud.remote import Remote
from cloud.sim.local import cluster_toml
from cloud.state import StateStore

if TYPE_CHECKING:
    from cloud.sim.local import LocalExoscale


def _status(state_dir: Path) -> autostop.HeadStatus | None:
    store = StateStore(state_dir)
    remote = Remote(store.key_path, store.known_hosts)
    try:
        return autostop_control.read_head(remote, store.load().head())[1]
    except autostop.AutostopError:
        return None


def one_cluster(sim: LocalExoscale, env: dict, work: Path, n: int, unit: float) -> tuple[float, float]:
    """(detection delay, teardown seconds) for a cluster of n nodes."""
    name = f"bench-as{n}-{uuid.uuid4().hex[:4]}"
    config = str(cluster_toml(work / f"{name}.toml", name))
    state_dir = work / "state" / name
    cli(env, "--config", config, "up", "-n", str(n), "--autostop", "0")
    try:
        cli(env, "--config", config, "install")
        cli(env, "--config", config, "start")  # also gives the head its restricted key
        ssh = subprocess.Popen(
            [sys.executable, "exoscale.py", "--name", name, "ssh", "0", "sleep", "3600"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            "the session to count", lambda: "SSH connection" in (((s := _status(state_dir)) and s.reason) or ""), 60
        )
        cli(env, "--name", name, "autostop", "--minutes", "1")
        wait_for("a busy sample under the new setting", lambda: (s := _status(state_dir)) and s.action == "busy", 60)
        ssh.terminate()
        ssh.wait(10)
        closed = time.time()
        stop = wait_for(
            "the decision to stop", lambda: (s := _status(state_dir)) and s.action == "stop" and s, 10 * unit
        )
        driver = sim_driver(sim)
        store = StateStore(state_dir)
        remote, head = Remote(store.key_path, store.known_hosts), store.load().head()
        steps = [""]
        done = threading.Event()

        def follow() -> None:  # the head's log of the teardown, while the head lasts
            while not done.is_set():
                try:
                    steps[0] = autostop_control.read_log(remote, head, 12) or steps[0]
                except autostop.AutostopError:
                    return

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        wait_for("no instances", lambda: not driver.list_nodes(ex_labels={"cluster": name}), 600, every=0.1)
        gone = time.time()
        done.set()
        print(
            f"{name}: the head's last log lines:\n{steps[0]}", file=sys.stderr
        )  # the hosts share this machine's clock: the head's times compare with ours
        return stop.time - closed - unit, gone - stop.time
    finally:
        cli(env, "--config", config, "down", "--yes")  # the rest: security group, SSH key, IAM key and role


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--unit", type=float, default=10.0, help="seconds per autostop minute")
    a = p.parse_args(argv)
    work = scratch_dir("bench-autostop-")
    # the hosts are offered uv and a package index as the internet would: install needs no cluster.toml setting
    with sim_with_hosts() as local:
        # the endpoint is the hosts' gateway: the heads reach it too
        env = {**os.environ, **local.client_env(work / "state"), autostop.UNIT_ENV: str(a.unit)}
        d1, t1 = one_cluster(local, env, work, 1, a.unit)
        d4, t4 = one_cluster(local, env, work, 4, a.unit)
    return report(
        "autostop",
        unit_s=a.unit,
        sample_s=autostop.Settings(1, a.unit).sample_s,
        detection_delay_1_node_s=d1,
        detection_delay_4_nodes_s=d4,
        teardown_1_node_s=t1,
        teardown_4_nodes_s=t4,
        teardown_ratio=t4 / t1,
    )


if __name__ == "__main__":
    main()
