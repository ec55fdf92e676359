"""The one way to put a local Exoscale together: state model, optional namespace hosts (and what they are
offered instead of the internet), request pipeline and HTTP server. Used by `python -m cloud.sim`, the tests
and the benchmarks alike.

With hosts, the API listens on the hosts' bridge gateway (and on `host`, loopback by default) and its
endpoint is the gateway URL, so one EXOSCALE_API_ENDPOINT works from this machine and from the hosts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.sim.model import Faults, Model
from cloud.sim.server import App, HTTPFaults, SimServer

if TYPE_CHECKING:
    from cloud.sim.hosts import HostHooks
    from cloud.sim.offer import HostOffer

log = logging.getLogger(__name__)


def client_env(endpoint: str, key: str, secret: str, state_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The environment a client of a local Exoscale runs with (exoscale.py, make cluster-up, a sweep's
    --cluster), as it would with Exoscale: the API endpoint, the account's key pair and, given `state_dir`,
    where the clusters' local state goes (RAYSWEEP_STATE_DIR). Only these variables: a caller starting a
    process adds them to its own environment."""
    env = {"EXOSCALE_API_KEY": key, "EXOSCALE_API_SECRET": secret, "EXOSCALE_API_ENDPOINT": endpoint}
    if state_dir is not None:
        env["RAYSWEEP_STATE_DIR"] = os.fspath(state_dir)
    return env


def cluster_toml(path: Path, name: str, *settings: str, **extra: object) -> Path:
    """Write a cluster.toml for a cluster on the local Exoscale's hosts, as the tests and the benchmarks run
    one: one Ray CPU a node (the hosts share this machine's cores), SSH open to 0.0.0.0/0 said explicitly (the
    default, of which `up` warns otherwise; the hosts see this machine as the bridge's gateway), Ray's health
    checks within seconds (a stopped host is noticed at once). `settings`: more lines, verbatim; `extra`:
    `KEY = VALUE` lines (VALUE in TOML)."""
    lines = [
        f'name = "{name}"',
        *settings,
        "ray_cpus = 1",
        'ssh_cidr = "0.0.0.0/0"',
        'ray_env = { RAY_health_check_period_ms = "1000", RAY_health_check_failure_threshold = "3" }',
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class LocalExoscale:
    """A running local Exoscale; close() (or leaving the `with` block) stops it and removes its hosts."""

    model: Model
    app: App
    server: SimServer
    key: str
    secret: str = field(repr=False)
    hooks: HostHooks | None = None
    offer: HostOffer | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def client_env(self, state_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """`client_env` for this API and its account (see there)."""
        return client_env(self.endpoint, self.key, self.secret, state_dir)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.server.stop()
        if self.offer is not None:
            self.offer.close()
        if self.hooks is not None:
            self.hooks.close()

    def __enter__(self) -> LocalExoscale:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(
    key: str,
    secret: str,
    *,
    zone: str = "ch-gva-2",
    faults: Faults | None = None,
    http_faults: HTTPFaults | None = None,
    hosts: bool = False,
    subnet: str | None = None,
    offer_packages: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    record: bool = False,
    seed: int | None = None,
    quotas: dict[str, int] | None = None,
    authorized_families: tuple[str, ...] = (),
) -> LocalExoscale:
    """Start a local Exoscale API (and, with `hosts`, namespace hosts for its instances; needs root).

    `offer_packages` (with hosts) gives the hosts uv on their PATH and a package index on the gateway, as the
    internet would give a real VM (cloud.sim.offer). `quotas`, `authorized_families`: the organization's limits and the GPU
    families it may use (Model's). Every zone
    is served: `zone`'s at /v2, each zone's at /ZONE/v2, as list-zones gives them. Raises RuntimeError saying
    what is missing."""
    hooks = None
    offer = None
    if hosts:
        from cloud.sim.hosts import HostHooks

        hooks = HostHooks.create(subnet)
    try:
        model = Model(zone, faults or Faults(), seed=seed, quotas=quotas, authorized_families=authorized_families)
        if hooks is not None:
            hooks.attach(model)
        app = App(model, key, secret, http_faults or HTTPFaults(seed=seed), record=record)
        if hooks is not None:
            also_on = () if host == hooks.gateway else (host,)
            server = SimServer(app, hooks.gateway, port, also_on=also_on)
            if offer_packages:
                from cloud.sim.offer import HostOffer

                offer = HostOffer.start(hooks)
        else:
            server = SimServer(app, host, port)
    except BaseException:
        if offer is not None:
            offer.close()
        if hooks is not None:
            hooks.close()
        raise
    server.start()
    return LocalExoscale(model, app, server, key, secret, hooks, offer)
