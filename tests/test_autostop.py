"""Autostop's decision core (observations in, decision out), its reading of real TCP tables, the setting's
validation, the head start command, and the daemon's view of a real local Ray through the dashboard's
HTTP APIs (no driver of its own)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from cloud import autostop, autostop_control, autostop_daemon, config, provision
from cloud.autostop import Clock, Observation, SessionTracker, Settings, decide
from cloud.config import ConfigError
from tests.conftest import ROOT, free_port, run_cli

ENV = {"EXOSCALE_API_KEY": "EXOk", "EXOSCALE_API_SECRET": "s3cret"}
S = Settings(minutes=2, unit_s=10)  # 20 s


# ------------------------------------------------------------------------------------- decisions


def test_idle_time_accumulates_and_stops_at_the_setting():
    clock = Clock(100.0, S)
    assert decide(clock, S, Observation(110.0)).action == "idle"
    d = decide(clock, S, Observation(119.9))
    assert d.action == "idle" and d.idle_s == pytest.approx(19.9)
    d = decide(clock, S, Observation(120.0))
    assert d.action == "stop" and "tearing the cluster down" in d.reason


@pytest.mark.parametrize(
    "obs, why",
    [
        (Observation(0, jobs=["raysubmit_1 running"]), "job raysubmit_1"),
        (Observation(0, tasks=1), "1 task(s)"),
        (Observation(0, actors=2), "2 actor(s)"),
        (Observation(0, ssh=["10.0.0.1:50000"]), "SSH connection from 10.0.0.1"),
    ],
)
def test_any_activity_resets_the_clock(obs, why):
    clock = Clock(0.0, S)
    obs.now = 500.0
    d = decide(clock, S, obs)
    assert d.action == "busy" and why in d.reason and clock.last_active == 500.0
    assert decide(clock, S, Observation(519.0)).action == "idle"
    assert decide(clock, S, Observation(520.0)).action == "stop"


def test_off_never_stops_and_a_new_setting_restarts_the_count():
    off = Settings(0, 10)
    clock = Clock(0.0, S)
    for t in (100.0, 10_000.0):
        assert decide(clock, off, Observation(t)).action == "off"
    assert decide(clock, S, Observation(10_010.0)).action == "idle"  # counted from the change, not from 0
    assert decide(clock, S, Observation(10_029.0)).action == "idle"
    assert decide(clock, S, Observation(10_030.0)).action == "stop"


def test_an_unanswering_ray_is_never_stopped_but_a_stopped_ray_is_idle():
    clock = Clock(0.0, S)
    d = decide(clock, S, Observation(1000.0, error="URLError: refused"))
    assert d.action == "unknown" and "not stopping" in d.reason
    d = decide(clock, S, Observation(1000.0, ray_running=False))
    assert d.action == "stop" and "Ray is not running" in d.reason


# ------------------------------------------------------------------------------- SSH connections


def _established_pair(family=socket.AF_INET, host="127.0.0.1"):
    srv = socket.socket(family)
    srv.bind((host, 0))
    srv.listen()
    cli = socket.create_connection((host, srv.getsockname()[1]))
    conn, _ = srv.accept()
    return srv, cli, conn


def test_inbound_connections_are_read_from_the_kernel_table():
    srv, cli, conn = _established_pair()
    try:
        port = srv.getsockname()[1]
        peers = autostop_daemon.inbound_connections(open("/proc/net/tcp").read(), port=port)
        assert f"127.0.0.1:{cli.getsockname()[1]}" in peers
        assert all(p.startswith("127.0.0.1:") for p in peers)
    finally:
        for s in (conn, cli, srv):
            s.close()


def test_inbound_ipv6_connections_are_read_too():
    if not socket.has_ipv6 or not os.path.exists("/proc/net/tcp6"):
        pytest.skip("no IPv6 on this machine")
    try:
        srv, cli, conn = _established_pair(socket.AF_INET6, "::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    try:
        peers = autostop_daemon.inbound_connections(open("/proc/net/tcp6").read(), port=srv.getsockname()[1])
        assert f"::1:{cli.getsockname()[1]}" in peers
    finally:
        for s in (conn, cli, srv):
            s.close()


def test_short_connections_and_cluster_members_are_not_sessions():
    t = SessionTracker()
    assert t.long_lived({"1.2.3.4:5000", "10.0.0.2:6000"}, 0.0, 7.5, members={"10.0.0.2"}) == []
    assert t.long_lived({"1.2.3.4:5000", "1.2.3.4:5001"}, 5.0, 7.5) == []  # 5001 just opened
    assert t.long_lived({"1.2.3.4:5000", "1.2.3.4:5001"}, 8.0, 7.5) == ["1.2.3.4:5000"]
    assert t.long_lived({"1.2.3.4:5001"}, 13.0, 7.5) == ["1.2.3.4:5001"]
    assert t.long_lived({"1.2.3.4:5000"}, 14.0, 7.5) == []  # a new connection from the same port is new


def test_jobs_submitted_count_drivers_only_after_the_grace_window():
    now = 1000.0
    jobs = [
        {"type": "SUBMISSION", "status": "RUNNING", "submission_id": "raysubmit_a", "start_time": 999_000},
        {"type": "SUBMISSION", "status": "SUCCEEDED", "submission_id": "raysubmit_b", "start_time": 1},
        {"type": "DRIVER", "status": "RUNNING", "job_id": "02000000", "start_time": 998_000},  # 2 s: a check
        {"type": "DRIVER", "status": "RUNNING", "job_id": "03000000", "start_time": 900_000},  # 100 s: a sweep
    ]
    assert autostop.active_jobs(jobs, now, 7.5) == ["raysubmit_a running", "driver 03000000 connected"]


# ------------------------------------------------------------------------------------ the setting


def test_setting_validation_in_config_and_cli(tmp_path):
    assert config.load(env=ENV).autostop_minutes == 120
    assert config.load(env=ENV, autostop_minutes=0).autostop_minutes == 0
    f = tmp_path / "c.toml"
    f.write_text("autostop_minutes = 30\n")
    assert config.load(f, env=ENV).autostop_minutes == 30
    for bad in ("-1", '"soon"', "true"):
        f.write_text(f"autostop_minutes = {bad}\n")
        with pytest.raises(ConfigError, match="autostop_minutes .*a number of minutes >= 0"):
            config.load(f, env=ENV)
    r = run_cli(
        "exoscale.py", "--name", "nosuch", "autostop", "--minutes", "-5", env={"RAYSWEEP_STATE_DIR": str(tmp_path)}
    )
    assert r.returncode == 2 and "--minutes -5.0: a number of minutes >= 0" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(
        "exoscale.py", "--name", "nosuch", "up", "--autostop", "-1", env={**ENV, "RAYSWEEP_STATE_DIR": str(tmp_path)}
    )
    assert r.returncode == 2 and "autostop_minutes -1.0" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="RAYSWEEP_AUTOSTOP_UNIT_S='0'"):
        autostop.unit_from_env({"RAYSWEEP_AUTOSTOP_UNIT_S": "0"})


def test_status_line_shows_setting_idle_time_and_last_decision():
    st = autostop.HeadStatus(1000.0, 42, S, "idle", 12.0, "no job, task, actor or SSH session; idle 12 s of 20 s", 988)
    settings, status, now = autostop.parse_head(
        f"RAYSWEEP_NOW 1003.5\nRAYSWEEP_FILE {autostop.SETTINGS}\n{S.to_json()}\n"
        f"RAYSWEEP_FILE {autostop.STATUS}\n{st.to_json()}\n"
    )
    assert settings == S and status == st and now == 1003.5
    line = autostop.describe(settings, status, now)
    assert line.startswith(
        "autostop: after 2 idle minute(s) (unit 10 s); idle 16 s so far; last decision (4 s ago): idle"
    )
    assert "not reporting" in autostop.describe(settings, status, 1100.0)
    assert autostop.describe(Settings(0), None, None) == "autostop: off; the daemon has not reported yet"
    assert "not set up" in autostop.describe(*autostop.parse_head("RAYSWEEP_NOW 1\n"))


def test_a_head_without_a_setting_gets_the_advice_that_fits_how_the_cluster_was_made(tmp_path, monkeypatch):
    """`start` launches the daemon on a static cluster; on one made by `ray up` (from `ray-config`, or by
    `up --max-workers`) the YAML's head start commands do, and `exoscale.py start` would be wrong there."""
    from cloud import head_credentials

    monkeypatch.setenv("RAYSWEEP_STATE_DIR", str(tmp_path))
    cfg = config.load(env=ENV, name="kinds")
    assert cfg.state_dir == tmp_path / "kinds"
    cfg.state_dir.mkdir()

    def line() -> str:
        return autostop.describe(None, None, None, autostop_control.start_advice(cfg))

    assert "not set up on the head (run `exoscale.py start`)" in line()
    provision.cluster_yaml_path(cfg.state_dir).write_text("cluster_name: kinds\n")  # as `up --max-workers` leaves it
    assert "`exoscale.py up --max-workers N` again" in line() and "exoscale.py start" not in line(), line()
    provision.cluster_yaml_path(cfg.state_dir).unlink()
    key_copy = cfg.state_dir / "head" / Path(head_credentials.HEAD_PATH).name
    key_copy.parent.mkdir()
    key_copy.write_text("{}")  # as the node provider leaves it for `ray up` on a `ray-config` YAML
    assert "`ray up` on its YAML again" in line() and "exoscale.py start" not in line(), line()
    stale = autostop.HeadStatus(1000.0, 42, S, "idle", 12.0, "idle", 988)
    assert "exoscale.py start" not in autostop.describe(S, stale, 2000.0, autostop_control.start_advice(cfg))


