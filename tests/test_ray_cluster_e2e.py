"""Ray on a 3-node sim cluster from `make cluster-up` to `make cluster-down`: the sweep from this
machine through the SSH tunnel, privacy of Ray's ports, version checks, jobs, and the loss of a worker."""

import csv
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cloud.remote import Remote
from cloud.state import StateStore
from tests.conftest import ROOT, ClusterCLI, run_cli, sim_cluster_toml

pytestmark = [pytest.mark.root, pytest.mark.tensorflow]


def make(target, cli, config, timeout=900, **vars_):
    args = ["make", "-C", str(ROOT), target, f"CONFIG={config}"] + [f"{k}={v}" for k, v in vars_.items()]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **cli.env})


@pytest.fixture(scope="module")
def ray_cluster(sim_hosts, node_wheelhouse, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    cli = ClusterCLI(sim_hosts, state)
    cfg = sim_cluster_toml(state / "cluster.toml", cli.name, node_wheelhouse)
    cli.config = cfg
    r = make("cluster-up", cli, cfg, NODES=3)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "all 3 node(s) registered with Ray (3 CPUs)" in r.stderr
    yield cli
    if StateStore(state / cli.name).load() is not None:  # a test failed before cluster-down ran
        make("cluster-down", cli, cfg)


def nodes(cli):
    return StateStore(cli.state_dir / cli.name).load().ordered()


def remote(cli):
    store = StateStore(cli.state_dir / cli.name)
    return Remote(store.key_path, store.known_hosts)


def sweep_args(cli, out, *extra):
    """`python -m pipeline.mnist` on mnist-5k on the cluster into `out`, without the interpreter."""
    cluster = ["--cluster", cli.name, "--cluster-config", str(cli.config)]
    return ["-m", "pipeline.mnist", *cluster, "--data", "mnist-5k", "--out", str(out), *extra]


def sweep(cli, out, *extra, timeout=900):
    return run_cli(*sweep_args(cli, out, *extra), timeout=timeout, env=cli.env)


# A trial that only takes its time: the tests of lost nodes and lost connections are about the sweep's
# bookkeeping, not the training (test_sweep_from_this_machine_through_the_tunnel runs MNIST).
NAP = """import json, sys, time
time.sleep(float(sys.argv[2]))
print(json.dumps({"score": float(sys.argv[1])}))
"""


def nap_sweep_args(cli, tmp_path, seconds=6.0, trials=6):
    """`python -m pipeline.sweep` of `trials` napping trials on the cluster, into tmp_path/res. The program runs
    as `python3 data/<random name> X SECONDS nap-trial`: the last word is what finds it on a node."""
    (tmp_path / "nap.py").write_text(NAP)
    values = ", ".join(str(i) for i in range(1, trials + 1))
    (tmp_path / "nap.toml").write_text(
        f'program = "nap.py"\nargs = "{{x}} {seconds} nap-trial"\nmetric = {{ json-line = "score" }}\n'
        f"[params]\nx = [{values}]\n"
    )
    cluster = ["--cluster", cli.name, "--cluster-config", str(cli.config)]
    return ["-m", "pipeline.sweep", str(tmp_path / "nap.toml"), "--out", str(tmp_path / "res"), *cluster]


def test_install_is_idempotent_and_status_shows_ray(ray_cluster):
    r = ray_cluster("--config", str(ray_cluster.config), "install", check=0)
    assert r.stderr.count("already installed: python 3.11") == 3
    r = ray_cluster("--config", str(ray_cluster.config), "status", check=0)
    assert "Ray: 3 node(s) alive, 3 CPUs" in r.stdout


def test_sweep_from_this_machine_through_the_tunnel(ray_cluster, tmp_path):
    out = tmp_path / "res"
    r = sweep(ray_cluster, out, "--sizes", "32,64", "--dropouts", "0.0,0.4")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and all(x["status"] == "ok" for x in rows)
    ips = {n.ip for n in nodes(ray_cluster)}
    used = {x["node"] for x in rows}
    assert used <= ips and len(used) >= 2, used
    assert (out / "heatmap.png").stat().st_size > 10_000
    assert json.loads((out / "results.json").read_text())["dataset"] == "mnist-5k"


def test_no_ray_port_answers_from_outside_the_security_group(ray_cluster):
    rem = remote(ray_cluster)
    checked = 0
    for node, res in zip(nodes(ray_cluster), rem.run(nodes(ray_cluster), "ss -Htln")):
        assert res.ok, res.error
        ports = set()
        for line in res.stdout.splitlines():
            local = line.split()[3]
            host, port = local.rsplit(":", 1)
            if "127.0.0.1" not in host and host != "[::1]":
                ports.add(int(port))
        assert 22 in ports and len(ports) > 3, ports  # Ray listens on the node's address
        for port in sorted(ports - {22}):
            with pytest.raises(OSError):
                socket.create_connection((node.ip, port), timeout=0.7).close()
            checked += 1
        with socket.create_connection((node.ip, 22), timeout=3):
            pass
    assert checked >= 6


def test_version_mismatch_is_refused_with_both_versions(ray_cluster, tmp_path):
    head = nodes(ray_cluster)[0]
    rem = remote(ray_cluster)
    vfile = "raysweep-env/lib/python3.11/site-packages/ray/_version.py"
    [r] = rem.run(
        [head],
        f"cp {vfile} {vfile}.orig && sed -i 's/^version = .*/version = \"2.0.1\"/' {vfile} && grep -q 2.0.1 {vfile}",
    )
    assert r.ok, r.stderr
    try:
        r = sweep(ray_cluster, tmp_path / "x", "--sizes", "32", "--dropouts", "0.0", timeout=120)
        assert r.returncode == 2
        import ray as local_ray  # the local version, for the message

        assert "version mismatch" in r.stderr and local_ray.__version__ in r.stderr and "2.0.1" in r.stderr
        assert not (tmp_path / "x").exists()
    finally:
        rem.run([head], f"mv {vfile}.orig {vfile}")


def test_submit_job_logs_and_fetch(ray_cluster, tmp_path):
    c = ["--config", str(ray_cluster.config)]
    r = ray_cluster(
        *c,
        "submit",
        "--",
        "python",
        "-m",
        "pipeline.mnist",
        "--address",
        "auto",
        "--data",
        "mnist-5k",
        "--sizes",
        "32",
        "--dropouts",
        "0.0",
        "--out",
        "results/job1",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "best: size=32" in r.stdout and "SUCCEEDED" in r.stderr
    job_id = r.stderr.split("submitted job ", 1)[1].split(";")[0]
    r = ray_cluster(*c, "logs", job_id, check=0)
    assert "best: size=32" in r.stdout
    ray_cluster(*c, "fetch", "results/job1", str(tmp_path / "job1"), check=0)
    rows = list(csv.DictReader(open(tmp_path / "job1" / "results.csv")))
    assert [x["status"] for x in rows] == ["ok"]


def test_a_lost_worker_costs_no_trial(ray_cluster, sim_hosts, tmp_path):
    out = tmp_path / "res"
    victim = nodes(ray_cluster)[2]
    proc = subprocess.Popen(
        [sys.executable, *nap_sweep_args(ray_cluster, tmp_path)],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **ray_cluster.env},
    )
    rem = remote(ray_cluster)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until a trial runs on the victim
        [r] = rem.run([victim], "pgrep -f '[n]ap-trial' >/dev/null && echo busy")
        if "busy" in r.stdout:
            break
        if proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before a trial ran on the victim:\n{err[-6000:]}")
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("no trial ever ran on the victim node")
    hooks = sim_hosts.app.model.hooks
    host = next(h for h in hooks.hosts.values() if h.ip == victim.ip)
    hooks._stop(host)  # the VM is gone: every process of that host dies at once
    _stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 6 and len({x["x"] for x in rows}) == 6
    assert all(x["status"] == "ok" for x in rows)
    retried = [x for x in rows if int(x["attempts"]) > 1]
    assert retried, rows
    assert all(x["node"] != victim.ip for x in retried)


def test_head_unreachable_mid_sweep_then_resume(ray_cluster, sim_hosts, tmp_path):
    out = tmp_path / "res"
    hooks = sim_hosts.app.model.hooks
    head = nodes(ray_cluster)[0]
    netns = next(h.netns for h in hooks.hosts.values() if h.ip == head.ip)
    args = [sys.executable, *nap_sweep_args(ray_cluster, tmp_path)]
    env = {**os.environ, **ray_cluster.env, "RAY_CLIENT_RECONNECT_GRACE_PERIOD": "5"}
    proc = subprocess.Popen(args, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while not (out / "results.csv").exists() or len(list(csv.DictReader(open(out / "results.csv")))) < 1:
        if proc.poll() is not None:
            pytest.fail(
                f"the sweep ended (exit {proc.returncode}) before a trial finished: {proc.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no trial finished within 300 s: {proc.communicate()[1][-2000:]}")
        time.sleep(0.3)
    # a network partition between this machine and the head (the cluster itself is fine)
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            "nft",
            "insert",
            "rule",
            "inet",
            "exoscale",
            "input",
            "ip",
            "saddr",
            hooks.gateway,
            "drop",
        ],
        check=True,
    )
    try:
        _stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, stderr[-2000:]
        assert "lost the connection to cluster" in stderr and "run the same command again to resume" in stderr
        kept = list(csv.DictReader(open(out / "results.csv")))
        assert 1 <= len(kept) < 6 and all(x["status"] == "ok" for x in kept)
    finally:
        hooks._apply_firewalls(hooks._firewalls())  # heal the partition
    r = subprocess.run(args, cwd=ROOT, text=True, capture_output=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"reusing {len(kept)} finished trial(s)" in r.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 6 and all(x["status"] == "ok" for x in rows)


def test_cluster_down_leaves_nothing(ray_cluster, sim_hosts):
    from tests.support import assert_nothing_left, hosts_of

    hosts = hosts_of(sim_hosts, ray_cluster.name)
    r = make("cluster-down", ray_cluster, ray_cluster.config)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_nothing_left(sim_hosts, ray_cluster.name, hosts)
