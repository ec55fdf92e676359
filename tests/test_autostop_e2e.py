"""Autostop end to end on a 2-node sim cluster (namespace hosts, real sshd, real Ray), minutes made seconds
(RAYSWEEP_AUTOSTOP_UNIT_S): the daemon comes back when killed, `--off` keeps an idle cluster, an open `ssh`
session and a `dashboard` tunnel keep it alive, a submitted job longer than the setting keeps it alive after
this machine disconnects while `status` calls do not, then it tears itself down with the cluster's
restricted key, the commands that would reach its nodes say so at once, and `down` removes the rest."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cloud import autostop, autostop_control, head_credentials, iam
from cloud.remote import Remote
from cloud.state import StateStore
from tests.conftest import ROOT, SIM_KEY, SIM_SECRET, ClusterCLI, sim_cluster_toml
from tests.support import api, assert_nothing_left, hosts_of

pytestmark = pytest.mark.root

UNIT = 10.0  # seconds per autostop minute: sample every 2.5 s, connections under 7.5 s are short checks


@pytest.fixture(scope="module")
def cluster(sim_hosts, node_wheelhouse, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    cli = ClusterCLI(sim_hosts, state)
    cli.env[autostop.UNIT_ENV] = str(UNIT)
    # only Ray on the nodes: its jobs are plain Python (TensorFlow would cost ~1 GB of each host's memory)
    cli.config = str(sim_cluster_toml(state / "cluster.toml", cli.name, node_wheelhouse, packages="[]"))
    try:
        cli("--config", cli.config, "up", "-n", "2", "--autostop", "0", check=0)
        cli("--config", cli.config, "install", check=0, timeout=900)
        r = cli("--config", cli.config, "start", check=0)
        assert "autostop daemon running: off; restricted key raysweep-" in r.stderr, r.stderr[-2000:]
        cli.hosts = hosts_of(sim_hosts, cli.name)
        yield cli
    finally:
        if api(sim_hosts).list_nodes(ex_labels={"cluster": cli.name}) or StateStore(state / cli.name).load():
            cli("--config", cli.config, "down", "--yes")
        iam.delete_cluster_iam(api(sim_hosts), cli.name)  # (down removes them; this is for a failed test)


def instances(sim, cli) -> list[str]:
    return sorted(n.name for n in api(sim).list_nodes(ex_labels={"cluster": cli.name}))


def head_status(cli, wait: float = 30.0) -> autostop.HeadStatus:
    """The daemon's last status (waiting for its first sample after a start)."""
    store = StateStore(cli.state_dir / cli.name)
    remote = Remote(store.key_path, store.known_hosts)
    head = store.load().head()
    return wait_for("the daemon's status", lambda: autostop_control.read_head(remote, head)[1], wait)


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"waited {timeout:g} s for {what}; last: {last!r}")


