"""The one way commands reach a cluster's nodes: its nodes from the local state, or from the API when
that is missing and credentials are set, and SSH access with the cluster's key and pinned host keys.

A cluster that ended itself (autostop: its instances deleted from the head) still has its local state;
with credentials set, `connect` notices when the head's SSH server does not greet (3 s at most) and asks
the API, so a command says at once that the instances are gone instead of waiting for SSH. It says
"autostopped" only when the cluster's autostop record (the setting last given to the head from this
machine, StateStore.autostop_record) says autostop was on; otherwise it names the instances missing and
why it cannot call that an autostop. A live cluster costs one short connection to the head, no API call."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from cloud import provision
from cloud.config import ClusterConfig
from cloud.remote import Remote
from cloud.state import ClusterState, StateStore

PROBE_TIMEOUT_S = 3.0  # a running node's sshd greets well within a second from anywhere


class AccessError(Exception):
    """No nodes known for the cluster: one line saying where we looked and what to do."""


class Gone(AccessError):
    """The cluster's instances are gone and the rest is left for `down`; the message names both."""


class Autostopped(Gone):
    """The cluster ended itself (its autostop record says autostop was on); what it left is named."""


@dataclass
class ClusterAccess:
    remote: Remote
    state: ClusterState
    store: StateStore


def cluster_state(cfg: ClusterConfig) -> ClusterState:
    """The cached state, refreshed from the API when there is none and credentials are set."""
    store = StateStore(cfg.state_dir)
    st = store.load()
    if st is None or not st.nodes:
        if cfg.credentials.api_secret is None:
            raise AccessError(
                f"no local state for cluster {cfg.name!r} in {store.dir}; set EXOSCALE_API_KEY/"
                f"EXOSCALE_API_SECRET to look it up, or run `exoscale.py up` first"
            )
        st = provision.status(cfg.driver(), cfg.spec)
        if not st.nodes:
            refuse_gone(cfg)
    if not st.nodes:
        raise AccessError(f"cluster {cfg.name!r} has no nodes; run `exoscale.py up` first")
    return st


def refuse_gone(cfg: ClusterConfig) -> None:
    """Raise Gone (Autostopped when the record says so) when the API shows no instances of the cluster but
    its security group, SSH key or restricted key left for `down`."""
    rest = provision.leftovers(cfg.driver(), cfg.name)
    if rest:
        text, autostopped = gone_message(cfg, rest)
        raise (Autostopped if autostopped else Gone)(text)


def gone_message(cfg: ClusterConfig, rest: list[str]) -> tuple[str, bool]:
    """The line for a cluster with no instances and `rest` left, and whether it calls that an autostop: only
    when the autostop record says autostop was on. Otherwise the line names the instances missing (from the
    local state) and what is not known."""
    store = StateStore(cfg.state_dir)
    tail = f"run down to remove the rest ({', '.join(rest)})"
    minutes = store.autostop_record()
    if minutes is not None and minutes > 0:
        return f"cluster {cfg.name!r}: autostopped; {tail}", True
    st = store.load()
    nodes = st.ordered() if st else []
    heads = [n.name for n in nodes if n.role == "head"]
    workers = [n.name for n in nodes if n.role != "head"]
    missing = " and ".join(
        [f"its head {heads[0]}"] * bool(heads) + [f"{len(workers)} worker(s) ({', '.join(workers)})"] * bool(workers)
    )
    if minutes == 0:
        why = "autostop is off, so not by an autostop: deleted outside raysweep?"
    else:
        why = "no autostop record here, so not known to be an autostop"
    return f"cluster {cfg.name!r}: {missing or 'its instances'} no longer exist ({why}); {tail}", False


def answers(ip: str, timeout: float = PROBE_TIMEOUT_S, port: int = 22) -> bool:
    """Whether an SSH server at `ip`:`port` sends its greeting within `timeout` seconds. The greeting, not the
    TCP handshake alone: a firewall or proxy on the way may accept connections to any address."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            return bool(s.recv(64))
    except OSError:
        return False


def connect(cfg: ClusterConfig) -> ClusterAccess:
    """The cluster's nodes and SSH access to them; Autostopped when the cluster ended itself."""
    st = cluster_state(cfg)
    if cfg.credentials.api_secret is not None:  # without credentials nothing can tell an autostop from a network fault
        first = st.head() or st.ordered()[0]
        if not first.ip or not answers(first.ip):
            refuse_gone(cfg)
    store = StateStore(cfg.state_dir)
    return ClusterAccess(Remote(store.private_key(cfg.spec.ssh_key), store.known_hosts), st, store)
