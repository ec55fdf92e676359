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
import dataclasses
import functools
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError, LibcloudError
from libcloud.compute.base import Node, NodeImage, NodeSize
from ray.autoscaler._private.command_runner import SSHCommandRunner
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

from cloud import head_credentials, iam, pools, provision, zone_failover
from cloud.config import RESERVED_LABELS, ClusterSpec, driver_for
from cloud.exoscale_driver import (
    ExoscaleAPIError,
    ExoscaleOperationError,
    ExoscaleV2NodeDriver,
    RetryPolicy,
    Secret,
)
from cloud.fanout import parallel_map
from cloud.head_credentials import HEAD_STATE_DIR
from cloud.names import cluster_labels
from cloud.node_tags import TagStore
from cloud.retry import Wait, retry
from cloud.state import StateStore

log = logging.getLogger(__name__)

#: Instance states Ray counts as pending or running; everything else is terminated for Ray.
PENDING = frozenset({"starting", "migrating"})
RUNNING = frozenset({"running"})
CREATE_ATTEMPTS = 3  # per instance, when Exoscale's create operation fails
MAX_PARALLEL = 16  # API requests at once
TAGS_FILE_NAME = "node-tags.json"  # the pool members' tags (cloud.node_tags), in the cluster's state directory
HEAD_TAGS_FILE = "~/.raysweep-node-tags.json"  # the same on the head (beside, not in, the mounted ~/.raysweep)
STEP_TIMEOUT_S = 300.0  # how long a failing operation of the key, the group or the IAM key is tried again


def _credentials(provider_config: dict[str, Any]) -> head_credentials.HeadCredentials | None:
    path = provider_config.get("credentials_file")
    return head_credentials.read(Path(path).expanduser()) if path else None


def make_driver(
    provider_config: dict[str, Any], creds: head_credentials.HeadCredentials | None = None
) -> ExoscaleV2NodeDriver:
    """The driver for this provider config: the head's restricted key when `credentials_file` is set (on
    the head), else the user's key from the environment (on the user's machine)."""
    retry = RetryPolicy(**provider_config["retry"]) if provider_config.get("retry") else None
    creds = creds or _credentials(provider_config)
    if creds is not None:
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


def _refused(what: str, e: Exception) -> NodeLaunchException:
    """A refusal (quota, authorization, a bad request) as Ray's launch failure."""
    text = e.value if isinstance(e, LibcloudError) else str(e)
    code = getattr(e, "code", None) or getattr(e, "http_code", None)
    category = {401: "forbidden", 403: "forbidden", 429: "rate-limited"}.get(code or 0, "refused")
    if isinstance(e, InvalidCredsError):  # the driver's 401/403: the key may not do this
        category = "forbidden"
    if "quota" in str(text).lower():
        category = "quota"
    return NodeLaunchException(category, f"{what}: {text}", sys.exc_info())


def _progress(name: str, what: str) -> None:
    log.info("%s: %s", name, what)


