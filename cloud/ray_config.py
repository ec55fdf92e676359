"""A complete Ray cluster YAML for this project's nodes on Exoscale (`exoscale.py ray-config`).

Ray fills in no defaults for an external node provider, so every section is written out. The nodes get
the same environment as `exoscale.py install` (this machine's Python minor and Ray version through uv,
with cluster.toml's install settings); the head also gets what the node provider imports (libcloud and
Exoscale's signer) and the provider module itself (`~/raysweep/cloud`, on the autoscaler's PYTHONPATH).
Ray runs with token authentication (the cluster's token from the local state) and its dashboard on
127.0.0.1; after Ray the head starts the autostop daemon (cloud.autostop: `autostop_minutes`, torn down
with the head's restricted key). Local files the YAML names, all in the cluster's state directory: the SSH
key pair, the Ray token (0600), the install scripts, and `head/`, where the provider puts the restricted
key before `ray up` copies it to the head.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud import autostop
from cloud.config import ClusterConfig, ConfigError
from cloud.head_credentials import HEAD_MOUNT
from cloud.node_install import NODE_ENV, head_packages, install_script, node_packages
from cloud.ray_runtime import CLIENT_PORT, DASHBOARD_PORT, GCS_PORT, node_command
from cloud.remote import env_exports
from cloud.state import StateStore

PROVIDER_MODULE = "cloud.ray_provider.ExoscaleNodeProvider"
HEAD_TYPE = "ray.head.default"
WORKER_TYPE = "ray.worker.default"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
REMOTE_PROJECT = "~/raysweep"


@dataclass(frozen=True)
class WorkerType:
    """A worker node type: an Exoscale instance type, how many of it, and resources it declares."""

    name: str
    instance_type: str
    min_workers: int = 0
    max_workers: int = 1
    resources: dict[str, int] = field(default_factory=dict)


def parse_worker_type(text: str) -> WorkerType:
    """NAME=INSTANCE_TYPE[,min=N][,max=N][,RESOURCE=N...], e.g. gpu=gpua5000.small,max=2 or
    big=standard.large,max=3,CPU=4."""
    head, _, rest = text.partition(",")
    name, sep, itype = head.partition("=")
    usage = "--worker-type NAME=INSTANCE_TYPE[,min=N][,max=N][,RESOURCE=N...], e.g. gpu=gpua5000.small,max=2"
    if not sep or not name.strip() or not itype.strip():
        raise ConfigError(f"{text!r}: {usage}")
    values: dict[str, int] = {}
    for part in [p for p in rest.split(",") if p]:
        k, sep, v = part.partition("=")
        if not sep or not v.strip().isdigit():
            raise ConfigError(f"{text!r}: {part!r} is not KEY=WHOLE_NUMBER; {usage}")
        values[k.strip()] = int(v)
    lo, hi = values.pop("min", 0), values.pop("max", 1)
    if lo > hi:
        raise ConfigError(f"{text!r}: min={lo} is more than max={hi}")
    return WorkerType(name.strip(), itype.strip(), lo, hi, values)


def _node_type(
    instance_type: str, cfg: ClusterConfig, lo: int, hi: int, resources: dict[str, int], cpus: int | None
) -> dict:
    res = {"CPU": cpus, **resources} if cpus is not None else dict(resources)
    return {
        "node_config": {"instance_type": instance_type, "template": cfg.spec.template, "disk_size": cfg.spec.disk_size},
        "resources": res,
        "min_workers": lo,
        "max_workers": hi,
    }


def prepare_files(cfg: ClusterConfig, packages: Sequence[str] = ()) -> dict[str, Path]:
    """The local files the YAML names, made where missing (the SSH key pair, the Ray token, the install
    scripts, the directory for the head's key); returned by role. `packages`: the nodes' extra packages
    when cluster.toml names none (as for `install`)."""
    store = StateStore(cfg.state_dir)
    key = store.private_key(cfg.spec.ssh_key)
    if key != store.key_path:  # Ray copies the key the YAML names to the head, for its autoscaler
        raise ConfigError(
            f"ssh_key {str(key)!r} is your own key (from cluster.toml, or import-terraform --ssh-key), and an "
            f"autoscaling cluster's head gets the private key it reaches new workers with, while a node never gets "
            f"your own key: leave ssh_key out and raysweep makes a key pair for this cluster"
        )
    store.ensure_dir()
    store.ensure_key()
    store.ensure_ray_token()
    extra = list(cfg.install.packages if cfg.install.packages is not None else packages)
    setup = store.dir / "ray-setup"
    setup.mkdir(mode=0o700, exist_ok=True)
    (setup / "install-worker.sh").write_text(install_script(cfg, node_packages(extra)))
    (setup / "install-head.sh").write_text(install_script(cfg, node_packages(extra + head_packages())))
    head = store.dir / "head"
    head.mkdir(mode=0o700, exist_ok=True)
    return {"key": key, "token": store.ray_token_path, "setup": setup, "head": head}


def build(
    cfg: ClusterConfig,
    min_workers: int = 0,
    max_workers: int = 2,
    idle_minutes: float = 5.0,
    worker_types: tuple[WorkerType, ...] = (),
    head_instance_type: str | None = None,
    user: str = "ubuntu",
    packages: Sequence[str] = (),
) -> dict[str, Any]:
    # `user` is a placeholder: bootstrap_config sets the template's own login user
    """The cluster YAML as a dict (see the module docstring); prepares the local files it names."""
    if not 0 <= min_workers <= max_workers:
        raise ConfigError(f"--min-workers {min_workers} / --max-workers {max_workers}: need 0 <= min <= max")
    if idle_minutes <= 0:
        raise ConfigError(f"--idle-minutes {idle_minutes:g}: a positive number of minutes (fractions work)")
    names = [WORKER_TYPE, *(w.name for w in worker_types)]
    if len(set(names)) != len(names) or HEAD_TYPE in names[1:]:
        raise ConfigError(f"worker type names must be unique and differ from {HEAD_TYPE}: {', '.join(names)}")
    files = prepare_files(cfg, packages)
    node_types = {
        # the head holds the cluster's key: it takes no trials unless cluster.toml's head_cpus says otherwise
        HEAD_TYPE: _node_type(head_instance_type or cfg.spec.instance_type, cfg, 0, 0, {}, cfg.ray.head_cpus),
        WORKER_TYPE: _node_type(cfg.spec.instance_type, cfg, min_workers, max_workers, {}, cfg.ray.cpus),
    }
    for w in worker_types:
        node_types[w.name] = _node_type(w.instance_type, cfg, w.min_workers, w.max_workers, w.resources, cfg.ray.cpus)
    path_line = f'export PATH="$HOME/{NODE_ENV}/bin:$PATH" RAY_AUTH_MODE=token'
    shell_env = f"grep -qsF {shlex.quote(path_line)} ~/.bashrc || echo {shlex.quote(path_line)} >> ~/.bashrc"
    install = env_exports(cfg.install.env) + f"bash {REMOTE_PROJECT}/setup/install-%s.sh"
    provider: dict[str, Any] = {
        "type": "external",
        "module": PROVIDER_MODULE,
        "zone": cfg.zone,
        "state_dir": str(cfg.state_dir),
        "ssh_cidr": cfg.spec.ssh_cidr,
    }
    if cfg.credentials.endpoint:
        provider["endpoint"] = cfg.credentials.endpoint
    if cfg.spec.labels:
        provider["labels"] = dict(cfg.spec.labels)
    if cfg.spec.zones:  # tried in order by the node provider while the cluster has no node (cloud.zone_failover)
        provider["zones"] = list(cfg.spec.zones)
    try:
        unit_s = autostop.unit_from_env()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # the autostop daemon, from the mounted code (~/raysweep/cloud) with the head's environment; a head that has
    # a setting keeps it (`exoscale.py autostop` changes it)
    autostop_start = autostop.head_start_command(
        cfg.autostop_minutes, unit_s, env_dir=NODE_ENV, lib=REMOTE_PROJECT.removeprefix("~/")
    )
    head_start = (
        f"ray start --head --port={GCS_PORT} --dashboard-host=127.0.0.1 --dashboard-port={DASHBOARD_PORT} "
        f"--ray-client-server-port={CLIENT_PORT} --autoscaling-config=~/ray_bootstrap_config.yaml "
        f"--num-cpus={cfg.ray.head_cpus} --disable-usage-stats"
    )
    return {
        "cluster_name": cfg.name,
        "max_workers": max_workers + sum(w.max_workers for w in worker_types),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": provider,
        "auth": {"ssh_user": user, "ssh_private_key": str(files["key"])},
        "available_node_types": node_types,
        "head_node_type": HEAD_TYPE,
        "file_mounts": {
            f"{REMOTE_PROJECT}/cloud/": str(PROJECT_ROOT / "cloud") + "/",
            f"{REMOTE_PROJECT}/setup/": str(files["setup"]) + "/",
            "~/.ray/auth_token": str(files["token"]),
            HEAD_MOUNT: str(files["head"]) + "/",
        },
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": ["__pycache__", "*.pyc"],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [shell_env],
        "head_setup_commands": [install % "head"],
        "worker_setup_commands": [install % "worker"],
        "head_start_ray_commands": [
            node_command("ray stop", cfg),
            f"ulimit -n 65536 || true; export PYTHONPATH={REMOTE_PROJECT}; " + node_command(head_start, cfg),
            autostop_start,
        ],
        "worker_start_ray_commands": [
            node_command("ray stop", cfg),
            "ulimit -n 65536 || true; "
            + node_command(f"ray start --address=$RAY_HEAD_IP:{GCS_PORT} --disable-usage-stats", cfg),
        ],
    }


def render(config: dict[str, Any]) -> str:
    import yaml

    header = (
        "# Ray cluster on Exoscale, written by `exoscale.py ray-config`. Use: ray up THIS.yaml -y; ray exec THIS.yaml\n"
        "# 'ray status'; ray down THIS.yaml -y. Credentials: EXOSCALE_API_KEY/SECRET here; the head gets a\n"
        "# restricted per-cluster key (see README, Elastic clusters).\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, width=200)
