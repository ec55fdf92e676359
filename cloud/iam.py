"""The per-cluster restricted API key: an IAM role allowing only the compute operations a cluster's head
needs (the autoscaler's node provider and autostop) on that cluster's own resources, from the head's own
address, and an API key with that role.

Made on the user's machine (with the user's key) when a cluster's head is prepared, removed by `down`
(`exoscale.py down` and Ray's `ray down`, both through `delete_cluster_iam`); the head gets only this key,
in its own 0600 file (cloud.head_credentials), of which the user's machine keeps a copy in the cluster's state
(`key_copy_path`). Both are named `raysweep-<cluster>`, so they are found by name even when local state is lost.

The role's policy (Exoscale's rule-based policies, https://community.exoscale.com/product/iam/how-to/policy-guide/:
CEL expressions over the bindings `operation`, `parameters`, `source_ip`, `zone`; rules in order, the first
valid one decides, none deciding refuses): every service denied by default, and in `compute` and `general`
only the rules made by `pool_head_policy` (an autoscaling cluster's head: its own instance pools, scaled up
to their `max_workers`, and itself) or `static_head_policy` (a static cluster's head: its own instances, for
autostop), each also conditioned on the head's address and the cluster's zone. A role made before its head
exists gets `NOTHING`, which allows nothing, until the head's policy replaces it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cloud import head_credentials
from cloud.exoscale_driver import ExoscaleAPIError, Secret
from cloud.head_credentials import HeadCredentials
from cloud.names import resource_name

log = logging.getLogger(__name__)

#: A policy that allows nothing: every service denied (a role made before its head exists).
NOTHING: dict = {"default-service-strategy": "deny", "services": {}}


def _cel_string(text: str) -> str:
    """`text` as a CEL string literal (ids and addresses only: refused if it could break out of the quotes)."""
    if not re.fullmatch(r"[A-Za-z0-9.:_-]+", text):
        raise ValueError(f"{text!r} cannot be put in an IAM rule (letters, digits, '.', ':', '_', '-' only)")
    return f"'{text}'"


def _cel_list(items: list[str]) -> str:
    return "[" + ", ".join(_cel_string(i) for i in items) + "]"


def _where(head_ip: str, zone: str) -> str:
    """The condition every rule carries: the request comes from the head's address, for the cluster's zone."""
    return f"source_ip == {_cel_string(head_ip)} && zone == {_cel_string(zone)}"


def _rules_policy(compute: list[str], where: str) -> dict:
    """deny by default; in compute, one allow rule per expression (each `&& where`); in general, get-operation
    from the same place (following the operations the compute ones start)."""
    return {
        "default-service-strategy": "deny",
        "services": {
            "compute": {
                "type": "rules",
                "rules": [{"action": "allow", "expression": f"{e} && {where}"} for e in compute],
            },
            "general": {
                "type": "rules",
                "rules": [{"action": "allow", "expression": f"operation == 'get-operation' && {where}"}],
            },
        },
    }


def pool_head_policy(pools: dict[str, int], head_id: str, head_ip: str, zone: str) -> dict:
    """An autoscaling cluster's head: `pools` maps each of its instance pools' ids to the pool's max_workers.
    - get-instance-pool, and scale-instance-pool to at most max_workers, on its own pools only (parameters.id,
      parameters.size); evict-instance-pool-members of its own pools (Exoscale evicts members of the pool named);
    - get-instance on any instance (a pool's members have new ids at every scale-out, and no documented binding
      names the pool an instance belongs to: the narrowest documented rule reads instances, it changes none);
    - delete-instance on the head itself only (autostop's last step);
    - no create-instance, update-instance, no other delete-instance, nothing outside compute and get-operation.
    Every rule: from `head_ip`, in `zone`."""
    if not pools:
        raise ValueError("an autoscaling cluster's head policy needs at least one instance pool")
    ids = _cel_list(sorted(pools))
    scale = " || ".join(
        f"(parameters.id == {_cel_string(p)} && parameters.size <= {int(n)})" for p, n in sorted(pools.items())
    )
    return _rules_policy(
        [
            f"operation == 'get-instance-pool' && parameters.id in {ids}",
            f"operation == 'scale-instance-pool' && ({scale})",
            f"operation == 'evict-instance-pool-members' && parameters.id in {ids}",
            "operation == 'get-instance'",
            f"operation == 'delete-instance' && parameters.id == {_cel_string(head_id)}",
        ],
        _where(head_ip, zone),
    )


def static_head_policy(instance_ids: list[str], head_ip: str, zone: str) -> dict:
    """A static cluster's head (what its autostop needs): list-instances (to find the cluster's instances by
    label; a listing has no id to condition on), get-instance and delete-instance of the cluster's own instances
    (parameters.id), from `head_ip`, in `zone`; nothing else."""
    if not instance_ids:
        raise ValueError("a static cluster's head policy needs its instances")
    ids = _cel_list(sorted(instance_ids))
    return _rules_policy(
        [
            "operation == 'list-instances'",
            f"operation in ['get-instance', 'delete-instance'] && parameters.id in {ids}",
        ],
        _where(head_ip, zone),
    )


@dataclass(frozen=True)
class ClusterKey:
    key: str
    name: str
    role_id: str


def find_role(driver, cluster: str) -> str | None:
    name = resource_name(cluster)
    for role in driver.ex_call("GET", "/iam-role").get("iam-roles", []):
        if role.get("name") == name:
            return str(role["id"])
    return None


def find_keys(driver, cluster: str) -> list[ClusterKey]:
    name = resource_name(cluster)
    return [
        ClusterKey(k["key"], k["name"], k.get("role-id", ""))
        for k in driver.ex_call("GET", "/api-key").get("api-keys", [])
        if k.get("name") == name
    ]


def ensure_role(driver, cluster: str, policy: dict | None = None) -> str:
    """The cluster's role: created when missing (with `policy`, or NOTHING); an existing role's policy is
    replaced by `policy` when one is given, else left as it is."""
    role_id = find_role(driver, cluster)
    if role_id is None:
        op = driver.ex_call(
            "POST",
            "/iam-role",
            {
                "name": resource_name(cluster),
                "description": f"raysweep cluster {cluster}: its own instance pools or instances only",
                "policy": policy if policy is not None else NOTHING,
            },
            what=f"create IAM role {resource_name(cluster)}",
        )
        role_id = str((op.get("reference") or {}).get("id") or find_role(driver, cluster))
        log.info("IAM role %s created (%s)", resource_name(cluster), role_id)
    elif policy is not None:
        driver.ex_call("PUT", f"/iam-role/{role_id}:policy", policy, what=f"update IAM role {role_id}")
    return role_id


def create_key(driver, cluster: str, zone: str, endpoint: str | None, policy: dict | None = None) -> HeadCredentials:
    """A new API key with the cluster's role (its policy set to `policy` when given, see ensure_role); earlier
    keys of the cluster (whose secret is lost) are deleted."""
    role_id = ensure_role(driver, cluster, policy)
    for old in find_keys(driver, cluster):
        delete_key(driver, old.key)
    made = driver.ex_call("POST", "/api-key", {"name": resource_name(cluster), "role-id": role_id})
    log.info("API key %s created for cluster %s", made["key"], cluster)
    return HeadCredentials(
        key=made["key"],
        secret=Secret(made["secret"]),
        zone=zone,
        cluster=cluster,
        endpoint=endpoint,
        role_id=role_id,
        key_name=resource_name(cluster),
    )


def ensure_key_file(
    driver, cluster: str, zone: str, endpoint: str | None, path: Path, policy: dict | None = None
) -> HeadCredentials:
    """The cluster's key in `path` (0600): kept when the file is readable and the key still exists, else a
    new key (a lost local copy of the secret means a new key). `policy`, when given, becomes the role's."""
    try:
        creds = head_credentials.read(path)
    except (FileNotFoundError, ValueError):
        creds = None
    if creds is not None and creds.cluster == cluster and creds.endpoint == endpoint:
        if any(k.key == creds.key for k in find_keys(driver, cluster)):
            if policy is not None:
                ensure_role(driver, cluster, policy)
            return creds
    creds = create_key(driver, cluster, zone, endpoint, policy)
    head_credentials.write(path, creds)
    return creds


