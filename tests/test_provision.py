"""Provisioning (cloud.provision, cloud.ssh_ready) and the `up`/`down` commands against the in-process local
Exoscale API, without root or hosts: instances get addresses nobody answers on, which is all `up`'s
cloud half needs, and exactly what an sshd that never answers looks like."""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import requests
from exoscale_auth import ExoscaleV2Auth
from libcloud.compute.types import NodeState

from cloud import provision, ssh_ready
from cloud.exoscale_driver import ExoscaleV2NodeDriver, RetryPolicy
from cloud.retry import Wait
from cloud.state import NodeRecord, StateStore, toolkit_dirs
from tests.conftest import ROOT, SIM_KEY, SIM_SECRET, ClusterCLI
from tests.support import UBUNTU, Events, cfg_for, left_of, make_cluster

# ------------------------------------------------------------------------------------------- down


def test_down_retries_a_failed_delete_and_finishes(driver, sim, tmp_path):
    make_cluster(driver, "c1", 3)
    sim.app.model.faults.fail_next_ops, sim.app.model.faults.fail_ops_matching = 2, "delete-instance"
    events = Events()
    res = provision.down(driver, cfg_for("c1", tmp_path).spec, progress=events, wait=Wait(60))
    assert res.failed == {}, events.text()
    assert left_of(driver, "c1") == ([], [], [])
    assert "delete failed" in events.text() and "deleting again" in events.text()


def test_down_stops_at_its_timeout_with_what_is_left_then_a_second_down_finishes(driver, sim, tmp_path):
    make_cluster(driver, "c2", 2)
    faults = sim.app.model.faults
    faults.fail_next_ops, faults.fail_ops_matching = 10_000, "delete-instance"
    events = Events()
    # 5 s: room for a few failed deletes (~0.3 s each quiet) when the machine is busy; with less, the first
    # attempt could still be in flight at the deadline, and its instance reported without the fault
    res = provision.down(driver, cfg_for("c2", tmp_path).spec, progress=events, wait=Wait(5.0, every=0.5))
    assert set(res.failed) == {"instance c2-head", "instance c2-worker-1", "security group raysweep-c2"}
    assert all("fault" in why for k, why in res.failed.items() if k.startswith("instance"))
    assert "waiting for c2-head, c2-worker-1 to be deleted" in events.text()
    faults.fail_next_ops = 0
    res = provision.down(driver, cfg_for("c2", tmp_path).spec, wait=Wait(60))
    assert res.failed == {} and left_of(driver, "c2") == ([], [], [])


def test_down_leaves_a_group_raysweep_did_not_make(driver, sim, tmp_path):
    driver.ex_create_security_group("raysweep-col", "the colleague's own group")
    events = Events()
    assert provision.down(driver, cfg_for("col", tmp_path).spec, progress=events).failed == {}
    assert [g.description for g in driver.ex_list_security_groups() if g.name == "raysweep-col"] == [
        "the colleague's own group"
    ]
    assert "left alone: raysweep did not make it" in events.text()
    with pytest.raises(provision.ProvisionError, match="raysweep did not make"):
        provision.ensure_security_group(driver, cfg_for("col", tmp_path).spec, Events())


