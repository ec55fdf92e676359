"""Bring a cluster up, take it down, say what exists: with any libcloud NodeDriver that has our `ex_`
extras (ExoscaleV2NodeDriver). The API is the source of truth: everything of a cluster carries the
label cluster=NAME (instances) or the name raysweep-NAME (security group, SSH key), and is found that
way, so `down` removes all of it even when the local state is gone, and `up` completes a partial
cluster instead of duplicating it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from libcloud.compute.base import Node
from libcloud.compute.types import NodeState

from cloud.config import ClusterConfig
from cloud.exoscale_driver import ExoscaleAPIError, ExoscaleOperationError, ExoscaleSecurityGroup
from cloud.state import ClusterState, NodeRecord, StateStore

log = logging.getLogger(__name__)

MANAGED_BY = "raysweep"
Progress = Callable[[str, str], None]  # (node or resource name, what happened)


class ProvisionError(Exception):
    pass


def resource_name(cluster: str) -> str:
    return f"raysweep-{cluster}"


def cluster_labels(cluster: str) -> dict[str, str]:
    return {"cluster": cluster, "managed-by": MANAGED_BY}


def node_names(cluster: str, n: int) -> list[tuple[str, str]]:
    return [(f"{cluster}-head", "head")] + [(f"{cluster}-worker-{i}", "worker") for i in range(1, n)]


def _quiet(name: str, what: str) -> None:
    log.info("%s: %s", name, what)


def md5_fingerprint(public_key: str) -> str:
    digest = hashlib.md5(base64.b64decode(public_key.split()[1])).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


def cluster_nodes(driver, cluster: str) -> list[Node]:
    return driver.list_nodes(ex_labels=cluster_labels(cluster))


def _record(node: Node, user: str) -> NodeRecord:
    return NodeRecord(
        name=node.name,
        role=node.extra["labels"].get("role", "worker"),
        ip=node.public_ips[0] if node.public_ips else "",
        id=str(node.id),
        user=user,
        state=node.extra.get("state", ""),
    )


@dataclass
class UpResult:
    state: ClusterState
    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def ensure_key(driver, cfg: ClusterConfig, store: StateStore, progress: Progress) -> tuple[str, Path]:
    private = cfg.ssh_key or store.ensure_key()
    public = Path(f"{private}.pub").read_text().strip()
    name = resource_name(cfg.name)
    existing = {k.name: k for k in driver.list_key_pairs()}
    if name in existing:
        if existing[name].fingerprint and existing[name].fingerprint != md5_fingerprint(public):
            raise ProvisionError(
                f"an SSH key named {name} is registered with another fingerprint "
                f"({existing[name].fingerprint}); the cluster's nodes would not accept {private}. "
                f"Run `down` first, or set ssh_key to the key that was used"
            )
    else:
        driver.import_key_pair_from_string(name, public)
        progress(name, "SSH key registered")
    return name, Path(private)


def ensure_security_group(driver, cfg: ClusterConfig, progress: Progress):
    """The cluster's group: inbound TCP 22 from the allowed CIDR, and everything between its members."""
    name = resource_name(cfg.name)
    groups = {g.name: g for g in driver.ex_list_security_groups()}
    group = groups.get(name)
    if group is None:
        group = driver.ex_create_security_group(name, f"raysweep cluster {cfg.name}")
        progress(name, "security group created")
    have = {
        (r.get("protocol"), r.get("start-port"), r.get("network"), (r.get("security-group") or {}).get("id"))
        for r in group.rules
        if r.get("flow-direction") == "ingress"
    }
    if ("tcp", 22, cfg.ssh_cidr, None) not in have:
        group = driver.ex_add_security_group_rule(
            group, "tcp", 22, 22, cidr=cfg.ssh_cidr, description="SSH from the allowed CIDR"
        )
    if ("all", None, None, group.id) not in have:
        group = driver.ex_add_security_group_rule(
            group, "all", source_group=group, description="everything between cluster members"
        )
    unexpected = [
        r
        for r in group.rules
        if r.get("flow-direction") == "ingress"
        and r.get("network")
        and not (r.get("protocol") == "tcp" and r.get("start-port") == 22 and r.get("network") == cfg.ssh_cidr)
    ]
    if unexpected:
        log.warning("security group %s has extra inbound rules not made by raysweep: %s", name, unexpected)
    return group