def test_head_start_command_writes_a_missing_setting_and_starts_a_detached_supervisor(tmp_path):
    """Run as the head would (no systemd as PID 1 here): the setting appears, a supervisor starts once."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "raysweep-env").symlink_to(sys.prefix)  # this venv stands for the node's environment
    lib = home / autostop.LIB
    lib.mkdir(parents=True)
    (lib / "cloud").symlink_to(ROOT / "cloud")
    cmd = autostop.head_start_command(5, 60)
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    try:
        for _ in range(2):
            r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and "RAYSWEEP_AUTOSTOP_STARTED" in r.stdout, r.stderr
        assert Settings.from_json((home / autostop.SETTINGS).read_text()) == Settings(5, 60)
        deadline = time.monotonic() + 30
        while not (home / autostop.STATUS).exists():
            assert time.monotonic() < deadline, f"the daemon wrote no status: {_read(home / autostop.LOG)}"
            time.sleep(0.2)
        (home / autostop.SETTINGS).write_text(Settings(7, 60).to_json())
        r = subprocess.run(["bash", "-c", autostop.head_start_command(9, 60)], env=env, capture_output=True, text=True)
        assert Settings.from_json((home / autostop.SETTINGS).read_text()) == Settings(7, 60)  # kept
        deadline = time.monotonic() + 30
        while len(_pids(f"{home}", "supervise")) != 1:  # the later ones find the lock taken and end
            assert time.monotonic() < deadline, f"supervisors: {_pids(f'{home}', 'supervise')}"
            time.sleep(0.2)
        assert "already running" in (home / ".raysweep/autostop-supervisor.out").read_text()
    finally:
        for pid in _pids(f"{home}", "supervise") + _pids(f"{home}", "autostop_daemon run"):
            os.kill(pid, 15)


def _read(p):
    return p.read_text() if p.exists() else "(no log)"


def _pids(home: str, what: str) -> list[int]:
    """Processes of this test's daemon: found by their HOME, never by name alone."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            environ = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if what in cmdline and f"HOME={home}".encode() in environ and "bash" not in cmdline.split()[0]:
            out.append(int(d))
    return out