class FilterProxy:
    """A real HTTP server in front of the local API that treats list-instances' `labels` filter its own
    way, as another reading of the spec's bare string may: `ignore` lists everything, `any` lists
    instances with any of the pairs, `one-label` reads the whole text as a single label `key=rest`.
    Every other request passes through untouched (its signature still valid)."""

    def __init__(self, sim, mode):
        self.sim, self.mode = sim, mode
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                url = urllib.parse.urlsplit(self.path)
                labels = urllib.parse.parse_qs(url.query).get("labels")
                if self.command == "GET" and url.path == "/v2/instance" and labels:
                    status, data = 200, json.dumps({"instances": proxy.listed(labels[0])}).encode()
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                    r = requests.request(
                        self.command, sim.endpoint[: -len("/v2")] + self.path, headers=headers, data=body
                    )
                    status, data = r.status_code, r.content
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def listed(self, text):
        every = requests.get(self.sim.endpoint + "/instance", auth=ExoscaleV2Auth(SIM_KEY, SIM_SECRET)).json()
        pairs = [p.split("=", 1) for p in text.split()]
        instances = every["instances"]
        if self.mode == "any":
            return [i for i in instances if any((i.get("labels") or {}).get(k) == v for k, v in pairs)]
        if self.mode == "one-label":
            k, rest = text.split("=", 1)
            return [i for i in instances if (i.get("labels") or {}).get(k) == rest]
        return instances

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("server", ["proxy:ignore", "proxy:one-label", "sim:ignore", "sim:any"])
def test_down_deletes_exactly_the_cluster_whatever_the_server_makes_of_the_filter(driver, sim, tmp_path, server):
    """The filter misread by a real HTTP proxy in front of the API, or by the local Exoscale's own switch."""
    make_cluster(driver, "a", 2)
    make_cluster(driver, "b", 2)
    strangers = [
        driver.create_node("s1", "standard.micro", UBUNTU, ex_labels={"cluster": "a"}),  # not managed by raysweep
        driver.create_node("s2", "standard.micro", UBUNTU, ex_labels={"managed-by": "raysweep", "cluster": "a-b"}),
        driver.create_node("s3", "standard.micro", UBUNTU),
    ]
    how, mode = server.split(":")
    proxy = FilterProxy(sim, mode) if how == "proxy" else None
    if proxy is None:
        sim.app.model.faults.labels_filter = mode
    try:
        through = ExoscaleV2NodeDriver(
            SIM_KEY,
            SIM_SECRET,
            host="127.0.0.1",
            port=proxy.port if proxy else sim.port,
            secure=False,
            retry=RetryPolicy(base_s=0.01),
        )
        res = provision.down(through, cfg_for("a", tmp_path).spec, wait=Wait(60))
    finally:
        if proxy:
            proxy.close()
        sim.app.model.faults.labels_filter = "exact"
    assert res.failed == {}
    assert sorted(r for r in res.removed if r.startswith("instance")) == ["instance a-head", "instance a-worker-1"]
    left = {nd.name for nd in driver.list_nodes()}
    assert left == {"b-head", "b-worker-1"} | {s.name for s in strangers}


def test_down_from_the_cli_prints_progress_stops_at_timeout_then_finishes(sim, tmp_path):
    cli = ClusterCLI(sim, tmp_path)
    d = ExoscaleV2NodeDriver(SIM_KEY, SIM_SECRET, host=sim.host, port=sim.port, secure=False)
    make_cluster(d, cli.name, 2)
    faults = sim.app.model.faults
    faults.fail_next_ops, faults.fail_ops_matching = 10_000, "delete-instance"
    r = cli("down", "--yes", "--timeout", "3", timeout=120)
    assert r.returncode == 1, r.stderr
    assert "delete failed" in r.stderr and "retrying" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("after 3 s, left: ") and f"instance {cli.name}-head" in last and "down` again" in last
    assert "<LibcloudError" not in r.stderr and "Traceback" not in r.stderr
    faults.fail_next_ops = 0
    r = cli("down", "--yes", check=0, timeout=120)
    assert left_of(d, cli.name) == ([], [], [])


# --------------------------------------------------------------------------------------------- up


def test_up_makes_the_cluster_and_completes_a_partial_one(driver, sim, tmp_path):
    cfg = cfg_for("u1", tmp_path, nodes=3)
    faults = sim.app.model.faults
    faults.fail_next_ops, faults.fail_ops_matching = 10_000, "create-instance"  # fails until its wait ends
    events = Events()
    res = provision.up(driver, cfg.spec, progress=events, running_timeout=1.5)
    faults.fail_next_ops = 0
    assert len(res.failed) == 3 and StateStore(cfg.state_dir).load() == res.state
    name, why = sorted(res.failed.items())[0]
    assert why.startswith(f"create instance '{name}' failed: fault") and "<" not in why
    faults.fail_next_ops = 1  # one more failure: tried again within the same `up`
    events = Events()
    res = provision.up(driver, cfg.spec, progress=events)
    assert res.failed == {} and f"{name}: in state error; replacing it" in events.text()
    assert [(n.name, n.role, n.state) for n in res.state.ordered()] == [
        ("u1-head", "head", "running"),
        ("u1-worker-1", "worker", "running"),
        ("u1-worker-2", "worker", "running"),
    ]
    assert all(n.ip for n in res.state.nodes)
    events = Events()
    provision.up(driver, cfg.spec, progress=events)  # again: nothing made
    assert "creating" not in events.text() and len(driver.list_nodes()) == 3
    [group] = driver.ex_list_security_groups()
    assert group.description == provision.group_description("u1")
    assert {(r.protocol, r.start_port, r.cidr, r.source_group_id) for r in group.rules} == {
        ("tcp", 22, "0.0.0.0/0", None),
        ("all", None, None, group.id),
    }