def up(
    driver, cfg: ClusterConfig, n: int | None = None, progress: Progress = _quiet, ssh_timeout: float = 600.0
) -> UpResult:
    n = n or cfg.nodes
    store = StateStore(cfg.state_dir)
    store.ensure_dir()
    size = driver.ex_get_size(cfg.instance_type)  # one-line errors listing the valid ones
    image = driver.ex_get_image(cfg.template)
    user = image.extra.get("default_user") or "ubuntu"
    key_name, key_path = ensure_key(driver, cfg, store, progress)
    group = ensure_security_group(driver, cfg, progress)
    result = UpResult(ClusterState(cfg.name, security_group_id=group.id, key_name=key_name))

    existing = {nd.name: nd for nd in cluster_nodes(driver, cfg.name)}
    broken = [nd for nd in existing.values() if nd.state in (NodeState.ERROR, NodeState.TERMINATED)]
    for nd in broken:  # a failed create leaves an instance in error: replace it
        progress(nd.name, f"in state {nd.extra.get('state')}; replacing it")
        _destroy_quietly(driver, nd)
        existing.pop(nd.name)
        result.replaced.append(nd.name)
    wanted = node_names(cfg.name, n)
    extra = [nm for nm in existing if nm not in dict(wanted)]
    if extra:
        progress(
            cfg.name, f"keeping {len(extra)} node(s) beyond -n {n}: {', '.join(sorted(extra))} (down removes them)"
        )
    missing = [(nm, role) for nm, role in wanted if nm not in existing]
    for nm, _ in wanted:
        if nm in existing:
            progress(nm, f"exists ({existing[nm].extra.get('state')})")

    def create(item):
        nm, role = item
        progress(nm, "creating")
        try:
            node = driver.create_node(
                nm,
                size,
                image,
                ex_disk_size=cfg.disk_size,
                ex_ssh_keys=[key_name],
                ex_security_groups=[group],
                ex_labels={**cfg.labels, **cluster_labels(cfg.name), "role": role},
            )
            progress(nm, f"running at {node.public_ips[0] if node.public_ips else '?'}")
            return nm, node, None
        except (ExoscaleAPIError, ExoscaleOperationError) as e:
            progress(nm, f"FAILED: {e}")
            return nm, None, str(e)

    if missing:
        with ThreadPoolExecutor(max_workers=min(16, len(missing))) as pool:
            for nm, node, err in pool.map(create, missing):
                if node is not None:
                    existing[nm] = node
                    result.created.append(nm)
                    if node.public_ips:
                        store.forget_host(node.public_ips[0])  # a new machine may reuse an old address
                else:
                    result.failed[nm] = err

    nodes = [existing[nm] for nm in sorted(existing)]
    nodes = _wait_running(driver, nodes, progress)
    from cloud.remote import Remote  # here: the autoscaler imports this module on a head without Fabric

    result.state.nodes = [_record(nd, user) for nd in nodes]
    store.save(result.state)
    remote = Remote(key_path, store.known_hosts)
    ready = remote.wait_ssh(
        [r for r in result.state.nodes if r.ip],
        timeout=ssh_timeout,
        on_ready=lambda r: progress(r.name, f"answers on SSH ({r.user}@{r.ip})"),
    )
    for r in ready:
        if not r.ok:
            result.failed[r.node.name] = r.error
            progress(r.node.name, f"FAILED: {r.error}")
    return result