def _run_on_fake_head(home, command: str) -> None:
    r = subprocess.run(
        ["bash", "-c", command], env={"HOME": str(home), "PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert r.returncode == 0 and autostop.STARTED in r.stdout, r.stderr[-2000:]
    deadline = time.monotonic() + 30
    while not (home / autostop.STATUS).exists():  # the daemon runs from the code where the YAML mounts it
        assert time.monotonic() < deadline, f"the daemon wrote no status: {_read(home / autostop.LOG)}"
        time.sleep(0.2)


def test_ray_config_head_starts_the_autostop_daemon_with_the_setting(tmp_path):
    """The YAML of `ray-config` (and so of `up --max-workers`) ends the head's start commands with the daemon's
    launch; run as the head would, from the code the YAML mounts, it writes the setting (--autostop, else
    cluster.toml's autostop_minutes; 0 = off) and the daemon reports."""
    import yaml

    toml = tmp_path / "off.toml"
    toml.write_text("autostop_minutes = 0\n")
    env = {"RAYSWEEP_STATE_DIR": str(tmp_path / "state"), "RAYSWEEP_AUTOSTOP_UNIT_S": "30"}
    homes = []
    try:
        cases = (([], ["--autostop", "7"], Settings(7, 30)), (["--config", str(toml)], [], Settings(0, 30)))
        for before, after, want in cases:
            r = run_cli("exoscale.py", *before, "--name", "rc-auto", "ray-config", *after, env=env)
            assert r.returncode == 0, r.stderr
            config = yaml.safe_load(r.stdout)
            home = tmp_path / f"home{len(homes)}"
            homes.append(home)
            home.mkdir()
            (home / "raysweep-env").symlink_to(sys.prefix)  # this venv stands for the head's environment
            [code] = [k for k in config["file_mounts"] if k.rstrip("/").endswith("/cloud")]
            mounted = home / code.removeprefix("~/").rstrip("/")
            mounted.parent.mkdir(parents=True)
            mounted.symlink_to(ROOT / "cloud")
            command = config["head_start_ray_commands"][-1]
            assert "-m cloud.autostop_daemon launch" in command and "ray start" not in command, command
            _run_on_fake_head(home, command)
            assert Settings.from_json((home / autostop.SETTINGS).read_text()) == want
    finally:
        for home in homes:
            for pid in _pids(f"{home}", "supervise") + _pids(f"{home}", "autostop_daemon run"):
                os.kill(pid, 15)


def test_the_code_shipped_to_a_static_head_is_complete(tmp_path):
    """`start` copies only CODE_FILES to the head: the daemon and everything its teardown imports must load
    from them alone."""
    pkg = tmp_path / "lib" / "cloud"
    pkg.mkdir(parents=True)
    for name in autostop_control.CODE_FILES:
        (pkg / name).write_bytes((ROOT / "cloud" / name).read_bytes())
    check = (  # (this venv's editable install would find a missing module in the worktree: none may come from there)
        "import cloud, cloud.autostop_daemon, cloud.provision, cloud.head_credentials, cloud.config, sys; "
        "elsewhere = [m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'cloud' "
        "and not m.__file__.startswith(sys.argv[1])]; "
        "assert not elsewhere, elsewhere"
    )
    r = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "lib")],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "lib")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_down_deletes_a_static_heads_restricted_key_and_role_once(sim, driver, tmp_path):
    """A static cluster whose head got its restricted key from `start` (for autostop): `down` names the key in
    what it would remove, deletes the instances, then the key and its role, once; nothing of the autoscaler."""
    from cloud import iam
    from tests.support import cli_env, make_cluster

    make_cluster(driver, "as-static", 2)
    iam.create_key(driver, "as-static", "ch-gva-2", sim.endpoint)  # as autostop_control.ensure_head_key makes it
    env = cli_env(sim, tmp_path)
    r = run_cli("exoscale.py", "--name", "as-static", "down", env=env)
    assert r.returncode == 2 and "the head's restricted API key and IAM role" in r.stderr, r.stderr
    r = run_cli("exoscale.py", "--name", "as-static", "down", "--yes", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    with sim.app.model.lock:
        assert list(sim.app.model.instances.values()) == []
    assert sim.app.model.iam.list_api_keys() == [] and sim.app.model.iam.list_roles() == []
    assert r.stderr.count("IAM role raysweep-as-static deleted") == 1 and "autoscaler" not in r.stderr, r.stderr
    r = run_cli("exoscale.py", "--name", "as-static", "down", "--yes", env=env)
    assert r.returncode == 0 and "nothing to remove" in r.stderr, r.stderr


def test_a_node_answers_when_an_ssh_server_greets_not_when_a_connection_is_only_accepted():
    """The check before a command: a deleted node's address may still accept TCP (a firewall or proxy on the
    way does, on this machine too), so only a greeting counts."""
    import threading

    from cloud import access

    def serve(greeting: bytes) -> tuple[socket.socket, int]:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def accept() -> None:
            conn, _ = srv.accept()
            conn.sendall(greeting)
            time.sleep(2)
            conn.close()

        threading.Thread(target=accept, daemon=True).start()
        return srv, srv.getsockname()[1]

    for greeting, want in ((b"SSH-2.0-OpenSSH_9.6\r\n", True), (b"", False)):
        srv, port = serve(greeting)
        with srv:
            assert access.answers("127.0.0.1", timeout=1.0, port=port) is want, greeting
    assert access.answers("127.0.0.1", timeout=1.0, port=free_port()) is False  # nothing listens


def test_commands_on_an_autostopped_cluster_say_so_at_once(sim, driver, tmp_path):
    """After an autostop (the instances deleted from the head; the group, SSH key and restricted key left for
    `down`) the commands that reach the nodes from the local state say so in one line and fail, instead of
    waiting for SSH; `autostop` (a question) says it too, and succeeds."""
    from cloud import access, iam, provision
    from cloud.state import ClusterState, NodeRecord, StateStore
    from tests.support import cli_env, make_cluster

    made = make_cluster(driver, "as-gone", 2)
    iam.create_key(driver, "as-gone", "ch-gva-2", sim.endpoint)  # as `start` made it for the daemon
    env = cli_env(sim, tmp_path)
    store = StateStore(tmp_path / "state" / "as-gone")
    store.ensure_key()
    # the local state `up` left, with an address where no SSH server answers, as at a deleted VM's
    if access.answers("127.0.0.1"):
        pytest.skip("an SSH server listens on 127.0.0.1:22, the address this test needs silent")
    records = [NodeRecord(n.name, n.extra["labels"]["role"], "127.0.0.1", n.id) for n in made]
    store.save(ClusterState("as-gone", records))
    store.record_autostop(120)  # as `start` recorded the setting it gave the head's daemon
    for n in made:  # as the head's daemon ends the cluster
        driver.destroy_node(n)
    assert provision.query_instances(driver, "as-gone") == []
    src = tmp_path / "f.txt"
    src.write_text("x")
    want = (
        "cluster 'as-gone': autostopped; run down to remove the rest (security group raysweep-as-gone, "
        "SSH key raysweep-as-gone, restricted API key and IAM role raysweep-as-gone)"
    )
    commands = [
        ["cmd", "true"],
        ["cmd", "--node", "1", "true"],
        ["ssh", "0", "true"],
        ["scp", str(src), "f.txt"],
        ["fetch", "results"],
        ["install"],
        ["start"],
        ["stop"],
        ["submit", "--", "true"],
        ["logs", "raysubmit_1"],
        ["dashboard"],
        ["autostop", "--minutes", "5"],
    ]
    for args in commands:
        r = run_cli("exoscale.py", "--name", "as-gone", *args, env=env, timeout=120)
        assert r.returncode != 0 and want in r.stderr, f"{args}: {r.stderr[-2000:]}"
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, f"{args}: {r.stderr[-2000:]}"
    r = run_cli("exoscale.py", "--name", "as-gone", "autostop", env=env, timeout=120)
    assert r.returncode == 0 and want in r.stdout, r.stdout + r.stderr


def test_systemd_unit_restarts_the_supervisor():
    unit = autostop.systemd_unit("/home/u/raysweep-env/bin/python", "/home/u/.raysweep/lib", "/home/u", "u")
    assert "ExecStart=/home/u/raysweep-env/bin/python -m cloud.autostop_daemon supervise" in unit
    assert "Restart=always" in unit and "User=u" in unit and "WantedBy=multi-user.target" in unit


# --------------------------------------------------------------------- the daemon's view of real Ray

DRIVER = textwrap.dedent(
    """
    import sys, time, ray
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=int(sys.argv[1]), logging_level="ERROR")

    @ray.remote
    def long():
        time.sleep(120)

    @ray.remote(num_cpus=0)
    class Holder:
        def ping(self):
            return 1

    @ray.remote
    def quick():
        return 1

    ray.get([quick.remote() for _ in range(3)])  # finished tasks: not activity
    t = long.remote()
    h = Holder.remote()
    ray.get(h.ping.remote())
    print("READY", flush=True)
    sys.stdin.read()
    """
)


def test_the_daemon_sees_tasks_actors_and_drivers_through_the_dashboard(tmp_path):
    """A real local Ray: a long task, an actor and a driver connected for longer than the grace window are
    seen through the dashboard's HTTP APIs alone (the daemon holds no Ray driver)."""
    from cloud.autostop_daemon import RayView

    port = free_port()
    # the dashboard's forkserver makes its socket directory (pymp-*) in TMPDIR and is killed with Ray, so that
    # directory stays: here, in the test's own directory; Ray's session directory stays where Ray puts it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": str(tmp_path), "RAY_TMPDIR": tempfile.gettempdir()}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()[-2000:]
        view = RayView(f"http://127.0.0.1:{port}", token_file=tmp_path / "no-token")
        deadline = time.monotonic() + 60
        while True:
            obs = Observation(time.time())
            try:
                members = view.observe(obs, grace_s=1.0)
            except OSError:
                members = set()
            if obs.tasks == 1 and obs.actors == 1 and any(j.startswith("driver ") for j in obs.jobs):
                break
            assert time.monotonic() < deadline, f"never saw exactly the running task, the actor and the driver: {obs}"
            time.sleep(1)
        assert members and all(socket.inet_aton(ip) for ip in members)
        obs = Observation(time.time())
        view.observe(obs, grace_s=3600)  # the same driver, counted as a short check under a long window
        assert not any(j.startswith("driver ") for j in obs.jobs)
        assert json.dumps(obs.activity())  # printable reasons
    finally:
        p.stdin.close()
        p.wait(60)