class ExoscaleNodeProvider(NodeProvider):
    """One cluster's Exoscale instances as Ray's autoscaler and cluster launcher see them: the head an instance,
    each worker node type an instance pool whose members are the workers."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self._creds = _credentials(provider_config)  # set on the head only
        self._scope = cluster_labels(cluster_name)
        self._zones = tuple(provider_config.get("zones") or ())  # tried in order while the cluster has no node
        self.driver = zone_failover.home_driver(make_driver(provider_config, self._creds), self._zones, self._scope)
        self._user_labels = dict(provider_config.get("labels") or {})
        self._own_labels = set(RESERVED_LABELS) | set(self._user_labels)
        self._lock = threading.Lock()  # guards the dicts below
        self._nodes: dict[str, Node] = {}  # the last state seen of each node
        self._node_locks: dict[str, threading.Lock] = {}
        self._pool_locks: dict[str, threading.Lock] = {}
        self._scaling: set[str] = set()  # pools this provider is scaling out now (their new members untagged yet)
        self._pools: dict[str, str] = dict(self._creds.pools) if self._creds else {}  # node type -> pool id
        state_dir = provider_config.get("state_dir")
        self._store = StateStore(Path(state_dir).expanduser()) if state_dir else None
        tags_file = provider_config.get("tags_file")
        if tags_file:
            tags_path: Path | None = Path(tags_file).expanduser()
        else:
            tags_path = self._store.dir / TAGS_FILE_NAME if self._store is not None else None
        self._tags = TagStore(tags_path)

    @property
    def on_head(self) -> bool:
        return self._creds is not None

    # --------------------------------------------------------------------------------- listing

    def _list(self) -> list[Node]:
        """Every instance of the cluster. With the user's key: one listing by label. On the head (whose key may
        read only its pools and instances by id): the head, then each pool's members."""
        if self._creds is None:
            return provision.query_instances(self.driver, self.cluster_name)
        ids = [self._creds.head_id] if self._creds.head_id else []
        for pid in self._creds.pools.values():
            try:
                ids += self.driver.ex_get_instance_pool(pid).node_ids
            except ExoscaleAPIError as e:
                if e.code != 404:
                    raise
        found = parallel_map(self._fetch, ids, MAX_PARALLEL)
        return [n for n in found if n is not None]

    def _fetch(self, node_id: str) -> Node | None:
        try:
            return self.driver.ex_get_node(node_id)
        except ExoscaleAPIError as e:
            if e.code == 404:
                return None
            raise

    def _tags_of(self, node: Node) -> dict[str, str]:
        labels = {k: v for k, v in node.extra["labels"].items() if k not in self._own_labels}
        return {**labels, **self._tags.get(str(node.id))}

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        nodes = self._list()
        with self._lock:
            scaling = set(self._scaling)
            self._nodes = {str(n.id): n for n in nodes}  # a full listing: what it lacks is gone
        if not tag_filters and not scaling:  # the tags of nodes gone go too (never during a scale-out)
            self._tags.keep_only([str(n.id) for n in nodes])
        out = []
        for n in nodes:
            if n.extra.get("state") not in PENDING | RUNNING:
                continue
            pool = n.extra.get("instance_pool_id")
            if pool in scaling and not self._tags.known(str(n.id)):
                continue  # a member of a scale-out still in flight: listed once its tags are recorded
            tags = self._tags_of(n)
            if all(tags.get(k) == v for k, v in tag_filters.items()):
                out.append(str(n.id))
        return out

    def nodes_for_teardown(self, tag_filters: dict[str, str]) -> list[str]:
        """Everything of the cluster that still costs money, stopped or failed instances included."""
        nodes = self._list()
        return [
            str(n.id)
            for n in nodes
            if n.extra.get("state") not in provision.GONE_STATES
            and all(self._tags_of(n).get(k) == v for k, v in tag_filters.items())
        ]

    def _node(self, node_id: str, refresh: bool = False) -> Node | None:
        """The cached node, fetched when unknown (or when asked to refresh); None when it no longer exists."""
        with self._lock:
            node = self._nodes.get(node_id)
        if node is None or refresh:
            node = self._fetch(node_id)
            with self._lock:
                if node is None:
                    self._nodes.pop(node_id, None)
                else:
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
        return {} if node is None else self._tags_of(node)

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
        """A pool member's tags (and, on the head, the head's own) go to the tag file; the head's, on the user's
        machine, to its labels. Labels are replaced as a whole by the API: one update per node at a time, and
        each re-reads the labels first, so that concurrent updates lose nothing."""
        bad = sorted(k for k in tags if k in self._own_labels)
        if bad:
            raise ValueError(f"tags {bad} would overwrite labels the toolkit sets; use other keys")
        node = self._node(node_id)
        if node is None:
            return
        if self.on_head or node.extra.get("instance_pool_id"):
            self._tags.update([node_id], tags)
            return
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
        """The head: one instance, labelled from the start (the user's machine only). Workers: the node type's
        instance pool scaled out by `count`, its new members tagged. A refusal (quota, the pool's size cap, a key
        not allowed) or a scale-out failing 3 times raises NodeLaunchException."""
        missing = [k for k in ("instance_type_id", "template_id") if k not in node_config]
        if missing or "security_group_id" not in self.provider_config:
            raise ValueError(
                f"node_config lacks {missing or ['security_group_id']}: the config was not bootstrapped "
                f"(run it through `ray up`, which calls bootstrap_config)"
            )
        if tags.get(TAG_RAY_NODE_KIND, "worker") == NODE_KIND_HEAD:
            return self._create_head(node_config, tags)
        node_type = tags.get(TAG_RAY_USER_NODE_TYPE)
        if not node_type:
            raise ValueError(f"a worker's tags name no node type ({TAG_RAY_USER_NODE_TYPE})")
        return self._scale_out(node_type, node_config, {**tags, TAG_RAY_CLUSTER_NAME: self.cluster_name}, count)

    def _create_head(self, node_config: dict[str, Any], tags: dict[str, str]) -> dict[str, Node]:
        if self.on_head:
            raise ValueError("the head's key cannot create instances; `ray up` makes the head from your machine")
        node_labels = {
            **self._user_labels,
            **{k: str(v) for k, v in tags.items()},
            TAG_RAY_CLUSTER_NAME: self.cluster_name,
            **self._scope,
            "role": "head",
        }
        size = NodeSize(
            node_config["instance_type_id"], node_config.get("instance_type", ""), 0, 0, 0, 0.0, self.driver
        )
        image = NodeImage(node_config["template_id"], node_config.get("template", ""), self.driver)
        node = self._create_one(f"{self.cluster_name}-head", size, image, node_config, node_labels)
        with self._lock:
            self._nodes[str(node.id)] = node
        return {str(node.id): node}

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
                raise _refused(f"creating {name}", e) from None
            self._forget_address(node)
            return node
        raise AssertionError("unreachable")

    def _forget_address(self, node: Node) -> None:
        if self._store is not None and node.public_ips:
            self._store.forget_host(node.public_ips[0])  # a new machine may have an old address

    def _pool_lock(self, node_type: str) -> threading.Lock:
        with self._lock:
            return self._pool_locks.setdefault(node_type, threading.Lock())

    def _pool_id(self, node_type: str, node_config: dict[str, Any] | None = None) -> str:
        """The node type's pool: known (from the head's key file, or found before); on the user's machine found
        by name and labels, or made (empty) when `node_config` is given."""
        with self._lock:
            pid = self._pools.get(node_type)
        if pid:
            return pid
        if self.on_head:
            raise NodeLaunchException("refused", f"node type {node_type} has no instance pool on this head", None)
        if node_config is None:
            found = pools.find_pools(self.driver, self.cluster_name).get(node_type)
            if found is None:
                raise ValueError(f"node type {node_type} has no instance pool")
            pool = found
        else:
            pool = pools.ensure_pool(
                self.driver,
                self.cluster_name,
                node_type,
                instance_type_id=node_config["instance_type_id"],
                template_id=node_config["template_id"],
                disk_size=int(node_config.get("disk_size", 50)),
                ssh_key_name=self.provider_config["ssh_key_name"],
                security_group_id=self.provider_config["security_group_id"],
                labels=self.pool_labels(node_type),
            )
        with self._lock:
            self._pools[node_type] = pool.id
        return pool.id

    def pool_labels(self, node_type: str) -> dict[str, str]:
        """What every member of the node type's pool carries (and what its tags fall back to)."""
        return {
            **self._user_labels,
            TAG_RAY_CLUSTER_NAME: self.cluster_name,
            TAG_RAY_NODE_KIND: "worker",
            TAG_RAY_USER_NODE_TYPE: node_type,
            **self._scope,
            "role": "worker",
        }

    def _scale_out(
        self, node_type: str, node_config: dict[str, Any], tags: dict[str, str], count: int
    ) -> dict[str, Node]:
        with self._pool_lock(node_type):
            pid = self._pool_id(node_type, node_config)
            with self._lock:
                self._scaling.add(pid)
            try:
                return self._scale_out_locked(pid, node_type, tags, count)
            finally:
                with self._lock:
                    self._scaling.discard(pid)

    def _scale_out_locked(self, pid: str, node_type: str, tags: dict[str, str], count: int) -> dict[str, Node]:
        what = f"adding {count} {node_type} worker(s) to instance pool {pid}"
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            try:
                pool = self.driver.ex_get_instance_pool(pid)
                before = set(pool.node_ids)
                pool = self.driver.ex_scale_instance_pool(pid, max(pool.size, len(before)) + count)
            except ExoscaleOperationError as e:
                left = [i for i in self.driver.ex_get_instance_pool(pid).node_ids if i not in before]
                if left:  # what the failed scale-out left goes first, so that a retry does not double it
                    self._evict(pid, left)
                if attempt == CREATE_ATTEMPTS:
                    raise NodeLaunchException(
                        "operation-failed", f"{what}: {e.value} (tried {attempt} times)", sys.exc_info()
                    ) from None
                log.warning("%s: %s; trying again", what, e.value)
                continue
            except (BaseHTTPError, LibcloudError) as e:
                raise _refused(what, e) from None
            new = [i for i in pool.node_ids if i not in before]
            self._tags.update(new, tags)
            nodes = [n for n in parallel_map(self._fetch, new, MAX_PARALLEL) if n is not None]
            for n in nodes:
                self._forget_address(n)
            with self._lock:
                self._nodes.update({str(n.id): n for n in nodes})
            if len(new) < count:
                log.warning("%s: the pool made %d", what, len(new))
            return {str(n.id): n for n in nodes}
        raise AssertionError("unreachable")

    def _evict(self, pid: str, node_ids: list[str]) -> None:
        members = set(self.driver.ex_get_instance_pool(pid).node_ids)
        mine = [i for i in node_ids if i in members]
        if mine:
            try:
                self.driver.ex_evict_instance_pool_members(pid, mine)
            except ExoscaleAPIError as e:
                if e.code not in (404, 409):
                    raise
        self._tags.forget(node_ids)
        with self._lock:
            for i in node_ids:
                self._nodes.pop(i, None)

    def _destroy(self, node_id: str) -> None:
        err = provision.destroy_instance(self.driver, node_id)  # gone already or being destroyed: None
        if err is not None:
            raise RuntimeError(f"could not delete instance {node_id}: {err}")
        self._tags.forget([node_id])
        with self._lock:
            self._nodes.pop(node_id, None)

    def terminate_node(self, node_id: str) -> None:
        self.terminate_nodes([node_id])

    def terminate_nodes(self, node_ids: list[str]) -> None:
        """Pool members are evicted from their pool (one call per pool: Exoscale removes exactly those); an
        instance of no pool (the head, on the user's machine) is deleted."""
        if not node_ids:
            return
        by_pool: dict[str, list[str]] = {}
        alone: list[str] = []
        for nid in dict.fromkeys(node_ids):
            node = self._node(nid)
            if node is None:
                self._tags.forget([nid])
                continue
            pid = node.extra.get("instance_pool_id")
            if pid:
                by_pool.setdefault(pid, []).append(nid)
            else:
                alone.append(nid)
        types = {v: k for k, v in self._pools.items()}
        for pid, ids in by_pool.items():
            with self._pool_lock(types.get(pid, pid)):
                self._evict(pid, ids)
        if alone:
            parallel_map(self._destroy, alone, MAX_PARALLEL)

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

    def ensure_pools(self, cluster_config: dict[str, Any]) -> dict[str, int]:
        """Each worker node type's instance pool, made (empty) where missing (the user's machine only); returns
        each worker node type's max_workers."""
        head_type = cluster_config.get("head_node_type")
        sizes: dict[str, int] = {}
        for type_name, node_type in cluster_config["available_node_types"].items():
            if type_name == head_type:
                continue
            config: dict[str, Any] = node_type["node_config"]
            retry(
                f"making the instance pool of node type {type_name}",
                functools.partial(self._pool_id, type_name, config),
                Wait(STEP_TIMEOUT_S),
                _progress,
            )
            sizes[type_name] = int(node_type.get("max_workers", cluster_config.get("max_workers", 0)))
        return sizes

    def prepare_for_head_node(self, cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Once `ray up` has the head (on the user's machine): each worker node type's instance pool (made when
        missing, empty), then the cluster's restricted key with the role of cloud.iam.pool_head_policy (these
        pools, each up to its max_workers, and the head itself, from the head's address only), written with the
        pool and head ids into `state_dir/head/`, mounted on the head as `~/.raysweep/`; the head's config names
        only that file, and workers never get it."""
        if self._store is None:
            raise ValueError("provider.state_dir is not set: write the config with `exoscale.py ray-config`")
        heads = self.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})
        if len(heads) != 1:
            raise RuntimeError(f"cluster {self.cluster_name}: expected one head instance, found {len(heads)}")
        head_id = heads[0]
        head_ip = self._wait_address(head_id)
        sizes = self.ensure_pools(cluster_config)
        pool_ids = {t: self._pools[t] for t in sizes}
        zone, endpoint = self.driver.zone, self.provider_config.get("endpoint")  # the zone the head lives in
        policy = iam.pool_head_policy({pool_ids[t]: n for t, n in sizes.items()}, head_id, head_ip, zone)
        path = iam.key_copy_path(self._store.dir)
        creds = retry(
            f"making the head's restricted key for cluster {self.cluster_name}",
            lambda: iam.ensure_key_file(self.driver, self.cluster_name, zone, endpoint, path, policy),
            Wait(STEP_TIMEOUT_S),
            _progress,
        )
        head_credentials.write(path, dataclasses.replace(creds, head_id=head_id, pools=pool_ids))
        remote = copy.deepcopy(cluster_config)
        pc = remote["provider"]
        pc["credentials_file"] = "~/" + head_credentials.HEAD_PATH
        pc["state_dir"] = HEAD_STATE_DIR
        pc["tags_file"] = HEAD_TAGS_FILE
        remote["file_mounts"] = {k: v for k, v in remote["file_mounts"].items() if k.rstrip("/") != HEAD_STATE_DIR}
        return remote

    def _wait_address(self, node_id: str) -> str:
        wait = Wait(STEP_TIMEOUT_S)
        while True:
            ip = self.external_ip(node_id)
            if ip:
                return ip
            if wait.over():
                raise RuntimeError(f"instance {node_id} has no public address after {STEP_TIMEOUT_S:g} s")
            wait.sleep()

    def cleanup_cluster_resources(self) -> None:
        """After `ray down` removed the nodes: the restricted key and its role, the security group, the SSH
        key, the local copy of the key, and Ray's cached bootstrap of this config (it names the group)."""
        if self.provider_config.get("credentials_file"):
            return  # on the head: nothing to clean with a key that may only touch instances
        state_dir = self._store.dir if self._store is not None else None
        removed = iam.delete_cluster_iam(self.driver, self.cluster_name, state_dir)
        if self._store is not None:
            (self._store.dir / TAGS_FILE_NAME).unlink(missing_ok=True)
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
