"""An autoscaling cluster's workers as Exoscale instance pools: one pool per worker node type, made on the
user's machine (with the user's key) in the cluster's zone, with the cluster's labels, security group, SSH key
and template; the head's restricted key may only read, scale and evict these pools (cloud.iam).

A pool is found by its name (`raysweep-CLUSTER-NODE_TYPE`) and its labels (`cluster`, `managed-by`), so that
`down` finds it without local state. Exoscale refuses a new pool of size 0 (the spec's `size` has an exclusive
minimum of 0), so a pool is made with one member and scaled to 0 at once; the autoscaler scales it from there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping

from cloud.exoscale_driver import ExoscaleAPIError, ExoscaleInstancePool
from cloud.names import MANAGED_BY, cluster_labels, resource_name

log = logging.getLogger(__name__)
Progress = Callable[[str, str], None]


def pool_name(cluster: str, node_type: str) -> str:
    return f"{resource_name(cluster)}-{node_type}"


def instance_prefix(cluster: str, node_type: str) -> str:
    """The members' name prefix (the API allows 30 characters; Exoscale appends `-XXXXX-YYYYY`)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", node_type.lower()).strip("-") or "w"
    return f"{cluster}-{slug}"[:30].rstrip("-")


def is_ours(pool: ExoscaleInstancePool, cluster: str) -> bool:
    labels = pool.labels
    return (
        labels.get("cluster") == cluster
        and labels.get("managed-by") == MANAGED_BY
        and pool.name.startswith(resource_name(cluster) + "-")
    )


def find_pools(driver, cluster: str) -> dict[str, ExoscaleInstancePool]:
    """The cluster's pools by node type (the `ray-user-node-type` label each carries)."""
    out: dict[str, ExoscaleInstancePool] = {}
    for p in driver.ex_list_instance_pools():
        if is_ours(p, cluster) and p.state != "destroying":
            out[p.labels.get("ray-user-node-type", p.name)] = p
    return out


def ensure_pool(
    driver,
    cluster: str,
    node_type: str,
    *,
    instance_type_id: str,
    template_id: str,
    disk_size: int,
    ssh_key_name: str,
    security_group_id: str,
    labels: Mapping[str, str],
    size: int = 0,
) -> ExoscaleInstancePool:
    """The node type's pool, made when missing with `size` members (a size of 0: made with one, then scaled to
    0); an existing pool is returned as it is."""
    existing = find_pools(driver, cluster).get(node_type)
    if existing is not None:
        return existing
    all_labels = {**labels, **cluster_labels(cluster), "ray-user-node-type": node_type}
    pool = driver.ex_create_instance_pool(
        pool_name(cluster, node_type),
        instance_type_id,
        template_id,
        max(size, 1),
        ex_disk_size=disk_size,
        ex_ssh_keys=[ssh_key_name],
        ex_security_groups=[security_group_id],
        ex_labels=all_labels,
        ex_instance_prefix=instance_prefix(cluster, node_type),
        ex_description=f"raysweep cluster {cluster}: workers of node type {node_type}",
    )
    log.info("instance pool %s made (%s)", pool.name, pool.id)
    if size == 0:
        pool = driver.ex_scale_instance_pool(pool.id, 0)
    return pool


def delete_pools(driver, cluster: str, progress: Progress) -> tuple[list[str], dict[str, str]]:
    """Delete the cluster's pools and their members. Returns (what was deleted, {what is left: why})."""
    removed: list[str] = []
    failed: dict[str, str] = {}
    for p in [p for p in driver.ex_list_instance_pools() if is_ours(p, cluster)]:
        if p.state == "destroying":
            continue
        try:
            driver.ex_delete_instance_pool(p.id)
            removed.append(f"instance pool {p.name}")
            progress(p.name, "instance pool deleted")
        except ExoscaleAPIError as e:
            if e.code != 404:
                failed[f"instance pool {p.name}"] = str(e)
    return removed, failed
