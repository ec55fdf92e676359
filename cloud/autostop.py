"""Autostop: a cluster nobody uses ends itself, so a forgotten cluster cannot run up a bill.

This module is the pure core, shared by both sides and importing nothing of the project: the setting, the
decision, the parsing of what the head shows, the status file's format and the head's start command.
Where it runs is apart: the daemon on the head (cloud.autostop_daemon), the controls run from the user's
machine over SSH (cloud.autostop_control), and what an autostop leaves for `down` is found by the
provisioning core (cloud.provision.leftovers).

A daemon on the head (cloud.autostop_daemon) samples the cluster every few seconds and decides, with the
pure core below (observations in, decision out), whether it is busy. Activity is:
- a Ray job submitted through the job API that is pending or running (`exoscale.py submit`), or a driver
  connected for longer than the grace window (a sweep through the tunnel, a script run on the head);
- a Ray task or actor pending or running (driver tasks aside: a driver counts only as above);
- an SSH connection to the head from outside the cluster open for longer than the grace window
  (an `exoscale.py ssh` session, a `dashboard` or sweep tunnel, a long `cmd` or `install`).

Short checks are told apart by their age, not by a mark: a connection or driver counts once it has lived
longer than the grace window (3/4 of a unit: 45 s by default). `status`, `list-nodes`, `cmd`, `scp` and
`autostop --log` open their SSH connection (and, for `status`, a Ray driver on the head) for a few
seconds, so asking never resets the clock, and nothing has to mark itself: a plain `ssh` from another
machine or tool is judged the same way, and no client needs to cooperate. The daemon itself asks Ray over
HTTP (the dashboard's job and state APIs on 127.0.0.1): it holds no driver and opens no SSH connection,
so it is never its own activity.

After `minutes` x unit of idleness (unit 60 s; `RAYSWEEP_AUTOSTOP_UNIT_S` for tests) the daemon stops Ray,
deletes the workers, then the head, with the cluster's restricted key (cloud.head_credentials), never the
user's. What cannot be deleted from inside (the security group the head still uses, the SSH key, the
restricted key and its role) stays for the next `down`. Changing the setting resets the clock.

Files on the head (relative to the login home, all made by the toolkit):
    .raysweep/autostop.json         the setting: {"minutes": M, "unit_s": U} (0 = off)
    .raysweep/autostop-status.json  the daemon's last sample: decision, idle time, pid (rewritten each sample)
    .raysweep/autostop.log          the decisions, one line per change and each teardown step
    .raysweep/lib/cloud/            the toolkit's code the daemon runs (copied by `start`)
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DIR = ".raysweep"
SETTINGS = f"{DIR}/autostop.json"
STATUS = f"{DIR}/autostop-status.json"
LOG = f"{DIR}/autostop.log"
LIB = f"{DIR}/lib"
LOCK = f"{DIR}/autostop.lock"
DAEMON_LOCK = f"{DIR}/autostop-daemon.lock"
UNIT_ENV = "RAYSWEEP_AUTOSTOP_UNIT_S"
DEFAULT_MINUTES = 120
SERVICE = "raysweep-autostop.service"
STARTED = "RAYSWEEP_AUTOSTOP_STARTED"

ACTIVE_JOB_STATES = ("PENDING", "RUNNING")
DONE_TASK_STATES = ("FINISHED", "FAILED")


class AutostopError(Exception):
    pass


# ------------------------------------------------------------------------------------- the setting


@dataclass(frozen=True)
class Settings:
    minutes: float = DEFAULT_MINUTES  # 0 = off
    unit_s: float = 60.0  # seconds in a "minute": tests make minutes seconds

    @property
    def off(self) -> bool:
        return self.minutes <= 0

    @property
    def timeout_s(self) -> float:
        return self.minutes * self.unit_s

    @property
    def sample_s(self) -> float:
        """How often the daemon looks: 20 s for real minutes (as SkyPilot's skylet), a quarter unit in tests."""
        return min(20.0, max(0.5, self.unit_s / 4))

    @property
    def grace_s(self) -> float:
        """Connections and drivers younger than this are short checks, not activity (45 s for real minutes)."""
        return 0.75 * self.unit_s

    def to_json(self) -> str:
        return json.dumps({"minutes": self.minutes, "unit_s": self.unit_s})

    @classmethod
    def from_json(cls, text: str) -> Settings:
        d = json.loads(text)
        return cls(minutes=float(d["minutes"]), unit_s=float(d.get("unit_s", 60.0)))

    def describe(self) -> str:
        if self.off:
            return "off"
        unit = "" if self.unit_s == 60 else f" (unit {self.unit_s:g} s)"
        return f"after {self.minutes:g} idle minute(s){unit}"


def check_minutes(value: Any, what: str = "autostop minutes") -> float:
    """A number of minutes >= 0 (0 = off), or ValueError with one line naming what is valid."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise ValueError(f"{what} {value!r}: a number of minutes >= 0 (0 = off)")
    if value > 60 * 24 * 365:
        raise ValueError(f"{what} {value!r}: at most a year (525600); use 0 to turn autostop off")
    return float(value)


def unit_from_env(env: Mapping[str, str] | None = None) -> float:
    text = (os.environ if env is None else env).get(UNIT_ENV)
    if not text:
        return 60.0
    try:
        unit = float(text)
    except ValueError:
        unit = -1.0
    if not unit > 0:
        raise ValueError(f"{UNIT_ENV}={text!r}: a number of seconds > 0 (the length of an autostop minute)")
    return unit


# ---------------------------------------------------------------------------- observations, decision


@dataclass
class Observation:
    """One sample of the cluster, as the daemon saw it."""

    now: float
    ray_running: bool = True
    jobs: list[str] = field(default_factory=list)  # active submission jobs and long-lived drivers
    tasks: int = 0  # tasks pending or running
    actors: int = 0  # actors alive or pending
    ssh: list[str] = field(default_factory=list)  # long-lived SSH peers from outside the cluster
    error: str = ""  # Ray runs but could not be asked: nothing can be concluded

    def activity(self) -> list[str]:
        out = [f"job {j}" for j in self.jobs]
        if self.tasks:
            out.append(f"{self.tasks} task(s) pending or running")
        if self.actors:
            out.append(f"{self.actors} actor(s) alive")
        out += [f"SSH connection from {p}" for p in self.ssh]
        return out


@dataclass(frozen=True)
class Decision:
    action: str  # off | busy | idle | unknown | stop
    idle_s: float
    reason: str

    def line(self) -> str:
        return f"{self.action}: {self.reason}"


@dataclass
class Clock:
    """What the daemon remembers between samples (and across restarts, through its status file)."""

    last_active: float
    settings: Settings


def decide(clock: Clock, settings: Settings, obs: Observation) -> Decision:
    """The decision for one sample; updates `clock` (the last activity, the setting it was measured under)."""
    if settings != clock.settings:  # a new setting starts the count afresh
        clock.settings = settings
        clock.last_active = obs.now
    active = obs.activity()
    if settings.off:
        clock.last_active = obs.now
        return Decision("off", 0.0, "autostop is off" + (f" (busy: {'; '.join(active)})" if active else ""))
    if active:
        clock.last_active = obs.now
        return Decision("busy", 0.0, "; ".join(active))
    idle = max(0.0, obs.now - clock.last_active)
    if obs.error:  # Ray is up but did not answer: never stop a cluster that may be busy
        return Decision("unknown", idle, f"cannot tell whether Ray is busy ({obs.error}); not stopping")
    what = "Ray is not running" if not obs.ray_running else "no job, task, actor or SSH session"
    limit = settings.timeout_s
    if idle >= limit:
        return Decision("stop", idle, f"{what}; idle {idle:.0f} s >= {limit:g} s: tearing the cluster down")
    return Decision("idle", idle, f"{what}; idle {idle:.0f} s of {limit:g} s")


# ---------------------------------------------------------------------------------- SSH connections


@dataclass
class SessionTracker:
    """Ages of the SSH connections seen so far (by peer ip:port), to tell sessions from short checks."""

    first_seen: dict[str, float] = field(default_factory=dict)

    def long_lived(self, peers: Iterable[str], now: float, grace_s: float, members: Iterable[str] = ()) -> list[str]:
        """Connections from outside `members` open for at least `grace_s` (connections gone are forgotten)."""
        inside = set(members)
        current = {p for p in peers if p.rsplit(":", 1)[0] not in inside}
        self.first_seen = {p: self.first_seen.get(p, now) for p in current}
        return sorted(p for p, t in self.first_seen.items() if now - t >= grace_s)


# -------------------------------------------------------------------------------------- Ray's views


def active_jobs(jobs: Sequence[Mapping[str, Any]], now: float, grace_s: float) -> list[str]:
    """From the dashboard's /api/jobs/: submitted jobs pending or running, and drivers running for longer than
    the grace window (a short driver, like `status` asking Ray for its nodes, is not activity)."""
    out = []
    for j in jobs:
        status = j.get("status")
        if status not in ACTIVE_JOB_STATES:
            continue
        if j.get("type") == "SUBMISSION":
            out.append(f"{j.get('submission_id')} {status.lower()}")
        elif (start := j.get("start_time")) and now - start / 1000 >= grace_s:
            out.append(f"driver {j.get('job_id')} connected")
    return out


def state_api_query(filters: Sequence[tuple[str, str, str]], limit: int = 100) -> str:
    """The query string of a Ray state API list call (filters are ANDed)."""
    from urllib.parse import urlencode

    params: list[tuple[str, str | int]] = [("limit", limit)]
    for key, pred, value in filters:
        params += [("filter_keys", key), ("filter_predicates", pred), ("filter_values", value)]
    return urlencode(params)


TASKS_QUERY = state_api_query([("state", "!=", s) for s in DONE_TASK_STATES])
ACTORS_QUERY = state_api_query([("state", "!=", "DEAD")])


# ------------------------------------------------------------------------------- status on the head


@dataclass
class HeadStatus:
    """What the daemon last wrote: read by `status` and `autostop` on the user's machine."""

    time: float
    pid: int
    settings: Settings
    action: str
    idle_s: float
    reason: str
    last_active: float
    sessions: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["settings"] = asdict(self.settings)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> HeadStatus:
        d = json.loads(text)
        d["settings"] = Settings(**d["settings"])
        return cls(**d)


START_STATIC = "run `exoscale.py start`"


def describe(
    settings: Settings | None, status: HeadStatus | None, head_now: float | None, advice: str = START_STATIC
) -> str:
    """The `status` line: the setting, the idle time so far and the last decision; `advice` (`start_advice`)
    says how to start a missing daemon."""
    if settings is None:
        return f"autostop: not set up on the head ({advice})"
    text = f"autostop: {settings.describe()}"
    if status is None:
        return text + "; the daemon has not reported yet"
    age = (head_now - status.time) if head_now is not None else 0.0
    stale = age > 3 * status.settings.sample_s + 10
    if status.action in ("idle", "unknown", "stop"):
        text += f"; idle {_duration(status.idle_s + (age if not stale else 0))} so far"
    text += f"; last decision ({_duration(age)} ago): {status.action}: {status.reason}"
    if stale:
        text += f"; the daemon is not reporting (it restarts by itself within seconds; else {advice})"
    return text


def _duration(s: float) -> str:
    s = max(0, round(s))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


# ------------------------------------------------------------------------------- starting the daemon


def head_start_command(
    minutes: float | None = None, unit_s: float = 60.0, env_dir: str = "raysweep-env", lib: str = LIB
) -> str:
    """The shell command (one line), run on the head as the login user after Ray starts, that starts the
    autostop daemon: writes the setting when the head has none yet (`minutes`; None leaves it alone), then
    `python -m cloud.autostop_daemon launch` (a systemd unit where systemd is PID 1, else a detached
    supervisor; see there). The toolkit's code must be in ~/`lib` (`ship_code`, or `ray up`'s file mounts),
    its Python environment in ~/`env_dir`. Idempotent: a running supervisor is kept."""
    cmd = f"mkdir -p -m 700 $HOME/{DIR}"
    if minutes is not None:
        s = Settings(check_minutes(minutes), unit_s)
        cmd += f" && {{ [ -f $HOME/{SETTINGS} ] || printf '%s' {shlex.quote(s.to_json())} > $HOME/{SETTINGS}; }}"
    return f"{cmd} && PYTHONPATH=$HOME/{lib} $HOME/{env_dir}/bin/python -m cloud.autostop_daemon launch"


def systemd_unit(python: str, lib: str, home: str, user: str) -> str:
    """The unit a head with systemd runs the supervisor as: restarted if it dies, started again after a reboot
    (where, Ray not running, the daemon finds the cluster idle and ends it after the setting)."""
    return (
        "[Unit]\n"
        "Description=raysweep autostop: tear the cluster down after its idle minutes\n"
        "After=network-online.target\n\n"
        "[Service]\n"
        f"User={user}\n"
        f"WorkingDirectory={home}\n"
        f"Environment=PYTHONPATH={lib} HOME={home}\n"
        f"ExecStart={python} -m cloud.autostop_daemon supervise\n"
        "Restart=always\n"
        "RestartSec=5\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def parse_head(out: str) -> tuple[Settings | None, HeadStatus | None, float | None]:
    now: float | None = None
    files: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("RAYSWEEP_NOW "):
            try:
                now = float(line.split()[1])
            except (IndexError, ValueError):
                now = None
        elif line.startswith("RAYSWEEP_FILE "):
            current = line.split(" ", 1)[1]
            files[current] = ""
        elif current is not None:
            files[current] += line
    settings = status = None
    try:
        settings = Settings.from_json(files[SETTINGS]) if files.get(SETTINGS) else None
    except (ValueError, KeyError, TypeError):
        settings = None
    try:
        status = HeadStatus.from_json(files[STATUS]) if files.get(STATUS) else None
    except (ValueError, KeyError, TypeError):
        status = None
    return settings, status, now
