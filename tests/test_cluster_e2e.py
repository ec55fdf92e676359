"""The cluster workflow end to end: exoscale.py against the local Exoscale API whose instances are
real hosts on this machine (network namespaces with sshd), reached over SSH."""

import socket

import pytest

from cloud.state import StateStore
from tests.conftest import ClusterCLI
from tests.support import api, assert_nothing_left, hosts_of

pytestmark = pytest.mark.root


def node_ips(cli):
    st = StateStore(cli.state_dir / cli.name).load()
    return [n.ip for n in st.ordered()]


@pytest.fixture(scope="module")
def cluster(sim_hosts, tmp_path_factory):
    cli = ClusterCLI(sim_hosts, tmp_path_factory.mktemp("state"))
    r = cli("up", "-n", "3", check=0)
    assert "warning: SSH (port 22) will be open to 0.0.0.0/0" in r.stderr
    yield cli
    cli("down", "--yes")


def test_up_scp_cmd_and_isolation(cluster):
    r = cluster("list-nodes", check=0)
    rows = [line.split() for line in r.stdout.splitlines() if line[:1].isdigit()]
    assert [row[2] for row in rows] == ["head", "worker", "worker"] and {row[4] for row in rows} == {"running"}
    assert "Ray: not running (Ray is not installed on the head" in r.stdout
    cluster("scp", "pipeline/programs/mnist.py", "mnist.py", check=0)
    r = cluster("cmd", "sha256sum mnist.py", check=0)
    import hashlib

    from tests.conftest import ROOT

    want = hashlib.sha256((ROOT / "pipeline/programs/mnist.py").read_bytes()).hexdigest()
    lines = [l for l in r.stdout.splitlines() if "mnist.py" in l]
    assert len(lines) == 3 and all(want in l for l in lines)
    assert {l.split(" | ")[0] for l in lines} == {
        f"{cluster.name}-head",
        f"{cluster.name}-worker-1",
        f"{cluster.name}-worker-2",
    }
    cluster("cmd", "--node", "1", "echo here > /tmp/only-on-1", check=0)
    r = cluster("cmd", "test -e /tmp/only-on-1 && echo present || echo absent", check=0)
    assert sorted(l.split(" | ")[1] for l in r.stdout.splitlines()) == ["absent", "absent", "present"]


def test_scp_directory_recursively(cluster, tmp_path):
    d = tmp_path / "pkg"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("A")
    (d / "sub" / "b.txt").write_text("B")
    cluster("scp", str(d), "deep/pkg", check=0)
    r = cluster("cmd", "cat deep/pkg/a.txt deep/pkg/sub/b.txt", check=0)
    assert r.stdout.count("AB") == 3


def test_ssh_login_and_sudo(cluster):
    r = cluster("ssh", "0", "--", "whoami; sudo -n whoami; hostname", check=0)
    assert r.stdout.split() == ["ubuntu", "root", f"{cluster.name}-head"]


def test_only_port_22_from_outside_any_port_between_nodes(cluster):
    head, _w1, _ = node_ips(cluster)
    cluster("cmd", "--node", "0", "nohup python3 -m http.server 8265 --bind 0.0.0.0 >/dev/null 2>&1 &", check=0)
    r = cluster(
        "cmd",
        "--node",
        "0",
        "for i in $(seq 1 40); do ss -Htln | grep -q ':8265 ' && break; sleep 0.25; done; ss -Htln | grep ':8265 '",
        check=0,
    )  # listening before we probe from outside
    with socket.create_connection((head, 22), timeout=3):
        pass
    with pytest.raises(OSError):
        socket.create_connection((head, 8265), timeout=2).close()
    probe = f"python3 -c \"import urllib.request;print(urllib.request.urlopen('http://{head}:8265/').status)\""
    r = cluster("cmd", "--node", "1", f"for i in $(seq 1 20); do {probe} && break; sleep 0.5; done", check=0)
    assert "200" in r.stdout


