"""Cluster configuration: cluster.toml (optional) + environment -> a validated ClusterConfig.

Works with nothing but EXOSCALE_API_KEY / EXOSCALE_API_SECRET in the environment (the names the exo
CLI and the Terraform provider use). EXOSCALE_API_ENDPOINT points everything at another API, e.g.
the local sim: http://127.0.0.1:8080/v2. Validation here needs no network; instance types and
templates are checked against the API before anything is created.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cloud import rate_cap
from cloud.autostop import DEFAULT_MINUTES, check_minutes
from cloud.exoscale_driver import ZONES, ExoscaleV2NodeDriver, RetryPolicy, Secret
from cloud.pricing import PriceError, PriceTable
from cloud.state import StateStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULTS: dict[str, Any] = {
    "name": "default",
    "zone": "ch-gva-2",
    "instance_type": "standard.medium",
    "template": "Linux Ubuntu 24.04 LTS 64-bit",
    "disk_size": 50,
    "nodes": 3,
    "ssh_key": None,
    "ssh_cidr": "0.0.0.0/0",
    "labels": {},
    "setup_commands": [],
    # how `install` prepares the nodes (defaults suit Exoscale's Ubuntu templates with internet access)
    "uv_path": None,  # a uv binary already on the nodes; else uv's installer is fetched
    "install_options": "",  # extra `uv pip install` options, e.g. "--index-url https://mirror/simple"
    "install_env": {},  # environment for the install, e.g. { UV_CACHE_DIR = "/var/cache/uv" }
    "packages": None,  # what `install` adds to Ray on the nodes (default: what the CLI is given, the program's)
    "ray_cpus": None,  # CPUs each node offers to Ray (default: all it has)
    "head_cpus": 0,  # CPUs an autoscaling cluster's head offers to Ray (0: no trials beside the head's key)
    "ray_env": {},  # environment for `ray start`, e.g. { RAY_health_check_period_ms = "1000" }
    "autostop_minutes": DEFAULT_MINUTES,  # idle minutes after which the head tears the cluster down (0 = off)
    # cost (cloud.pricing): hourly rates replacing the price list's, by type ([prices] "standard.medium" = 0.05),
    # and what the cluster's instances may cost per hour together (disks included; None: no cap)
    "prices": {},
    "max_hourly_rate": None,
    # zones tried in order when a create is refused for capacity or quota (cloud.zone_failover); the cluster
    # stays in the zone of its first node. [] : only `zone`
    "zones": [],
}
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
RESERVED_LABELS = ("cluster", "role", "managed-by")


class ConfigError(ValueError):
    """A bad setting: one line saying what is wrong and what is valid."""


def driver_for(
    api_key: str, api_secret: Secret, zone: str, endpoint: str | None = None, retry: RetryPolicy | None = None
) -> ExoscaleV2NodeDriver:
    """The driver for a key pair, a zone and an API endpoint (None: Exoscale's own)."""
    return ExoscaleV2NodeDriver(api_key, api_secret, retry=retry, **endpoint_kwargs(zone, endpoint))


def endpoint_kwargs(zone: str, endpoint: str | None) -> dict[str, Any]:
    """The driver's connection arguments for `zone` and an API endpoint URL (None: Exoscale's own)."""
    if not endpoint:
        return {"zone": zone}
    u = urlparse(endpoint)
    return {
        "zone": zone,
        "host": u.hostname,
        "port": u.port or (443 if u.scheme == "https" else 80),
        "secure": u.scheme == "https",
    }


@dataclass(frozen=True)
class ClusterSpec:
    """What the provisioning core (cloud.provision) makes and finds a cluster by: its name, its local state,
    SSH access and the shape of its instances. `exoscale.py` takes it from cluster.toml (ClusterConfig.spec),
    the node provider from Ray's cluster config; no credentials here (the driver carries them)."""

    name: str
    state_dir: Path
    zone: str = DEFAULTS["zone"]
    instance_type: str = DEFAULTS["instance_type"]
    template: str = DEFAULTS["template"]
    disk_size: int = DEFAULTS["disk_size"]
    nodes: int = DEFAULTS["nodes"]
    ssh_key: Path | None = None  # the user's private key; None: the cluster's own pair in state_dir
    ssh_cidr: str = DEFAULTS["ssh_cidr"]
    labels: Mapping[str, str] = field(default_factory=dict)
    zones: tuple[str, ...] = ()  # tried in order for the first node; () : `zone` only


@dataclass(frozen=True)
class Credentials:
    """Who the API calls are made as, and where they go: from the environment, never from cluster.toml."""

    api_key: str
    api_secret: Secret | None = field(repr=False)
    endpoint: str | None = None  # EXOSCALE_API_ENDPOINT; None: Exoscale's own API


@dataclass(frozen=True)
class InstallSettings:
    """How `install` prepares the nodes (cloud.node_install)."""

    setup_commands: tuple[str, ...] = ()
    uv_path: str | None = None
    options: str = ""  # extra `uv pip install` options
    env: Mapping[str, str] = field(default_factory=dict)
    packages: tuple[str, ...] | None = None  # None: the default the CLI supplies


@dataclass(frozen=True)
class RaySettings:
    """How Ray is started on the nodes (cloud.ray_runtime, cloud.ray_config)."""

    cpus: int | None = None  # None: all the node has
    head_cpus: int = 0  # an autoscaling cluster's head (cloud.ray_config): 0 keeps trials off the key's node
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CostSettings:
    """What the cluster's instances cost (cloud.pricing): the price table, cluster.toml's `[prices]` applied."""

    prices: PriceTable = field(default_factory=PriceTable)
    max_hourly_rate: Decimal | None = None  # in prices.currency, for all the cluster's instances together
    warnings: tuple[str, ...] = ()  # e.g. a [prices] entry for a type the price list does not have


@dataclass(frozen=True)
class ClusterConfig:
    """cluster.toml and the environment, validated, in the parts that belong together: the credentials, the
    cluster's shape (the provisioning core's ClusterSpec), how nodes are installed, how Ray starts, and the
    head's autostop. `name`, `zone` and `state_dir` are the spec's."""

    credentials: Credentials
    spec: ClusterSpec
    install: InstallSettings = field(default_factory=InstallSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    autostop_minutes: float = DEFAULT_MINUTES
    ssh_cidr_given: bool = False  # ssh_cidr was set, not the open default
    cost: CostSettings = field(default_factory=CostSettings)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def zone(self) -> str:
        return self.spec.zone

    @property
    def state_dir(self) -> Path:
        return self.spec.state_dir

    def driver_kwargs(self) -> dict[str, Any]:
        return endpoint_kwargs(self.zone, self.credentials.endpoint)

    def driver(self) -> ExoscaleV2NodeDriver:
        c = self.credentials
        if c.api_secret is None:
            raise ConfigError(
                "set EXOSCALE_API_KEY and EXOSCALE_API_SECRET (an Exoscale API key pair, as for the exo CLI)"
            )
        if c.endpoint and self.spec.zones and self.zone != self.spec.zones[0]:
            # EXOSCALE_API_ENDPOINT serves the first zone; another zone's endpoint is the one list-zones gives
            return driver_for(c.api_key, c.api_secret, self.spec.zones[0], c.endpoint).ex_zone_driver(self.zone)
        return driver_for(c.api_key, c.api_secret, self.zone, c.endpoint)

    def with_state_root(self, root: Path) -> ClusterConfig:
        """The same cluster with its local state under `root` (state_dir = root / name)."""
        return replace(self, spec=replace(self.spec, state_dir=root / self.name)).placed()

    def in_zone(self, zone: str) -> ClusterConfig:
        return replace(self, spec=replace(self.spec, zone=zone))

    def placed(self) -> ClusterConfig:
        """With `zones`, the cluster in the zone its state records it was made in (zone failover); else as is."""
        recorded = StateStore(self.state_dir).zone_record() if self.spec.zones else None
        return self.in_zone(recorded) if recorded in self.spec.zones and recorded != self.zone else self


CREDENTIAL_VARS = ("EXOSCALE_API_KEY", "EXOSCALE_API_SECRET")


def wrong_credentials_hint(api_key: str) -> str:
    """What to check when the API refuses the signature; names where the pair was read, never the secret."""
    return (
        f"the API key pair is probably wrong: key {api_key or '(empty)'} and its secret were read from the "
        f"environment variables {' and '.join(CREDENTIAL_VARS)} (cluster.toml holds no credentials)"
    )


def default_state_root() -> Path:
    env = os.environ.get("RAYSWEEP_STATE_DIR")
    return Path(env) if env else Path.home() / ".raysweep" / "clusters"


def load(
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    require_credentials: bool = True,
    **overrides: Any,
) -> ClusterConfig:
    """Read cluster.toml (if given), then the environment, then overrides (e.g. -n from the CLI).

    Commands that only use SSH (scp, cmd, ssh) pass require_credentials=False."""
    environ: Mapping[str, str] = os.environ if env is None else env
    values: dict[str, Any] = dict(DEFAULTS)
    cidr_given = zone_given = False
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config {p}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {p}: not valid TOML ({e})") from None
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"{p}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
        values.update(data)
        cidr_given = "ssh_cidr" in data
        zone_given = "zone" in data
    for k, v in overrides.items():
        if v is not None:
            values[k] = v
            cidr_given = cidr_given or k == "ssh_cidr"
            zone_given = zone_given or k == "zone"
    key, secret = environ.get("EXOSCALE_API_KEY"), environ.get("EXOSCALE_API_SECRET")
    if (not key or not secret) and require_credentials:
        raise ConfigError("set EXOSCALE_API_KEY and EXOSCALE_API_SECRET (an Exoscale API key pair, as for the exo CLI)")
    endpoint = environ.get("EXOSCALE_API_ENDPOINT") or None
    if endpoint:
        u = urlparse(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname or u.path.rstrip("/") not in ("", "/v2"):
            raise ConfigError(
                f"EXOSCALE_API_ENDPOINT {endpoint!r}: give a URL like https://HOST/v2 or http://127.0.0.1:8080/v2"
            )
    return _validate(values, key or "", Secret(secret) if secret else None, endpoint, cidr_given, zone_given)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # TOML's true is a bool, and Python's bool an int


def _validate(
    v: dict[str, Any],
    key: str,
    secret: Secret | None,
    endpoint: str | None,
    cidr_given: bool,
    zone_given: bool = False,
) -> ClusterConfig:
    name = v["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"name {name!r}: use 1-40 lower-case letters, digits and '-', starting and ending with a letter or digit"
        )
    zones = v["zones"]
    if not isinstance(zones, list) or not all(isinstance(z, str) for z in zones):
        raise ConfigError(
            f'zones must be a list of zones tried in order, e.g. ["de-fra-1", "at-vie-2"]; valid: {", ".join(ZONES)}'
        )
    for z in zones:
        if z not in ZONES:
            raise ConfigError(f"zones: {z!r} is not an Exoscale zone; valid: {', '.join(ZONES)}")
    if len(set(zones)) != len(zones):
        raise ConfigError(f"zones: {', '.join(sorted({z for z in zones if zones.count(z) > 1}))} named more than once")
    if zones and not zone_given:
        v["zone"] = zones[0]
    elif zones and v["zone"] != zones[0]:
        raise ConfigError(
            f"zone {v['zone']!r} with zones = [{', '.join(zones)}]: zones are tried in their order, from the first; "
            f"leave zone out"
        )
    if v["zone"] not in ZONES:
        raise ConfigError(f"zone {v['zone']!r} is not an Exoscale zone; valid: {', '.join(ZONES)}")
    for k in ("instance_type", "template"):
        if not isinstance(v[k], str) or not v[k].strip():
            raise ConfigError(f"{k} must be a non-empty string")
    if not _is_int(v["disk_size"]) or not 10 <= v["disk_size"] <= 51200:
        raise ConfigError(f"disk_size {v['disk_size']!r}: a whole number of GiB from 10 to 51200")
    if not _is_int(v["nodes"]) or not 1 <= v["nodes"] <= 100:
        raise ConfigError(f"nodes {v['nodes']!r}: a whole number from 1 to 100")
    try:
        net = ipaddress.ip_network(v["ssh_cidr"], strict=False)
    except (ValueError, TypeError):
        raise ConfigError(f"ssh_cidr {v['ssh_cidr']!r} is not a CIDR like 203.0.113.7/32") from None
    ssh_key = None
    if v["ssh_key"]:
        ssh_key = Path(str(v["ssh_key"])).expanduser()
        if not ssh_key.is_file() or not Path(f"{ssh_key}.pub").is_file():
            raise ConfigError(f"ssh_key {str(ssh_key)!r}: needs the private key and {ssh_key}.pub beside it")
    labels = v["labels"]
    if not isinstance(labels, dict):
        raise ConfigError('labels must be a table of key = "value"')
    for lk, lv in labels.items():
        if lk in RESERVED_LABELS:
            raise ConfigError(f"label {lk!r} is set by the toolkit; reserved: {', '.join(RESERVED_LABELS)}")
        if not _LABEL_RE.match(str(lk)) or not isinstance(lv, str) or any(c.isspace() for c in lv):
            raise ConfigError(f"label {lk!r} = {lv!r}: keys of letters, digits, '.', '_', '-'; values without spaces")
    cmds = v["setup_commands"]
    if not isinstance(cmds, list) or not all(isinstance(c, str) for c in cmds):
        raise ConfigError("setup_commands must be a list of shell command strings")
    for k in ("install_env", "ray_env"):
        if not isinstance(v[k], dict) or not all(isinstance(x, str) for x in v[k].values()):
            raise ConfigError(f'{k} must be a table of NAME = "value" strings')
    pkgs = v["packages"]
    if pkgs is not None and (not isinstance(pkgs, list) or not all(isinstance(x, str) and x.strip() for x in pkgs)):
        raise ConfigError('packages must be a list of requirement strings, e.g. ["numpy==2.1", "scikit-learn"]')
    if v["ray_cpus"] is not None and (not _is_int(v["ray_cpus"]) or v["ray_cpus"] < 1):
        raise ConfigError(f"ray_cpus {v['ray_cpus']!r}: a whole number >= 1")
    if not _is_int(v["head_cpus"]) or v["head_cpus"] < 0:
        raise ConfigError(f"head_cpus {v['head_cpus']!r}: a whole number >= 0 (0: the head runs no trials)")
    if not isinstance(v["install_options"], str) or (v["uv_path"] is not None and not isinstance(v["uv_path"], str)):
        raise ConfigError("install_options and uv_path must be strings")
    try:
        autostop_minutes = check_minutes(v["autostop_minutes"], "autostop_minutes")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cost = _cost_settings(v, v["instance_type"], v["disk_size"])
    cfg = ClusterConfig(
        credentials=Credentials(key, secret, endpoint),
        spec=ClusterSpec(
            name=name,
            state_dir=default_state_root() / name,
            zone=v["zone"],
            instance_type=v["instance_type"],
            template=v["template"],
            disk_size=v["disk_size"],
            nodes=v["nodes"],
            ssh_key=ssh_key,
            ssh_cidr=str(net),
            labels={str(k): str(x) for k, x in labels.items()},
            zones=tuple(zones),
        ),
        install=InstallSettings(
            setup_commands=tuple(cmds),
            uv_path=v["uv_path"],
            options=v["install_options"],
            env=dict(v["install_env"]),
            packages=None if pkgs is None else tuple(x.strip() for x in pkgs),
        ),
        ray=RaySettings(cpus=v["ray_cpus"], env=dict(v["ray_env"]), head_cpus=v["head_cpus"]),
        autostop_minutes=autostop_minutes,
        ssh_cidr_given=cidr_given,
        cost=cost,
    )
    return cfg.placed()


def _cost_settings(v: dict[str, Any], instance_type: str, disk_size: int) -> CostSettings:
    """[prices] applied to the price list (a type it lacks: a warning) and max_hourly_rate checked: a number > 0
    that one node of instance_type (with its disk) fits under."""
    if not isinstance(v["prices"], dict):
        raise ConfigError('prices must be a table of "TYPE" = hourly rate, e.g. [prices] "standard.medium" = 0.05')
    # `standard.medium = 0.05` unquoted is a table `standard` in TOML: read it as the type it spells
    flat = {
        f"{k}.{sub}" if isinstance(x, dict) else k: y
        for k, x in v["prices"].items()
        for sub, y in (x.items() if isinstance(x, dict) else [(None, x)])
    }
    try:
        prices, warnings = PriceTable().with_overrides(flat)
    except PriceError as e:
        raise ConfigError(str(e)) from None
    cap = v["max_hourly_rate"]
    if cap is None:
        return CostSettings(prices, None, tuple(warnings))
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not math.isfinite(cap) or cap <= 0:
        raise ConfigError(
            f"max_hourly_rate {cap!r}: a number > 0, what the cluster's instances may cost per hour together "
            f"(in {prices.currency}), e.g. 2.5"
        )
    limit = Decimal(str(cap))
    try:
        rate_cap.check_one_node(limit, prices, instance_type, disk_size)
    except rate_cap.RateCapError as e:
        raise ConfigError(str(e)) from None
    return CostSettings(prices, limit, tuple(warnings))