def delete_key(driver, key: str) -> bool:
    try:
        driver.ex_call("DELETE", f"/api-key/{key}", what=f"delete API key {key}")
        return True
    except ExoscaleAPIError as e:
        if e.code == 404:
            return False
        raise


def key_copy_path(state_dir: Path) -> Path:
    """The user's machine's copy of the cluster's restricted key (in `state_dir/head/`, which is mounted on an
    autoscaling cluster's head as `~/.raysweep/`); its existence marks a cluster whose head has the key."""
    return state_dir / "head" / Path(head_credentials.HEAD_PATH).name


def delete_keys(driver, cluster: str) -> list[str]:
    """Delete the cluster's API key(s): whoever holds one can do nothing from now on. Returns those this call
    deleted, as "API key KEY" (one gone meanwhile is not counted, so each is reported exactly once)."""
    return [f"API key {k.key}" for k in find_keys(driver, cluster) if delete_key(driver, k.key)]


def exists(driver, cluster: str) -> list[str]:
    """The cluster's API key(s) and role that exist, described; [] too when the caller's key may not read IAM
    (such a key cannot have made them either)."""
    try:
        keys = [f"API key {k.key}" for k in find_keys(driver, cluster)]
        return keys + ([f"IAM role {resource_name(cluster)}"] if find_role(driver, cluster) is not None else [])
    except ExoscaleAPIError as e:
        if e.code == 403:
            return []
        raise


def delete_cluster_iam(driver, cluster: str, state_dir: Path | None = None) -> list[str]:
    """The cluster's restricted key gone for good: its API key(s), then its role, then (given the cluster's
    `state_dir`) the local copy of the key. Idempotent: what is gone already (404) is skipped, so each is
    deleted and reported exactly once however often this runs; other API errors propagate (after the driver's
    retries). Returns what was removed from the API."""
    removed = delete_keys(driver, cluster)
    role_id = find_role(driver, cluster)
    if role_id is not None:
        try:
            driver.ex_call("DELETE", f"/iam-role/{role_id}", what=f"delete IAM role {role_id}")
            removed.append(f"IAM role {resource_name(cluster)}")
        except ExoscaleAPIError as e:
            if e.code != 404:
                raise
    if state_dir is not None:
        key_copy_path(state_dir).unlink(missing_ok=True)
    return removed
