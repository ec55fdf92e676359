"""exoscale.py's autoscaling clusters: `up --max-workers N` through Ray's own cluster launcher (`ray up` on
the YAML of cloud.ray_config, kept as `cluster.yaml` in the cluster's state directory), the autoscaler's
view for `status`, and what `down` does first: stop the autoscaler and revoke its key, so that nothing is
created while the cluster's instances are deleted by label, then delete the key's role.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from cloud import iam, ray_config
from cloud.access import answers
from cloud.config import ClusterConfig, ConfigError
from cloud.provision import cluster_yaml_path
from cloud.ray_runtime import node_command
from cloud.remote import Remote
from cloud.state import StateStore

log = logging.getLogger(__name__)
Progress = Callable[[str, str], None]


def ray_cli() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else "ray"


def check_endpoint_reachable_from_nodes(cfg: ClusterConfig) -> None:
    """The head's autoscaler calls the API at EXOSCALE_API_ENDPOINT: a loopback address cannot work there."""
    if not cfg.credentials.endpoint:
        return
    host = urlparse(cfg.credentials.endpoint).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        raise ConfigError(
            f"EXOSCALE_API_ENDPOINT {cfg.credentials.endpoint} is a loopback address, which the head's autoscaler cannot "
            f"reach; give an address the nodes reach too (for the local Exoscale: its bridge gateway)"
        )


def write_yaml(
    cfg: ClusterConfig, min_workers: int, max_workers: int, idle_minutes: float, packages: Sequence[str] = ()
) -> Path:
    """The cluster's YAML (cloud.ray_config), written to its state; ConfigError for a setting that cannot work."""
    check_endpoint_reachable_from_nodes(cfg)
    config = ray_config.build(cfg, min_workers, max_workers, idle_minutes, packages=packages)
    path = cluster_yaml_path(cfg.state_dir)
    path.write_text(ray_config.render(config))
    return path


def ray_up(path: Path, progress: Progress, timeout: float = 3600) -> int:
    """Run `ray up` on the YAML at `path`; Ray's output goes to `progress` line by line. Returns its exit code.
    Interrupted (Ctrl-C), it interrupts `ray up` too and waits for it to end (killing it after 30 s)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [ray_cli(), "up", str(path), "-y", "--no-config-cache"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.strip():
                progress("ray up", line.rstrip())
        return proc.wait(timeout)
    except BaseException:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    finally:
        proc.stdout.close()


#: a pending node in `ray status` (Ray 2.x's v2 formatter): its instance id, node type, and details (often none)
PENDING_NODE = re.compile(r"(?P<id>[^\s:]+): (?P<type>[^,]+),(?P<details>.*)")


def autoscaler_note(status_text: str) -> str | None:
    """The part of `ray status` a waiting user needs on one line: nodes being launched and the newest launch
    failure (a refused key, a quota, an instance type not authorized); None when neither is there. Idle
    terminations (`NodeTerminated`) are normal and not shown."""
    section = ""
    pending: list[str] = []
    starting: dict[tuple[str, str], int] = {}  # (node type, details): instances made, not yet in Ray
    failures: list[str] = []
    for raw in status_text.splitlines():
        line = raw.strip()
        if raw and not raw.startswith(" "):
            section = line
            continue
        if not line or line.startswith("("):
            continue
        if section == "Pending:":
            node = PENDING_NODE.fullmatch(line)
            if node:  # `<instance id>: <type>, <details>`: counted by type, the instance ids left out
                key = (node["type"], node["details"].strip())
                starting[key] = starting.get(key, 0) + 1
            else:  # `<type>, <n> launching`
                pending.append(line)
        elif section == "Recent failures:" and ": LaunchFailed" in line:
            failures.append(line)
    pending += [f"{kind}, {n} starting" + (f" ({why})" if why else "") for (kind, why), n in starting.items()]
    parts = []
    if pending:
        parts.append("; ".join(pending))
    if failures:  # Ray lists the newest first
        parts.append(f"launch failed: {failures[0]}")
    return "autoscaler: " + "; ".join(parts) if parts else None


def autoscaler_status(cfg: ClusterConfig) -> str:
    """`ray status` as the head answers it: the autoscaler's nodes (active, idle, pending) and failures."""
    store = StateStore(cfg.state_dir)
    st = store.load()
    head = st.head() if st else None
    if head is None:
        return "autoscaler: no head known (run `status` with credentials set)"
    remote = Remote(store.private_key(cfg.spec.ssh_key), store.known_hosts)
    [r] = remote.run([head], node_command("ray status", cfg), timeout=60)
    return r.stdout if r.ok else f"autoscaler: not answering ({r.error}; {r.stderr.strip()[-300:]})"


def stop_autoscaler(cfg: ClusterConfig, progress: Progress) -> None:
    """Stop Ray (and with it the autoscaler) on the head; best effort: the key is revoked next anyway."""
    store = StateStore(cfg.state_dir)
    st = store.load()
    head = st.head() if st else None
    if head is None:
        progress(cfg.name, "no head known locally; its autoscaler stops when its key is revoked")
        return
    if not head.ip or not answers(head.ip):  # gone (an autostop, say) or unreachable: no SSH timeout to wait for
        progress(
            head.name, "does not answer on SSH (gone, or unreachable); its autoscaler stops when its key is revoked"
        )
        return
    [r] = Remote(store.private_key(cfg.spec.ssh_key), store.known_hosts).run(
        [head],
        f"test -x $HOME/raysweep-env/bin/ray && ({node_command('ray stop --force', cfg)}) >/dev/null 2>&1; true",
        timeout=60,
    )
    progress(
        head.name, "autoscaler stopped" if r.ok else f"could not stop the autoscaler ({r.error}); revoking its key"
    )


def revoke_key(driver, cfg: ClusterConfig, progress: Progress) -> None:
    """Delete the cluster's restricted key(s): from now on the autoscaler cannot create anything."""
    for what in iam.delete_keys(driver, cfg.name):
        progress(cfg.name, f"{what} of the autoscaler revoked")


def after_down(driver, cfg: ClusterConfig, progress: Progress) -> list[str]:
    """Once the instances are gone: the key's role (and any key made since `revoke_key`), the local copy of the
    key and the cluster's YAML."""
    removed = iam.delete_cluster_iam(driver, cfg.name, cfg.state_dir)
    for what in removed:
        progress(cfg.name, f"{what} deleted")
    cluster_yaml_path(cfg.state_dir).unlink(missing_ok=True)
    return removed


def describe(cfg: ClusterConfig, nodes) -> str:
    kinds = sorted({n.extra["labels"].get("ray-user-node-type", "?") for n in nodes})
    return f"autoscaling cluster {cfg.name!r} ({', '.join(kinds) or 'no nodes'}); YAML: {shlex.quote(str(cluster_yaml_path(cfg.state_dir)))}"