def test_wait_instances_reports_a_node_that_never_runs(driver, sim):
    ok = driver.create_node("ok", "standard.micro", UBUNTU)
    stuck = driver.create_node("stuck", "standard.micro", UBUNTU)
    broken = driver.create_node("broken", "standard.micro", UBUNTU)
    stopped = driver.create_node("stopped", "standard.micro", UBUNTU)
    driver.stop_node(stopped)
    sim.app.model.instances[stuck.id].state = "starting"  # a server whose instance never comes up
    sim.app.model.instances[broken.id].state = "error"
    events = Events()
    nodes = [driver.ex_get_node(n.id) for n in (ok, stuck, broken, stopped)]
    running, failed = provision.wait_instances(driver, nodes, events, Wait(2.0, every=0.5, poll=0.2))
    assert [n.name for n in running] == ["ok", "stopped"] and running[1].state == NodeState.RUNNING
    assert failed == {"stuck": "still starting after 2 s", "broken": "instance is in state error"}
    assert "waiting for stuck to run" in events.text() and "stopped: stopped; starting it" in events.text()


def test_ssh_wait_says_who_is_awaited_and_since_when(tmp_path):
    nodes = [NodeRecord("n-head", "head", "192.0.2.1"), NodeRecord("n-worker-1", "worker", "192.0.2.2")]
    events = Events()
    failed = ssh_ready.wait_ssh(tmp_path / "key", tmp_path / "known_hosts", nodes, events, timeout=2, every=0.5)
    assert set(failed) == {"n-head", "n-worker-1"} and "did not answer within 2 s" in failed["n-head"]
    beats = [l for l in events.lines if "still waiting for" in l]
    assert beats and "n-head (192.0.2.1), n-worker-1 (192.0.2.2) to answer on SSH, since" in beats[0]


def test_failed_create_is_one_readable_line_from_the_cli(sim, tmp_path):
    cli = ClusterCLI(sim, tmp_path)
    sim.app.model.faults.fail_next_ops, sim.app.model.faults.fail_ops_matching = 1, "create-instance"
    r = cli("up", "-n", "1", "--timeout", "1", timeout=120)
    assert r.returncode == 1
    assert f"{cli.name}-head: FAILED: create instance '{cli.name}-head' failed: fault" in r.stderr
    assert "<LibcloudError" not in r.stderr and "ExoscaleV2NodeDriver" not in r.stderr
    cli("down", "--yes", check=0)


def test_sshd_that_never_answers_is_reported_with_progress(sim, tmp_path):
    cli = ClusterCLI(sim, tmp_path)
    r = cli("up", "-n", "1", "--timeout", "4", timeout=120)
    assert r.returncode == 1
    assert re.search(rf"still waiting for {cli.name}-head \(.*\) to answer on SSH, since \d+ s", r.stderr), r.stderr
    assert "1 node(s) not ready" in r.stderr and "Run `exoscale.py up` again" in r.stderr
    cli("down", "--yes", check=0)


