"""The one seam between `pipeline` and `cloud`: a Ray address for a cluster by name.

`pipeline` CLIs call `connect_cluster(NAME)` for `--cluster NAME` and nothing else of `cloud`:

    with connect_cluster("exp1") as conn:      # version check, SSH tunnel with a watchdog, token set
        ray.init(address=conn.address)
        ...
        why = conn.lost_reason()               # None, or why the head stopped answering
        conn.note()                            # autoscaling clusters: launches under way, a failed launch
        conn.node_prices()                     # each node's instance type and hourly rate, by IP (the API)

Call it before `import ray` where possible: Ray reads RAY_AUTH_MODE once, at import.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from cloud import config as config_mod
from cloud.config import ClusterConfig
from cloud.cost import TYPES_CACHE, type_names
from cloud.elastic import autoscaler_note
from cloud.pricing import PRICES_TAKEN
from cloud.provision import is_autoscaling, query_instances
from cloud.rate_cap import node_rate
from cloud.ray_auth import use_token_auth
from cloud.ray_runtime import CLIENT_PORT, node_command
from cloud.tunnel import Tunnel, open_tunnel

log = logging.getLogger(__name__)

#: how often the autoscaler's view is asked for while a sweep runs on an autoscaling cluster
NOTE_INTERVAL_S = 15.0


class ClusterConnection:
    """A `ray://` address that reaches a cluster's head through an SSH tunnel, open until `close()`."""

    def __init__(
        self,
        tunnel: Tunnel | None,
        address: str,
        ask_status: Callable[[], str | None] | None = None,
        prices: Callable[[], NodePrices] | None = None,
    ):
        self._tunnel = tunnel
        self.address = address
        self._prices = prices
        self._note: str | None = None
        self._stop = threading.Event()
        if ask_status is not None:
            threading.Thread(target=self._watch, args=(ask_status,), name="autoscaler-note", daemon=True).start()

    def _watch(self, ask_status: Callable[[], str | None]) -> None:
        while not self._stop.is_set():
            text = ask_status()
            if text is not None:  # a failed ask keeps the last view rather than blanking it
                self._note = autoscaler_note(text)
            self._stop.wait(NOTE_INTERVAL_S)

    def note(self) -> str | None:
        """On an autoscaling cluster, what its autoscaler is doing that a waiting user should see (nodes
        launching, the newest failed launch), refreshed every NOTE_INTERVAL_S; else None."""
        return self._note

    def node_prices(self) -> NodePrices:
        """What each of the cluster's nodes costs, as the API lists them now: plain data for pipeline.cost.
        NodePrices with no currency when there is no API to ask (no credentials in the environment)."""
        return self._prices() if self._prices is not None else NodePrices(None, "no API credentials", {})

    def lost_reason(self) -> str | None:
        """Why the connection broke, if the tunnel's watchdog saw the head stop answering; else None."""
        if self._tunnel is not None and self._tunnel.lost:
            return f"its head {self._tunnel.head.ip} stopped answering over SSH"
        return None

    def close(self) -> None:
        """Shut Ray's client down first (else it keeps trying to reconnect), then the tunnel."""
        import sys

        self._stop.set()

        if "ray" in sys.modules:
            import ray

            ray.shutdown()
        if self._tunnel is not None:
            self._tunnel.close()

    def __enter__(self) -> ClusterConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ClusterConnection({self.address!r})"


def connect_cluster(name: str, config_path: str | None = None) -> ClusterConnection:
    """Connect to cluster `name` (its local state, or `config_path`'s settings); raises with a one-line
    message when the cluster cannot be reached or its versions differ from this machine's."""
    use_token_auth()
    cfg = config_mod.load(config_path, require_credentials=False, name=name)
    tunnel, port = open_tunnel(cfg, lambda head: head.ip, CLIENT_PORT)
    ask = None
    if is_autoscaling(cfg.state_dir):
        status = node_command("ray status", cfg)

        def ask() -> str | None:
            return tunnel.run(status, timeout=30)

    prices = (lambda: node_prices(cfg)) if cfg.credentials.api_secret is not None else None
    return ClusterConnection(tunnel, f"ray://127.0.0.1:{port}", ask_status=ask, prices=prices)


@dataclass(frozen=True)
class NodePrices:
    """The cluster's nodes by IP: (instance type, hourly rate with its disk, None when the price is unknown), in
    `currency` (None: no prices at all); `source` says where the rates come from."""

    currency: str | None
    source: str
    nodes: dict[str, tuple[str, float | None]]


def node_prices(cfg: ClusterConfig) -> NodePrices:
    """One listing of the cluster's instances (and of the types, when an instance names its type by id alone)."""
    driver = cfg.driver()
    nodes = query_instances(driver, cfg.name)
    types = type_names(nodes, driver.ex_list_instance_types, cfg.state_dir.parent / TYPES_CACHE)
    prices = cfg.cost.prices
    out: dict[str, tuple[str, float | None]] = {}
    for n in nodes:
        rate = node_rate(prices, types[str(n.id)], int(n.extra.get("disk_size") or 0))
        for ip in n.public_ips:
            out[ip] = (types[str(n.id)], None if rate is None else float(rate))
    source = f"Exoscale's prices of {PRICES_TAKEN}" + (" with cluster.toml's [prices]" if prices.overridden else "")
    return NodePrices(prices.currency, source, out)
