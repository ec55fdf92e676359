"""The one way commands reach a cluster's nodes: its nodes from the local state, or from the API when
that is missing and credentials are set, and SSH access with the cluster's key and pinned host keys.

A cluster that ended itself (autostop: its instances deleted from the head) still has its local state;
with credentials set, `connect` notices when the head's SSH server does not greet (3 s at most) and asks
the API, so a command says "autostopped" at once instead of waiting for SSH. A live cluster costs one
short connection to the head, no API call."""

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


class Autostopped(AccessError):
    """The cluster ended itself; what it left for `down` is named in the message."""


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
        if cfg.api_secret is None:
            raise AccessError(
                f"no local state for cluster {cfg.name!r} in {store.dir}; set EXOSCALE_API_KEY/"
                f"EXOSCALE_API_SECRET to look it up, or run `exoscale.py up` first"
            )
        st = provision.status(cfg.driver(), cfg)
        if not st.nodes:
            refuse_autostopped(cfg)
    if not st.nodes:
        raise AccessError(f"cluster {cfg.name!r} has no nodes; run `exoscale.py up` first")
    return st


def refuse_autostopped(cfg: ClusterConfig) -> None:
    """Raise Autostopped when the API shows the cluster ended itself (no instances, its rest left for `down`)."""
    rest = provision.leftovers(cfg.driver(), cfg.name)
    if rest:
        raise Autostopped(autostopped_message(cfg.name, rest))


def autostopped_message(cluster: str, rest: list[str]) -> str:
    return f"cluster {cluster!r}: autostopped; run down to remove the rest ({', '.join(rest)})"


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
    if cfg.api_secret is not None:  # without credentials nothing can tell an autostop from a network fault
        first = st.head() or st.ordered()[0]
        if not first.ip or not answers(first.ip):
            refuse_autostopped(cfg)
    store = StateStore(cfg.state_dir)
    return ClusterAccess(Remote(store.private_key(cfg.ssh_key), store.known_hosts), st, store)