#: Runs the script argv[1] with argv[2:] as a user's terminal would: Ctrl-C raising KeyboardInterrupt. A test
#: run started in the background by a non-interactive shell (as CI may start it) has SIGINT and SIGQUIT
#: ignored, children inherit that, and Python then leaves SIGINT ignored: `up` would not see the Ctrl-C.
WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _why_stuck(p: subprocess.Popen) -> str:
    """What keeps a child that was told to stop from ending (its stderr still open): its signal state and
    Python threads if it runs (it was started with PYTHONFAULTHANDLER=1, so SIGABRT dumps them), else
    which processes hold its stderr pipe."""
    if p.poll() is None:
        status = Path(f"/proc/{p.pid}/status").read_text()
        fields = " ".join(
            x
            for x in status.splitlines()
            if x.split(":")[0] in ("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
        )
        p.send_signal(signal.SIGABRT)
        try:
            dump = p.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            dump = "(no dump within 10 s)"
        return f"it still runs ({fields}); its threads: {dump[-4000:]}"
    pipe = f"pipe:[{os.fstat(p.stderr.fileno()).st_ino}]"
    holders = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == pipe and fd.parts[2] != str(os.getpid()):
                holders.append(f"{fd.parts[2]} ({Path(f'/proc/{fd.parts[2]}/cmdline').read_bytes()[:200]!r})")
        except OSError:
            continue
    return f"it exited ({p.returncode}) but its stderr is held open by: {', '.join(holders) or 'nobody found'}"


def test_ctrl_c_during_up_says_what_was_made_and_down_removes_it(sim, tmp_path):
    cli = ClusterCLI(sim, tmp_path)
    # creations take long enough to be interrupted, also on a loaded machine where the Ctrl-C arrives seconds
    # after the "creating" lines (down removes instances still starting)
    sim.app.model.faults.op_delays = {"create-instance": 20}
    p = subprocess.Popen(
        [sys.executable, "-c", WITH_CTRL_C, "exoscale.py", "--name", cli.name, "up", "-n", "2"],
        cwd=ROOT,
        env={**os.environ, **cli.env, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps its threads (see _why_stuck)
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        seen.append(line)
        if f"{cli.name}-worker-1: creating" in "".join(seen) and f"{cli.name}-head: creating" in "".join(seen):
            break
    else:
        p.kill()
        pytest.fail(f"up did not start creating within 60 s: {''.join(seen)}")
    p.send_signal(signal.SIGINT)
    try:
        _, rest = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`up` did not end within 60 s of Ctrl-C; {_why_stuck(p)}")
    finally:
        p.kill()
    code = p.returncode
    assert code == 130 and "Traceback" not in rest, rest
    assert (
        f"interrupted. Made: SSH key raysweep-{cli.name}, security group raysweep-{cli.name}; being created "
        f"when interrupted (they may exist): " in rest
    )
    assert "`exoscale.py up` again completes the cluster, `exoscale.py down` removes it" in rest
    sim.app.model.faults.op_delays = {}
    d = ExoscaleV2NodeDriver(SIM_KEY, SIM_SECRET, host=sim.host, port=sim.port, secure=False)
    cli("down", "--yes", check=0)
    assert left_of(d, cli.name) == ([], [], [])


def test_second_up_of_the_same_cluster_is_refused_naming_the_first(sim, tmp_path):
    cli = ClusterCLI(sim, tmp_path)
    with StateStore(tmp_path / cli.name).lock("exoscale.py up"):
        r = cli("up", "-n", "1", timeout=60)
        assert r.returncode == 2
        assert f"cluster {cli.name!r} is being changed by pid {os.getpid()} (exoscale.py up, since" in r.stderr
        r = cli("down", "--yes", timeout=60)
        assert r.returncode == 2 and "is being changed by" in r.stderr
    assert ExoscaleV2NodeDriver(SIM_KEY, SIM_SECRET, host=sim.host, port=sim.port, secure=False).list_nodes() == []


def test_wrong_secret_says_the_key_pair_is_probably_wrong_and_where_it_was_read(sim, tmp_path):
    cli = ClusterCLI(sim, tmp_path)
    cli.env["EXOSCALE_API_SECRET"] = SIM_SECRET + "x"
    r = cli("list-nodes", timeout=60)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert "invalid request signature" in line and "the API key pair is probably wrong" in line
    assert f"key {SIM_KEY}" in line and "EXOSCALE_API_KEY and EXOSCALE_API_SECRET" in line
    assert SIM_SECRET not in r.stderr


# ----------------------------------------------------------------------------------------- state


def test_state_directories_are_private_and_old_ones_fixed(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home, clusters = toolkit_dirs()
    clusters.mkdir(parents=True)  # as an earlier version left them: 755
    os.chmod(home, 0o755)
    os.chmod(clusters, 0o755)
    StateStore(clusters / "c").ensure_dir()
    assert {oct(p.stat().st_mode & 0o777) for p in (home, clusters, clusters / "c")} == {"0o700"}
    mine = tmp_path / "mine"  # a directory of the user's own, given as RAYSWEEP_STATE_DIR: not changed
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)
    StateStore(mine / "c").ensure_dir()
    assert oct(mine.stat().st_mode & 0o777) == "0o755" and oct((mine / "c").stat().st_mode & 0o777) == "0o700"


def test_state_files_of_earlier_versions_still_load(tmp_path):
    store = StateStore(tmp_path / "c")
    store.ensure_dir()
    old = {"name": "c", "nodes": [{"name": "c-head", "role": "head", "ip": "10.0.0.1"}], "source": "terraform"}
    Path(store.path).write_text(json.dumps(old))
    st = store.load()
    assert st is not None and st.name == "c" and [n.ip for n in st.nodes] == ["10.0.0.1"]
