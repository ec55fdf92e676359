"""Ray's node provider for Exoscale (API v2), on this project's libcloud driver.

    provider:
      type: external
      module: cloud.ray_provider.ExoscaleNodeProvider
      zone: ch-gva-2
      endpoint: https://api-ch-gva-2.exoscale.com/v2      # optional (EXOSCALE_API_ENDPOINT)
      state_dir: ~/.raysweep/clusters/NAME                  # the cluster's local state (keys, known_hosts)

`python exoscale.py ray-config` writes a whole cluster YAML with it. What runs where:
- On the user's machine (`ray up/exec/attach/down`): the user's key from EXOSCALE_API_KEY/SECRET.
  `bootstrap_config` resolves the instance types and templates of the node types by name and makes sure the
  cluster's SSH key and security group exist (nothing secret goes into its result: Ray caches it as plain
  JSON); `prepare_for_head_node` makes the cluster's restricted key (cloud.iam) and writes it into
  `state_dir/head/`, which the YAML mounts on the head as `~/.raysweep/`; `cleanup_cluster_resources`
  (called by `ray down` when the nodes are gone) deletes that key, its role, the group and the SSH key.
- On the head (the autoscaler): only the restricted key, read from `credentials_file`.

Ray's node tags are instance labels, the only truth: nothing is kept that a fresh provider (or a fresh
laptop) could not read back. Labels are replaced as a whole by the API, so a tag update re-reads the
instance and writes the merged set, one update at a time per node. Every node also carries the labels
`exoscale.py` uses (`cluster`, `managed-by`, `role`), so `status`, `ssh`, `cmd` and `down` see it.
Exoscale instances have no private address unless a private network is attached: nodes reach each other
at their public addresses, which only members of the cluster's security group may use beyond SSH.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeImage, NodeSize
from ray.autoscaler._private.command_runner import SSHCommandRunner
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND

from cloud import head_credentials, iam, provision, zone_failover
from cloud.config import RESERVED_LABELS, ClusterSpec, driver_for
from cloud.exoscale_driver import (
    ExoscaleAPIError,
    ExoscaleOperationError,
    ExoscaleV2NodeDriver,
    RetryPolicy,
    Secret,
)
from cloud.fanout import fan_out, parallel_map
from cloud.head_credentials import HEAD_STATE_DIR
from cloud.names import cluster_labels
from cloud.retry import Wait, retry
from cloud.state import StateStore

log = logging.getLogger(__name__)

#: Instance states Ray counts as pending or running; everything else is terminated for Ray.
PENDING = frozenset({"starting", "migrating"})
RUNNING = frozenset({"running"})
CREATE_ATTEMPTS = 3  # per instance, when Exoscale's create operation fails
MAX_PARALLEL = 16  # API requests at once
STEP_TIMEOUT_S = 300.0  # how long a failing operation of the key, the group or the IAM key is tried again


def make_driver(provider_config: dict[str, Any]) -> ExoscaleV2NodeDriver:
    """The driver for this provider config: the head's restricted key when `credentials_file` is set (on
    the head), else the user's key from the environment (on the user's machine)."""
    retry = RetryPolicy(**provider_config["retry"]) if provider_config.get("retry") else None
    path = provider_config.get("credentials_file")
    if path:
        creds = head_credentials.read(Path(path).expanduser())
        key, secret, zone, endpoint = creds.key, creds.secret, creds.zone, creds.endpoint
    else:
        env_key, env_secret = os.environ.get("EXOSCALE_API_KEY"), os.environ.get("EXOSCALE_API_SECRET")
        if not env_key or not env_secret:
            raise ValueError(
                "set EXOSCALE_API_KEY and EXOSCALE_API_SECRET (an Exoscale API key pair, as for the exo CLI)"
            )
        key, secret = env_key, Secret(env_secret)
        zone, endpoint = provider_config["zone"], provider_config.get("endpoint")
    return driver_for(key, secret, zone, endpoint, retry)


def cluster_spec(cluster_config: dict[str, Any]) -> ClusterSpec:
    """What the provisioning core needs of this Ray cluster config: the cluster's name, local state, SSH key
    and allowed CIDR, zone and labels (the instance shapes are per node type, in node_config)."""
    pc = cluster_config["provider"]
    key = cluster_config.get("auth", {}).get("ssh_private_key")
    return ClusterSpec(
        name=cluster_config["cluster_name"],
        state_dir=Path(pc["state_dir"]).expanduser(),
        zone=pc["zone"],
        ssh_key=Path(key).expanduser() if key else None,
        ssh_cidr=pc.get("ssh_cidr", "0.0.0.0/0"),
        labels=dict(pc.get("labels") or {}),
    )


def _progress(name: str, what: str) -> None:
    log.info("%s: %s", name, what)


class ExoscaleNodeProvider(NodeProvider):
    """Exoscale instances labelled for one cluster, as Ray's autoscaler and cluster launcher see them."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self._scope = cluster_labels(cluster_name)
        self._zones = tuple(provider_config.get("zones") or ())  # tried in order while the cluster has no node
        self.driver = zone_failover.home_driver(make_driver(provider_config), self._zones, self._scope)
        self._user_labels = dict(provider_config.get("labels") or {})
        self._own_labels = set(RESERVED_LABELS) | set(self._user_labels)
        self._lock = threading.Lock()  # guards the two dicts below
        self._nodes: dict[str, Node] = {}  # the last state seen of each node
        self._node_locks: dict[str, threading.Lock] = {}
        state_dir = provider_config.get("state_dir")
        self._store = StateStore(Path(state_dir).expanduser()) if state_dir else None

    # --------------------------------------------------------------------------------- listing

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        nodes = provision.query_instances(self.driver, self.cluster_name, tag_filters)
        live = [n for n in nodes if n.extra.get("state") in PENDING | RUNNING]
        with self._lock:
            if not tag_filters:  # a full listing: what it lacks is gone
                self._nodes = {i: n for i, n in self._nodes.items() if i in {str(x.id) for x in nodes}}
            self._nodes.update({str(n.id): n for n in nodes})
        return [str(n.id) for n in live]

    def nodes_for_teardown(self, tag_filters: dict[str, str]) -> list[str]:
        """Everything of the cluster that still costs money, stopped or failed instances included."""
        nodes = provision.query_instances(self.driver, self.cluster_name, tag_filters)
        return [str(n.id) for n in nodes if n.extra.get("state") not in provision.GONE_STATES]

    def _node(self, node_id: str, refresh: bool = False) -> Node | None:
        """The cached node, fetched when unknown (or when asked to refresh); None when it no longer exists."""
        with self._lock:
            node = self._nodes.get(node_id)
        if node is None or refresh:
            try:
                node = self.driver.ex_get_node(node_id)
            except ExoscaleAPIError as e:
                if e.code != 404:
                    raise
                with self._lock:
                    self._nodes.pop(node_id, None)
                return None
            with self._lock:
                self._nodes[node_id] = node
        return node

    def is_running(self, node_id: str) -> bool:
        node = self._node(node_id)
        return node is not None and node.extra.get("state") in RUNNING

    def is_terminated(self, node_id: str) -> bool:
        node = self._node(node_id)
        return node is None or node.extra.get("state") not in PENDING | RUNNING

    def node_tags(self, node_id: str) -> dict[str, str]:
        node = self._node(node_id)
        if node is None:
            return {}
        return {k: v for k, v in node.extra["labels"].items() if k not in self._own_labels}

    def external_ip(self, node_id: str) -> str | None:  # type: ignore[override]  # None while it has none (Ray's runner waits)
        node = self._node(node_id)
        if node is not None and not node.public_ips:  # no address yet: ask again, never trust a stale cache
            node = self._node(node_id, refresh=True)
        return node.public_ips[0] if node is not None and node.public_ips else None

    def internal_ip(self, node_id: str) -> str | None:  # type: ignore[override]  # as external_ip
        # Without a private network an Exoscale instance has only its public address; cluster members
        # reach each other there (the security group lets members in, and only SSH from outside).
        return self.external_ip(node_id)

    # ------------------------------------------------------------------------------------ tags

    def _lock_of(self, node_id: str) -> threading.Lock:
        with self._lock:
            return self._node_locks.setdefault(node_id, threading.Lock())

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        """Merge `tags` into the node's labels. The API replaces labels as a whole: one update per node at a
        time, and each re-reads the labels first, so that concurrent updates lose nothing."""
        bad = sorted(k for k in tags if k in self._own_labels)
        if bad:
            raise ValueError(f"tags {bad} would overwrite labels the toolkit sets; use other keys")
        with self._lock_of(node_id):
            node = self.driver.ex_get_node(node_id)
            labels = {**node.extra["labels"], **{k: str(v) for k, v in tags.items()}}
            if labels != node.extra["labels"]:
                node = self.driver.ex_update_node(node, labels=labels)
            with self._lock:
                self._nodes[node_id] = node

    # ---------------------------------------------------------------------------- create/delete

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str], count: int) -> dict[str, Node]:
        return self.create_node_with_resources_and_labels(node_config, tags, count, {}, {})

    def create_node_with_resources_and_labels(
        self,
        node_config: dict[str, Any],
        tags: dict[str, str],
        count: int,
        resources: dict[str, float],
        labels: dict[str, str],
    ) -> dict[str, Node]:
        """Create `count` instances in parallel, each labelled from the start (never an untagged instance).
        A failed create operation is retried after removing what it left; a refusal (quota, an instance
        type not authorized, a key not allowed) raises NodeLaunchException once every other create ended."""
        missing = [k for k in ("instance_type_id", "template_id") if k not in node_config]
        if missing or "security_group_id" not in self.provider_config:
            raise ValueError(
                f"node_config lacks {missing or ['security_group_id']}: the config was not bootstrapped "
                f"(run it through `ray up`, which calls bootstrap_config)"
            )
        kind = tags.get(TAG_RAY_NODE_KIND, "worker")
        node_labels = {
            **self._user_labels,
            **{k: str(v) for k, v in tags.items()},
            TAG_RAY_CLUSTER_NAME: self.cluster_name,
            **self._scope,
            "role": "head" if kind == NODE_KIND_HEAD else "worker",
        }
        size = NodeSize(
            node_config["instance_type_id"], node_config.get("instance_type", ""), 0, 0, 0, 0.0, self.driver
        )
        image = NodeImage(node_config["template_id"], node_config.get("template", ""), self.driver)

        def name() -> str:
            if kind == NODE_KIND_HEAD:
                return f"{self.cluster_name}-head"
            return f"{self.cluster_name}-{kind}-{uuid.uuid4().hex[:6]}"

        names = [name() for _ in range(count)]
        res = fan_out(
            list(range(count)),
            lambda i: self._create_one(names[i], size, image, node_config, node_labels),
            name=str,
            max_parallel=MAX_PARALLEL,
        )
        unexpected = [e for e in res.errors.values() if not isinstance(e, NodeLaunchException)]
        if unexpected:
            raise unexpected[0]
        created = {str(node.id): node for node in res.done.values()}
        errors = [e for e in res.errors.values() if isinstance(e, NodeLaunchException)]
        with self._lock:
            self._nodes.update(created)
        if errors:
            log.warning("created %d of %d %s node(s); %s", len(created), count, kind, errors[0].description)
            raise errors[0]
        return created

    def _create_one(self, name: str, size: NodeSize, image: NodeImage, node_config: dict, labels: dict) -> Node:
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            try:
                self.driver, node = zone_failover.create_in_zones(  # with zones: where the cluster lives
                    self.driver,
                    self._zones,
                    self._scope,
                    lambda driver: provision.create_instance(
                        driver,
                        name,
                        size,
                        image,
                        key_name=self.provider_config["ssh_key_name"],
                        group=self.provider_config["security_group_id"],
                        disk_size=int(node_config.get("disk_size", 50)),
                        labels=labels,
                    ),
                    f"create {name}",
                )
            except zone_failover.NoZoneError as e:
                raise NodeLaunchException("no-zone", f"creating {name}: {e}", sys.exc_info()) from None
            except ExoscaleOperationError as e:
                if e.reference_id:  # what the failed operation left (an instance in error) goes first
                    self._destroy(e.reference_id)
                if attempt == CREATE_ATTEMPTS:
                    raise NodeLaunchException(
                        "operation-failed", f"creating {name}: {e.value} (tried {attempt} times)", sys.exc_info()
                    ) from None
                log.warning("creating %s: %s; trying again", name, e.value)
                continue
            except (BaseHTTPError, LibcloudError) as e:  # refused: quota, authorization, a bad request
                text = e.value if isinstance(e, LibcloudError) else str(e)
                code = getattr(e, "code", None)
                category = {403: "forbidden", 429: "rate-limited"}.get(code or 0, "refused")
                if "quota" in str(text).lower():
                    category = "quota"
                raise NodeLaunchException(category, f"creating {name}: {text}", sys.exc_info()) from None
            if self._store is not None and node.public_ips:
                self._store.forget_host(node.public_ips[0])  # a new machine may have an old address
            return node
        raise AssertionError("unreachable")

    def _destroy(self, node_id: str) -> None:
        err = provision.destroy_instance(self.driver, node_id)  # gone already or being destroyed: None
        if err is not None:
            raise RuntimeError(f"could not delete instance {node_id}: {err}")
        with self._lock:
            self._nodes.pop(node_id, None)

    def terminate_node(self, node_id: str) -> None:
        self._destroy(node_id)

    def terminate_nodes(self, node_ids: list[str]) -> None:
        if not node_ids:
            return
        parallel_map(self._destroy, node_ids, MAX_PARALLEL)

    # ------------------------------------------------------------------- the user's machine only

    @staticmethod
    def bootstrap_config(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Resolve node types' instance types and templates by name, and make sure the cluster's SSH key and
        security group exist. Its result holds names and ids only: Ray caches it as plain JSON."""
        config = copy.deepcopy(cluster_config)
        pc = config["provider"]
        driver = make_driver(pc)
        spec = cluster_spec(config)
        store = StateStore(spec.state_dir)
        store.ensure_dir()
        shared = provision.prepare(driver, spec, store, _progress, Wait(STEP_TIMEOUT_S))
        pc["ssh_key_name"], pc["security_group_id"] = shared.key_name, shared.group.id
        for type_name, node_type in config["available_node_types"].items():
            nc = node_type["node_config"]
            size = driver.ex_get_size(nc["instance_type"])
            if not size.extra.get("authorized", True):
                raise ValueError(
                    f"node type {type_name}: instance type {size.name} is not authorized for this Exoscale "
                    f"account (GPU types need a request to Exoscale support); choose another"
                )
            image = driver.ex_get_image(nc["template"])
            nc["instance_type_id"], nc["template_id"] = size.id, image.id
            if type_name == config.get("head_node_type"):  # the template's login user (ubuntu, debian, ...)
                config.setdefault("auth", {})["ssh_user"] = image.extra.get("default_user") or "ubuntu"
        return config

    @staticmethod
    def fillout_available_node_types_resources(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """CPU, GPU (and, for workers, memory) of each node type from its Exoscale instance type; what the
        config declares wins."""
        config = copy.deepcopy(cluster_config)
        driver = make_driver(config["provider"])
        for type_name, node_type in config["available_node_types"].items():
            size = driver.ex_get_size(node_type["node_config"]["instance_type"])
            found: dict[str, float] = {"CPU": size.extra.get("cpus") or 0}
            if size.extra.get("gpus"):
                found["GPU"] = size.extra["gpus"]
            if type_name != config.get("head_node_type"):
                found["memory"] = int(size.ram * 1024 * 1024 * 0.7)  # Ray keeps ~30% for its object store
            node_type["resources"] = {**found, **(node_type.get("resources") or {})}
        return config

    def prepare_for_head_node(self, cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Make (or keep) the cluster's restricted key in `state_dir/head/`, mounted on the head as
        `~/.raysweep/`; the head's config names only that file, and workers never get it."""
        if self._store is None:
            raise ValueError("provider.state_dir is not set: write the config with `exoscale.py ray-config`")
        path = iam.key_copy_path(self._store.dir)
        zone, endpoint = self.provider_config["zone"], self.provider_config.get("endpoint")
        retry(
            f"making the head's restricted key for cluster {self.cluster_name}",
            lambda: iam.ensure_key_file(self.driver, self.cluster_name, zone, endpoint, path),
            Wait(STEP_TIMEOUT_S),
            _progress,
        )
        remote = copy.deepcopy(cluster_config)
        pc = remote["provider"]
        pc["credentials_file"] = "~/" + head_credentials.HEAD_PATH
        pc["state_dir"] = HEAD_STATE_DIR
        remote["file_mounts"] = {k: v for k, v in remote["file_mounts"].items() if k.rstrip("/") != HEAD_STATE_DIR}
        return remote

    def cleanup_cluster_resources(self) -> None:
        """After `ray down` removed the nodes: the restricted key and its role, the security group, the SSH
        key, the local copy of the key, and Ray's cached bootstrap of this config (it names the group)."""
        if self.provider_config.get("credentials_file"):
            return  # on the head: nothing to clean with a key that may only touch instances
        state_dir = self._store.dir if self._store is not None else None
        removed = iam.delete_cluster_iam(self.driver, self.cluster_name, state_dir)
        if self._store is not None:
            # provision.down finds the (no longer existing) instances, the group and the SSH key by label and
            # name; with ssh_key set it keeps the cluster's key pair, which the YAML's auth section names
            spec = ClusterSpec(self.cluster_name, self._store.dir, ssh_key=self._store.key_path)
            res = provision.down(self.driver, spec)
            if res.failed:
                raise RuntimeError("could not remove: " + "; ".join(f"{k}: {v}" for k, v in res.failed.items()))
            removed += res.removed
        cache = self.provider_config.get("_config_cache_path")
        if cache:
            Path(cache).unlink(missing_ok=True)
        log.info("cluster %s: removed %s", self.cluster_name, ", ".join(removed) or "nothing")

    # ---------------------------------------------------------------------------------- SSH

    def get_command_runner(
        self, log_prefix, node_id, auth_config, cluster_name, process_runner, use_internal_ip, docker_config=None
    ):
        """Ray's SSH runner, but with host keys pinned in the cluster's known_hosts on first contact (Ray's
        own turns checking off); a new instance's address is forgotten there when it is created."""
        runner = super().get_command_runner(
            log_prefix, node_id, auth_config, cluster_name, process_runner, use_internal_ip, docker_config
        )
        if isinstance(runner, SSHCommandRunner) and self._store is not None:
            self._store.ensure_dir()
            runner.ssh_options.arg_dict.update(
                StrictHostKeyChecking="accept-new",
                UserKnownHostsFile=str(self._store.known_hosts),
                HashKnownHosts="no",
            )
        return runner
