"""Autostop's controls, run on the user's machine over SSH: start (or keep) the daemon on the head with its
restricted key, change the setting, read the daemon's state and log. The decision core and the formats are
cloud.autostop; the daemon itself is cloud.autostop_daemon, on the head."""

from __future__ import annotations

import logging
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path

from cloud import autostop, head_credentials, iam, provision
from cloud.autostop import AutostopError, HeadStatus, Settings
from cloud.config import ClusterConfig
from cloud.names import resource_name
from cloud.remote import Remote
from cloud.retry import Wait, retry
from cloud.state import NodeRecord, StateStore

log = logging.getLogger(__name__)
KEY_TIMEOUT_S = 120.0  # how long a failing IAM operation is tried again when the head's key is made


def start_advice(cfg: ClusterConfig) -> str:
    """How to (re)start the daemon on this kind of cluster: `start` launches it on a static cluster; on one
    made by `ray up` (`up --max-workers`, or a `ray-config` YAML) the YAML's head start commands do."""
    if provision.cluster_yaml_path(cfg.state_dir).exists():
        return "run `exoscale.py up --max-workers N` again: the head's start commands in its YAML start it"
    if provision.is_autoscaling(cfg.state_dir):
        return "run `ray up` on its YAML again: the head's start commands there start it"
    return autostop.START_STATIC


CODE_FILES = (
    *("__init__.py", "autostop.py", "autostop_daemon.py", "config.py", "exoscale_driver.py", "fanout.py"),
    *("head_credentials.py", "iam.py", "names.py", "pools.py", "pricing.py", "provision.py", "rate_cap.py"),
    *("retry.py", "state.py"),
)


def ship_code(remote: Remote, head: NodeRecord) -> None:
    """Copy the modules the daemon needs (not the sim, not the laptop's SSH layer) to ~/LIB/cloud on the head."""
    src = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "cloud"
        pkg.mkdir()
        for name in CODE_FILES:
            (pkg / name).write_bytes((src / name).read_bytes())
        [r] = remote.put([head], pkg, f"{autostop.LIB}/cloud")
    if not r.ok:
        raise AutostopError(f"could not copy the autostop daemon to the head {head.name}: {r.error}")


def launch(cfg: ClusterConfig, remote: Remote, head: NodeRecord, progress: Callable[[str, str], None]) -> bool:
    """Start (or keep) the autostop daemon on the head: what `start` calls once Ray runs there. A failure is
    reported (progress line, warning), not raised: Ray runs, and `status` shows the daemon missing."""
    try:
        key_note = ensure_head_key(cfg, remote, head)
        ship_code(remote, head)
        cmd = autostop.head_start_command(cfg.autostop_minutes, autostop.unit_from_env())
        [r] = remote.run([head], cmd, timeout=60)
        if not r.ok or autostop.STARTED not in r.stdout:
            raise AutostopError(f"{r.stderr.strip()[-300:] or r.error}")
        settings, _status, _now = read_head(remote, head)
        if settings is not None:  # what tells an autostop from a deletion once the head is gone
            StateStore(cfg.state_dir).record_autostop(settings.minutes)
    except Exception as e:  # the daemon is an addition to a running Ray: report, never undo the start
        log.warning("the autostop daemon did not start on %s: %s: %s", head.name, type(e).__name__, e)
        progress(head.name, f"autostop FAILED to start: {e}")
        return False
    progress(head.name, f"autostop daemon running: {settings.describe() if settings else 'no setting'}; {key_note}")
    return True


def ensure_head_key(cfg: ClusterConfig, remote: Remote, head: NodeRecord) -> str:
    """The cluster's restricted key on the head (what the daemon tears down with): kept when the head has one,
    else made with the user's key (cloud.iam, named raysweep-NAME, removed by `down`) and copied there, 0600.
    With the user's key at hand, the key's role is (re)set to cloud.iam.static_head_policy: the cluster's
    instances as they are now, from the head's address. No copy stays on this machine (a local copy in the
    state's `head/` marks a cluster of `ray up`)."""
    [r] = remote.run([head], f"test -s $HOME/{head_credentials.HEAD_PATH} && echo RAYSWEEP_HAS_KEY", timeout=30)
    has_key = "RAYSWEEP_HAS_KEY" in r.stdout
    if cfg.credentials.api_secret is None:
        if has_key:
            return "the head has its restricted key"
        raise AutostopError(
            "the head has no restricted key to tear the cluster down with; set EXOSCALE_API_KEY/EXOSCALE_API_SECRET "
            "and run `start` again"
        )
    driver = cfg.driver()
    ids = [str(n.id) for n in provision.query_instances(driver, cfg.name)]
    policy = iam.static_head_policy(ids, head.ip, cfg.zone)
    if has_key:
        retry(
            f"narrowing the head's restricted key {resource_name(cfg.name)} to the cluster's instances",
            lambda: iam.ensure_role(driver, cfg.name, policy),
            Wait(KEY_TIMEOUT_S),
            lambda name, what: log.warning("%s: %s", name, what),
        )
        return "the head has its restricted key"
    creds = retry(
        f"making the head's restricted key {resource_name(cfg.name)}",
        lambda: iam.create_key(driver, cfg.name, cfg.zone, cfg.credentials.endpoint, policy),
        Wait(KEY_TIMEOUT_S),
        lambda name, what: log.warning("%s: %s", name, what),
    )
    with tempfile.TemporaryDirectory() as tmp:  # 0700; the file itself is written 0600
        local = head_credentials.write(Path(tmp) / Path(head_credentials.HEAD_PATH).name, creds)
        [r] = remote.put([head], local, head_credentials.HEAD_PATH, private=True)
    if not r.ok:
        raise AutostopError(f"could not copy the restricted key to {head.name}: {r.error}")
    return f"restricted key {resource_name(cfg.name)} made for it"


def write_setting(remote: Remote, head: NodeRecord, minutes: float, unit_s: float) -> Settings:
    """Replace the head's setting (the daemon reads it each sample; a change restarts the idle count)."""
    s = autostop.Settings(autostop.check_minutes(minutes), unit_s)
    tmp = f"$HOME/{autostop.SETTINGS}.tmp$$"
    [r] = remote.run(
        [head],
        f"mkdir -p -m 700 $HOME/{autostop.DIR} && printf '%s' {shlex.quote(s.to_json())} > {tmp} && mv {tmp} $HOME/{autostop.SETTINGS}",
        timeout=60,
    )
    if not r.ok:
        raise AutostopError(f"could not change the autostop setting on {head.name}: {r.stderr.strip() or r.error}")
    return s


_READ = (
    f"cd $HOME && echo RAYSWEEP_NOW $(date +%s.%N) && "
    f"for f in {autostop.SETTINGS} {autostop.STATUS}; do echo RAYSWEEP_FILE $f; cat $f 2>/dev/null; echo; done"
)


def read_head(remote: Remote, head: NodeRecord) -> tuple[Settings | None, HeadStatus | None, float | None]:
    """(setting, the daemon's last status, the head's clock) read over one short SSH command."""
    [r] = remote.run([head], _READ, timeout=30)
    if not r.ok:
        raise AutostopError(f"cannot read the autostop state on {head.name}: {r.error}")
    return autostop.parse_head(r.stdout)


def read_log(remote: Remote, head: NodeRecord, lines: int = 200) -> str:
    [r] = remote.run([head], f"tail -n {int(lines)} $HOME/{autostop.LOG} 2>/dev/null || true", timeout=30)
    if not r.ok:
        raise AutostopError(f"cannot read the autostop log on {head.name}: {r.error}")
    return r.stdout
