"""An adaptive sweep on a 2-node sim cluster through the SSH tunnel (namespace hosts, real sshd, real Ray; only
Ray installed on the nodes): a tiny program printing known learning curves, ASHA, the trials it prunes."""

from __future__ import annotations

import csv
import json

import pytest

from cloud.state import StateStore
from tests.conftest import ClusterCLI, run_cli, sim_cluster_toml
from tests.support import api

pytestmark = pytest.mark.root

# a learning curve reaching q after `epochs` epochs, one JSON line per epoch, then the final value
CURVE = r"""
import json, sys, time
q, epochs, pause = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for e in range(1, epochs + 1):
    time.sleep(pause)
    print(json.dumps({"epoch": e, "acc": q * e / epochs}), flush=True)
print(json.dumps({"acc": q}))
"""


@pytest.fixture(scope="module")
def cluster(sim_hosts, node_wheelhouse, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    cli = ClusterCLI(sim_hosts, state)
    # only Ray and numpy (for the tasks' data objects) on the nodes: the program is plain Python (TensorFlow would
    # cost ~1 GB of each host's memory)
    cli.config = str(sim_cluster_toml(state / "cluster.toml", cli.name, node_wheelhouse, packages='["numpy"]'))
    try:
        cli("--config", cli.config, "up", "-n", "2", check=0)
        cli("--config", cli.config, "install", check=0, timeout=900)
        cli("--config", cli.config, "start", check=0)
        yield cli
    finally:
        if api(sim_hosts).list_nodes(ex_labels={"cluster": cli.name}) or StateStore(state / cli.name).load():
            cli("--config", cli.config, "down", "--yes")


def test_asha_prunes_the_trials_behind_on_a_cluster_through_the_tunnel(cluster, tmp_path):
    """One at a time, in order: 0.5 and 0.9 each lead the first rung (step 1) when they reach it and run to
    their end; 0.3 and 0.7 are behind 0.9 there (ASHA, reduction 3, promotes only the best of fewer than 6)
    and are stopped at it, on the cluster's nodes, their reports having come through the tunnel."""
    (tmp_path / "curve.py").write_text(CURVE)
    text = 'program = "curve.py"\nmetric = { json-line = "acc" }\nprogress = { json-line = "acc", step = "epoch" }\n'
    text += 'args = "{q} 6 0.3"\n[params]\nq = [0.5, 0.9, 0.3, 0.7]\n'
    text += '[search]\nscheduler = "asha"\nmin_step = 1\nconcurrency = 1\ngrace = 2\n'
    (tmp_path / "sweep.toml").write_text(text)
    out = tmp_path / "out"
    where = ["--cluster", cluster.name, "--cluster-config", cluster.config]
    r = run_cli("-m", "pipeline.sweep", str(tmp_path / "sweep.toml"), "--out", str(out), *where, env=cluster.env)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "results.csv") as f:
        got = {row["trial"]: row for row in csv.DictReader(f)}
    assert {k: v["status"] for k, v in got.items()} == {
        "q=0.5": "ok",
        "q=0.9": "ok",
        "q=0.3": "pruned",
        "q=0.7": "pruned",
    }, got
    assert got["q=0.5"]["step"] == got["q=0.9"]["step"] == "6" and float(got["q=0.9"]["acc"]) == 0.9
    for q in ("0.3", "0.7"):  # stopped at the first rung: the steps printed before SIGTERM reached it
        last = int(got[f"q={q}"]["step"])
        assert 1 <= last < 6 and float(got[f"q={q}"]["acc"]) == pytest.approx(float(q) * last / 6), got[f"q={q}"]
    nodes = {n.ip for n in StateStore(cluster.state_dir / cluster.name).load().ordered()}
    assert {row["node"] for row in got.values()} <= nodes, got  # every trial ran on the cluster
    doc = json.loads((out / "results.json").read_text())
    assert [len(t["progress"]) for t in doc["trials"]] == [int(got[t["id"]]["step"]) for t in doc["trials"]]
    assert "done 2, pruned 2, failed 0" in r.stderr
