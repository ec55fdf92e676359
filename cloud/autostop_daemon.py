"""The autostop daemon on the head: samples the cluster, decides with cloud.autostop, logs, tears down.

    python -m cloud.autostop_daemon launch      starts `supervise` as a systemd unit where systemd is PID 1,
                                                else detached from the SSH session; returns at once
    python -m cloud.autostop_daemon supervise   runs `run` in a child and starts it again when it dies
    python -m cloud.autostop_daemon run         the sampling loop (one at a time: it takes a lock)

Run from ~/.raysweep/lib on the head with the node's Python environment (which has libcloud and
Exoscale's signer). It asks Ray only over HTTP (the dashboard on 127.0.0.1: job API, state API), reads SSH
connections from /proc/net/tcp, and calls the Exoscale API only with the cluster's restricted key
(~/.raysweep/head-credentials.json). Its state survives its own restart through the status file, so
killing it does not postpone a due stop.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cloud import autostop, head_credentials, provision
from cloud.autostop import Clock, Decision, HeadStatus, Observation, SessionTracker, Settings
from cloud.config import driver_for
from cloud.exoscale_driver import ExoscaleAPIError
from cloud.fanout import parallel_map

log = logging.getLogger("cloud.autostop")

DASHBOARD = "http://127.0.0.1:8265"


# ------------------------------------------------------------------------- SSH connections (/proc)


def _hex_ip(text: str) -> str:
    """An address of /proc/net/tcp{,6} ("0100007F", or 32 hex digits for IPv6) as text; IPv4 for v4-mapped."""
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]  # each 32-bit word is in host (little-endian) order
    addr = b"".join(words)
    if addr[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in addr[12:])
    return str(ipaddress.IPv6Address(addr))


def inbound_connections(proc_net_tcp: str, port: int = 22) -> set[str]:
    """Established connections to local `port` in a /proc/net/tcp (or tcp6) table, as "ip:port" of the peer."""
    peers = set()
    for line in proc_net_tcp.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4 or parts[3] != "01":  # 01 = ESTABLISHED
            continue
        local, remote = parts[1], parts[2]
        if int(local.rsplit(":", 1)[1], 16) != port:
            continue
        rip, rport = remote.rsplit(":", 1)
        peers.add(f"{_hex_ip(rip)}:{int(rport, 16)}")
    return peers


class Head:
    """The files of the head's login home the daemon uses."""

    def __init__(self, home: Path | None = None):
        self.home = home or Path.home()

    def path(self, rel: str) -> Path:
        return self.home / rel

    def settings(self, previous: Settings | None) -> Settings:
        try:
            return Settings.from_json(self.path(autostop.SETTINGS).read_text())
        except FileNotFoundError:
            return Settings()
        except (ValueError, KeyError, TypeError) as e:
            log.warning("unreadable %s (%s); keeping the previous setting", autostop.SETTINGS, e)
            return previous or Settings()

    def status(self) -> HeadStatus | None:
        try:
            return HeadStatus.from_json(self.path(autostop.STATUS).read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_status(self, st: HeadStatus) -> None:
        path = self.path(autostop.STATUS)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(st.to_json())
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------ observation


def gcs_running() -> bool:
    """Whether Ray's GCS runs on this machine (under any user): without it no Ray work can exist."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "gcs_server":
                    return True
            except OSError:
                continue
    return False


class RayView:
    """Ray's own view, through the dashboard's HTTP APIs on the head (token auth when Ray has a token)."""

    def __init__(self, url: str = DASHBOARD, token_file: Path | None = None, timeout: float = 10.0):
        self.url, self.timeout = url, timeout
        self.token_file = token_file or Path.home() / ".ray" / "auth_token"

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path)
        try:
            token = self.token_file.read_text().strip()
        except OSError:
            token = ""
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())

    def listing(self, path: str) -> list[dict]:
        """The rows of a state API list call (/api/v0/...)."""
        reply = self.get(path)
        if not reply.get("result", True):
            raise RuntimeError(f"{path.split('?')[0]}: {reply.get('msg', 'refused')}")
        return reply["data"]["result"]["result"]

    def observe(self, obs: Observation, grace_s: float) -> set[str]:
        """Fill `obs` with jobs, tasks and actors; return the cluster members' addresses."""
        obs.jobs = autostop.active_jobs(self.get("/api/jobs/"), obs.now, grace_s)
        obs.tasks = len(self.listing("/api/v0/tasks?" + autostop.TASKS_QUERY))
        obs.actors = len(self.listing("/api/v0/actors?" + autostop.ACTORS_QUERY))
        return {n["node_ip"] for n in self.listing("/api/v0/nodes?limit=1000") if n.get("node_ip")}


def ssh_peers() -> set[str]:
    peers: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            peers |= inbound_connections(Path(table).read_text())
        except OSError:
            continue
    return peers


def observe(view: RayView, tracker: SessionTracker, settings: Settings, now: float) -> Observation:
    obs = Observation(now)
    members = {"127.0.0.1", "::1"}
    obs.ray_running = gcs_running()
    if obs.ray_running:
        try:
            members |= view.observe(obs, settings.grace_s)
        except Exception as e:
            obs.error = f"{type(e).__name__}: {str(e)[:200]}"
    obs.ssh = tracker.long_lived(ssh_peers(), now, settings.grace_s, members)
    return obs


# -------------------------------------------------------------------------------------- teardown


def teardown(head: Head, say) -> None:
    """Stop Ray, delete the workers, then the head (this machine), with the cluster's restricted key.
    Raises when something could not be deleted (the daemon tries again at its next sample)."""
    creds = head_credentials.read(head.path(head_credentials.HEAD_PATH))
    say("stopping Ray on the head")
    ray = Path(sys.executable).parent / "ray"
    if ray.exists():
        subprocess.run(
            [str(ray), "stop", "--force"],
            env={**os.environ, "RAY_AUTH_MODE": "token"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
    driver = driver_for(creds.key, creds.secret, creds.zone, creds.endpoint)
    if creds.pools:  # an autoscaling cluster's head: its key may scale its pools and delete only itself
        _teardown_pools(driver, creds, say)
        return
    nodes = provision.query_instances(driver, creds.cluster)
    workers = [n for n in nodes if n.extra["labels"].get("role") != "head"]
    heads = [n for n in nodes if n.extra["labels"].get("role") == "head"]
    if workers:
        say(f"deleting {len(workers)} worker(s): {', '.join(sorted(n.name for n in workers))}")
        errors = [e for e in parallel_map(lambda n: provision.destroy_instance(driver, n), workers, 16) if e]
        if errors:
            raise autostop.AutostopError(f"could not delete every worker: {'; '.join(errors)}")
        say("workers deleted")
    for n in heads:
        say(
            f"deleting the head {n.name} (this machine); left for `down`: the security group, the SSH key "
            f"and the restricted API key"
        )
        err = provision.destroy_instance(driver, n)
        if err:
            raise autostop.AutostopError(f"could not delete the head {n.name}: {err}")
    say("nothing of the cluster's instances left")


def _teardown_pools(driver, creds: head_credentials.HeadCredentials, say) -> None:
    """The workers by scaling each pool to 0 (the pools stay for `down`), then the head by its id."""
    for node_type, pid in sorted(creds.pools.items()):
        try:
            pool = driver.ex_get_instance_pool(pid)
        except ExoscaleAPIError as e:
            if e.code == 404:
                continue
            raise autostop.AutostopError(f"could not read instance pool {pid}: {e}") from None
        if pool.size or pool.node_ids:
            say(f"scaling instance pool {pool.name} ({node_type}) from {pool.size} to 0")
            driver.ex_scale_instance_pool(pid, 0)
    say("workers deleted")
    if creds.head_id:
        say(
            "deleting the head (this machine); left for `down`: the instance pools, the security group, the SSH "
            "key and the restricted API key"
        )
        err = provision.destroy_instance(driver, creds.head_id)
        if err:
            raise autostop.AutostopError(f"could not delete the head {creds.head_id}: {err}")
    say("nothing of the cluster's instances left")


# ------------------------------------------------------------------------------------------ loop


def _lock(path: Path, wait: bool):
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        f.close()
        return None
    return f


def _log_to(head: Head) -> None:
    handler = logging.FileHandler(head.path(autostop.LOG))
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _worth_logging(prev: Decision | None, d: Decision) -> bool:
    """One line per change: a new action, or a busy/unknown with another reason (idle seconds do not count)."""
    if prev is None or prev.action != d.action:
        return True
    return d.action in ("busy", "unknown") and prev.reason != d.reason


def run(head: Head | None = None, view: RayView | None = None, clock=time.time) -> None:
    head = head or Head()
    view = view or RayView(token_file=head.path(".ray/auth_token"))
    lock = _lock(head.path(autostop.DAEMON_LOCK), wait=True)  # a second daemon waits for the first to end
    _log_to(head)
    prev_status = head.status()
    now = clock()
    settings = head.settings(None)
    if prev_status is not None:  # a restart continues the count (and the SSH sessions' ages)
        state = Clock(min(prev_status.last_active, now), prev_status.settings)
        tracker = SessionTracker(dict(prev_status.sessions))
    else:
        state, tracker = Clock(now, settings), SessionTracker()
    log.info("daemon started (pid %d): %s", os.getpid(), settings.describe())
    last: Decision | None = None
    while True:
        settings = head.settings(settings)
        obs = observe(view, tracker, settings, clock())
        d = decide_and_report(head, state, settings, obs, tracker)
        if _worth_logging(last, d):
            log.info("%s", d.line())
        last = d
        if d.action == "stop":
            try:
                teardown(head, _reporter(head, d, state, settings, obs.now, tracker))
                break  # (on a real head, deleting it has ended this process already)
            except Exception as e:
                log.error("stop failed: %s: %s; trying again", type(e).__name__, str(e)[:500])
                time.sleep(max(settings.sample_s, 5.0))
        time.sleep(settings.sample_s)
    lock.close()


def _reporter(head: Head, d: Decision, state: Clock, settings: Settings, now: float, tracker: SessionTracker):
    """The teardown's voice: each step to the log and into the status file."""

    def say(what: str) -> None:
        log.info("stop: %s", what)
        head.write_status(_status(Decision("stop", d.idle_s, what), state, settings, now, tracker))

    return say


def _status(d: Decision, state: Clock, settings: Settings, now: float, tracker: SessionTracker) -> HeadStatus:
    return HeadStatus(now, os.getpid(), settings, d.action, d.idle_s, d.reason, state.last_active, tracker.first_seen)


def decide_and_report(
    head: Head, state: Clock, settings: Settings, obs: Observation, tracker: SessionTracker
) -> Decision:
    d = autostop.decide(state, settings, obs)
    head.write_status(_status(d, state, settings, obs.now, tracker))
    return d


def supervise(head: Head | None = None) -> int:
    """Run the daemon in a child process and start it again whenever it ends (one supervisor per head)."""
    head = head or Head()
    lock = _lock(head.path(autostop.LOCK), wait=False)
    if lock is None:
        print("autostop supervisor already running", file=sys.stderr)
        return 0
    child: subprocess.Popen | None = None

    def stop(*_):
        if child is not None and child.poll() is None:
            child.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        child = subprocess.Popen([sys.executable, "-m", "cloud.autostop_daemon", "run"], stdin=subprocess.DEVNULL)
        rc = child.wait()
        with open(head.path(autostop.LOG), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} daemon ended (exit {rc}); starting it again\n")
        time.sleep(1.0)


def launch(head: Head | None = None) -> int:
    """Start the supervisor and return: as the systemd unit SERVICE where systemd is this machine's PID 1 and
    sudo works without a password (restarted if it dies, started again after a reboot), else in a session of
    its own (setsid), so that it outlives the SSH connection that started it. A namespace host sees its
    parent's /run but has its own PID 1, hence the test on PID 1 rather than on /run/systemd."""
    head = head or Head()
    try:
        pid1 = Path("/proc/1/comm").read_text().strip()
    except OSError:
        pid1 = ""
    lib = os.environ.get("PYTHONPATH", str(head.path(autostop.LIB)))
    if pid1 == "systemd" and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        unit = autostop.systemd_unit(sys.executable, lib, str(head.home), os.environ.get("USER") or _user())
        steps = [
            (["sudo", "-n", "tee", f"/etc/systemd/system/{autostop.SERVICE}"], unit),
            (["sudo", "-n", "systemctl", "daemon-reload"], None),
            (["sudo", "-n", "systemctl", "enable", "--now", autostop.SERVICE], None),
        ]
        for argv, text in steps:
            r = subprocess.run(argv, input=text, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{' '.join(argv)} failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
                return 1
    else:
        out = open(head.path(f"{autostop.DIR}/autostop-supervisor.out"), "ab")
        subprocess.Popen(
            [sys.executable, "-m", "cloud.autostop_daemon", "supervise"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": lib},
        )
    print(autostop.STARTED)
    return 0


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["run"]:
        run()
        return 0
    if args == ["supervise"]:
        return supervise()
    if args == ["launch"]:
        return launch()
    print("usage: python -m cloud.autostop_daemon run|supervise|launch", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
