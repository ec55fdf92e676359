"""The one way commands reach a cluster's nodes: its nodes from the local state, or from the API when
that is missing and credentials are set, and SSH access with the cluster's key and pinned host keys."""

from __future__ import annotations

from dataclasses import dataclass

from cloud.config import ClusterConfig
from cloud.remote import Remote
from cloud.state import ClusterState, StateStore


class AccessError(Exception):
    """No nodes known for the cluster: one line saying where we looked and what to do."""


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
        from cloud import provision

        st = provision.status(cfg.driver(), cfg)
    if not st.nodes:
        raise AccessError(f"cluster {cfg.name!r} has no nodes; run `exoscale.py up` first")
    return st


def connect(cfg: ClusterConfig) -> ClusterAccess:
    """The cluster's nodes and SSH access to them."""
    st = cluster_state(cfg)
    store = StateStore(cfg.state_dir)
    return ClusterAccess(Remote(store.private_key(cfg.ssh_key), store.known_hosts), st, store)