def test_changed_host_key_refused(cluster):
    store = StateStore(cluster.state_dir / cluster.name)
    original = store.known_hosts.read_text()
    head, w1, _ = node_ips(cluster)
    lines = original.splitlines()
    w1_key = next(l for l in lines if l.startswith(w1 + " ")).split(" ", 1)[1]
    store.known_hosts.write_text("\n".join(f"{head} {w1_key}" if l.startswith(head + " ") else l for l in lines) + "\n")
    try:
        r = cluster("cmd", "--node", "0", "true")
        assert r.returncode == 1
        assert "host key" in r.stderr and "changed" in r.stderr and "refused" in r.stderr
        r = cluster("ssh", "0", "--", "true")
        assert r.returncode == 2 and "changed" in r.stderr
    finally:
        store.known_hosts.write_text(original)


def test_node_with_sshd_stopped_is_reported_others_done(cluster, tmp_path):
    cluster("cmd", "--node", "2", "sudo -n sh -c 'kill $(cat /home/.host/sshd.pid)'")
    f = tmp_path / "x.txt"
    f.write_text("x")
    r = cluster("scp", str(f), "x.txt")
    assert r.returncode == 1
    [bad] = [l for l in r.stderr.splitlines() if l.startswith(f"{cluster.name}-worker-2:")]
    assert "cannot reach sshd" in bad
    assert f"{cluster.name}-head: {f} -> x.txt: ok" in r.stderr
    r = cluster("cmd", "cat x.txt")
    assert r.returncode == 1 and r.stdout.count("| x") == 2 and "1 of 3 node(s) failed" in r.stderr


def test_down_removes_everything_even_without_local_state(sim_hosts, tmp_path):
    cli = ClusterCLI(sim_hosts, tmp_path)
    cli("up", "-n", "2", check=0)
    import shutil

    shutil.rmtree(tmp_path / cli.name)
    r = cli("down")
    assert r.returncode == 2 and "--yes" in r.stderr  # asks; stdin is not a terminal
    hosts = hosts_of(sim_hosts, cli.name)
    r = cli("down", "--yes", check=0)
    assert f"{cli.name}-head" in r.stderr and f"{cli.name}-worker-1" in r.stderr
    assert_nothing_left(sim_hosts, cli.name, hosts)
    r = cli("down", "--yes", check=0)  # idempotent
    assert "nothing to remove" in r.stderr


def test_up_survives_api_faults_and_completes_after_a_failed_operation(sim_hosts, tmp_path):
    cli = ClusterCLI(sim_hosts, tmp_path)
    model, faults = sim_hosts.app.model, sim_hosts.app.faults
    faults.error_rate = 0.3
    model.faults.fail_next_ops, model.faults.fail_ops_matching = 1, "create-instance"
    try:
        r = cli("up", "-n", "3", check=0)  # the failed create is tried again within the same `up`
        assert "FAILED" in r.stderr and "trying again to make" in r.stderr and "replacing it" in r.stderr, r.stderr
    finally:
        faults.error_rate = 0.0
        model.faults.fail_next_ops = 0
    d = api(sim_hosts)
    nodes = d.list_nodes(ex_labels={"cluster": cli.name})
    assert sorted(n.name for n in nodes) == [f"{cli.name}-head", f"{cli.name}-worker-1", f"{cli.name}-worker-2"]
    assert all(n.extra["state"] == "running" for n in nodes)
    cli("cmd", "true", check=0)
    r = cli("up", "-n", "3", check=0)  # re-running creates nothing more
    assert "creating" not in r.stderr
    hosts = hosts_of(sim_hosts, cli.name)
    cli("down", "--yes", check=0)
    assert_nothing_left(sim_hosts, cli.name, hosts)


def test_unknown_instance_type_lists_valid_ones(sim_hosts, tmp_path):
    cli = ClusterCLI(sim_hosts, tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text('instance_type = "standard.gigantic"\n')
    r = cli("--config", str(cfg), "up")
    assert r.returncode == 2
    assert "unknown instance type 'standard.gigantic'" in r.stderr and "standard.small" in r.stderr
    assert len([l for l in r.stderr.splitlines() if "error" in l]) == 1