def hold(sim, cli, seconds: float) -> None:
    """Wait `seconds` while asserting the cluster stays whole."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert len(instances(sim, cli)) == 2, f"the cluster was torn down while it should live: {head_status(cli)}"
        time.sleep(1)


def test_the_head_holds_only_a_restricted_key(cluster, sim_hosts):
    r = cluster("cmd", "--node", "0", f"stat -c %a {head_credentials.HEAD_PATH} && cat {head_credentials.HEAD_PATH}")
    assert r.returncode == 0, r.stderr
    mode, text = r.stdout.split("\n", 1)
    creds = head_credentials.HeadCredentials.from_json(text.split("| ", 1)[1])
    assert mode.endswith("600") and creds.key != SIM_KEY and SIM_SECRET not in text
    assert [k.key for k in iam.find_keys(api(sim_hosts), cluster.name)] == [creds.key]
    r = cluster("cmd", "--node", "1", f"test -e {head_credentials.HEAD_PATH} || echo none")
    assert "none" in r.stdout  # workers get no key


def test_status_shows_the_setting_and_a_killed_daemon_comes_back(cluster, sim_hosts):
    r = cluster("--config", cluster.config, "status", check=0)
    assert "autostop: off" in r.stdout, r.stdout
    first = wait_for("the daemon's first sample", lambda: head_status(cluster), 30)
    r = cluster("cmd", "--node", "0", f"kill {first.pid}", check=0)
    later = wait_for(
        "a new daemon reporting",
        lambda: (s := head_status(cluster)).pid != first.pid and s.time > first.time and s,
        30,
    )
    assert later.action == "off"
    r = cluster("autostop", "--log", check=0)
    assert f"daemon ended (exit -{signal.SIGTERM.value})" in r.stdout and r.stdout.count("daemon started") >= 2


def test_off_keeps_an_idle_cluster(cluster, sim_hosts):
    hold(sim_hosts, cluster, 1.5 * UNIT)
    assert head_status(cluster).action == "off"


def _popen(cli, *args):
    return subprocess.Popen(
        [sys.executable, "exoscale.py", "--name", cli.name, "--config", cli.config, *args],
        cwd=ROOT,
        env={**os.environ, **cli.env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _busy_with_ssh(cli, exclude=()):
    """The SSH peers the daemon counts as activity (also reported while autostop is off), if any new."""
    peers = re.findall(r"SSH connection from ([0-9.]+:[0-9]+)", head_status(cli).reason)
    return any(p not in exclude for p in peers) and peers


def test_an_open_ssh_session_and_a_dashboard_tunnel_keep_it_alive(cluster, sim_hosts):
    ssh = _popen(cluster, "ssh", "0", "sleep", "3600")
    dash = None
    try:
        wait_for("the ssh session to count", lambda: _busy_with_ssh(cluster), 30)
        cluster("autostop", "--minutes", "1", check=0)
        hold(sim_hosts, cluster, 1.5 * UNIT)
        ssh_peers = _busy_with_ssh(cluster)
        assert ssh_peers and head_status(cluster).action == "busy", head_status(cluster)
        dash = _popen(cluster, "dashboard")
        line = dash.stdout.readline()
        assert "Ray dashboard of cluster" in line, dash.stderr.read() if dash.poll() is not None else line
        wait_for("the tunnel to count", lambda: _busy_with_ssh(cluster, exclude=ssh_peers), 30)
        ssh.terminate()
        ssh.wait(10)
        wait_for("the ssh session to end", lambda: not set(ssh_peers) & set(_busy_with_ssh(cluster) or ()), 30)
        hold(sim_hosts, cluster, 1.5 * UNIT)
        assert _busy_with_ssh(cluster) and head_status(cluster).action == "busy", head_status(cluster)
    finally:
        ssh.kill()
        if dash is not None:
            dash.kill()  # as a closed laptop would: no goodbye
            dash.wait(30)


JOB = "import ray, time; ray.init(); ray.get(ray.remote(lambda: time.sleep({s})).remote()); print('slept')"


def test_a_long_job_keeps_it_alive_then_it_ends_itself_and_down_removes_the_rest(cluster, sim_hosts):
    r = cluster("--config", cluster.config, "submit", "--no-follow", "--", "python", "-c", JOB.format(s=2.5 * UNIT))
    assert r.returncode == 0, r.stderr[-2000:]
    job = r.stdout.strip()
    wait_for("the job to count", lambda: job in head_status(cluster).reason, 60)
    # this machine is gone (the submit returned, no tunnel open): the job and its task keep the cluster
    hold(sim_hosts, cluster, 1.5 * UNIT)
    assert job in head_status(cluster).reason
    idle_seen: list[float] = []
    deadline = time.monotonic() + 3 * UNIT + 120
    while instances(sim_hosts, cluster):
        assert time.monotonic() < deadline, f"the cluster never stopped: {head_status(cluster)}"
        r = cluster("--config", cluster.config, "status")  # asking must not reset the clock
        m = re.search(r"; idle (\d+) s so far", r.stdout)
        if m:
            idle_seen.append(float(m.group(1)))
    # it stopped after the job (idle was seen) although `status` ran back to back: asking is no activity
    assert idle_seen and idle_seen == sorted(idle_seen), f"no idle time seen, or status reset it: {idle_seen}"
    wait_for("the hosts to be gone", lambda: not any(i in sim_hosts.app.model.hooks.hosts for i in cluster.hosts), 30)
    r = cluster("--config", cluster.config, "status", check=0)
    assert "autostopped; run down to remove the rest" in r.stdout, r.stdout + r.stderr
    # the commands that reach the nodes from the local state say so in one line instead of waiting for SSH
    for args in (["cmd", "true"], ["ssh", "0", "true"], ["scp", cluster.config, "c.toml"], ["submit", "--", "true"]):
        r = cluster("--config", cluster.config, *args, timeout=60)
        said = f"cluster {cluster.name!r}: autostopped; run down to remove the rest (security group"
        assert r.returncode != 0 and said in r.stderr and len(r.stderr.splitlines()) == 1, f"{args}: {r.stderr}"
    r = cluster("--config", cluster.config, "down", "--yes", check=0)
    assert all(w in r.stderr for w in ("security group", "SSH key", "API key", "IAM role")), r.stderr
    assert_nothing_left(sim_hosts, cluster.name, cluster.hosts)
    assert iam.find_keys(api(sim_hosts), cluster.name) == [] and iam.find_role(api(sim_hosts), cluster.name) is None
    r = cluster("--config", cluster.config, "down", "--yes", check=0)
    assert "nothing to remove" in r.stderr