def _wait_running(driver, nodes: list[Node], progress: Progress, timeout: float = 600.0) -> list[Node]:
    deadline = time.monotonic() + timeout
    out = []
    for nd in nodes:
        while nd.state != NodeState.RUNNING and time.monotonic() < deadline:
            if nd.state in (NodeState.STOPPED,):
                progress(nd.name, "stopped; starting it")
                driver.start_node(nd)
            time.sleep(1)
            nd = driver.ex_get_node(nd.id)
        out.append(nd)
    return out


def _destroy_quietly(driver, node: Node) -> str | None:
    try:
        driver.destroy_node(node)
        return None
    except ExoscaleAPIError as e:
        if e.code == 404:
            return None
        return str(e)
    except ExoscaleOperationError as e:
        return str(e)


@dataclass
class DownResult:
    destroyed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def plan_down(driver, cluster: str) -> tuple[list[Node], ExoscaleSecurityGroup | None, bool]:
    """What `down` would remove: the cluster's instances, its security group, whether its key exists."""
    nodes = cluster_nodes(driver, cluster)
    name = resource_name(cluster)
    group = next((g for g in driver.ex_list_security_groups() if g.name == name), None)
    has_key = any(k.name == name for k in driver.list_key_pairs())
    return nodes, group, has_key


def down(driver, cfg: ClusterConfig, progress: Progress = _quiet, group_timeout: float = 300.0) -> DownResult:
    """Remove every instance, the security group and the SSH key of the cluster; idempotent."""
    result = DownResult()
    nodes, group, has_key = plan_down(driver, cfg.name)

    def destroy(nd: Node):
        progress(nd.name, "destroying")
        err = _destroy_quietly(driver, nd)
        progress(nd.name, "destroyed" if err is None else f"FAILED: {err}")
        return nd.name, err

    if nodes:
        with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
            for nm, err in pool.map(destroy, nodes):
                (result.failed.__setitem__(nm, err) if err else result.destroyed.append(nm))
    name = resource_name(cfg.name)
    if group is not None:
        deadline = time.monotonic() + group_timeout
        while True:  # the group is refused while instances are still being torn down
            try:
                driver.ex_delete_security_group(group)
                result.removed.append(f"security group {name}")
                progress(name, "security group deleted")
                break
            except ExoscaleAPIError as e:
                if e.code == 404:
                    break
                if e.code != 409 or time.monotonic() > deadline:
                    result.failed[f"security group {name}"] = str(e)
                    progress(name, f"FAILED: {e}")
                    break
                time.sleep(1)
    if has_key:
        try:
            driver.delete_key_pair(name)
            result.removed.append(f"SSH key {name}")
            progress(name, "SSH key deleted")
        except ExoscaleAPIError as e:
            if e.code != 404:
                result.failed[f"SSH key {name}"] = str(e)
    try:  # the head's restricted key and its role (made for the autoscaler or autostop)
        from cloud import iam

        for what in iam.delete_cluster_iam(driver, cfg.name):
            result.removed.append(what)
            progress(name, f"{what} deleted")
    except ExoscaleAPIError as e:
        if e.code != 403:  # a key without IAM rights cannot have made one either
            result.failed[f"IAM key/role {name}"] = str(e)
    if not result.failed:
        StateStore(cfg.state_dir).remove(keep_key=cfg.ssh_key is not None)
    return result


def status(driver, cfg: ClusterConfig) -> ClusterState:
    """The cluster as the API sees it (and the local cache refreshed from it)."""
    store = StateStore(cfg.state_dir)
    old = store.load()
    users = {n.name: n.user for n in old.nodes} if old else {}
    nodes = cluster_nodes(driver, cfg.name)
    state = ClusterState(
        cfg.name,
        [_record(nd, users.get(nd.name, "ubuntu")) for nd in nodes],
        old.security_group_id if old else "",
        old.key_name if old else "",
    )
    if nodes:
        store.save(state)
    return state
