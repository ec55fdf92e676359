"""The per-cluster restricted API key: an IAM role allowing only the compute operations a cluster's head
needs (the autoscaler's node provider and autostop), and an API key with that role.

Made on the user's machine (with the user's key) when a cluster's head is prepared, removed by `down`
(`exoscale.py down` and Ray's `ray down`, both through `delete_cluster_iam`); the head gets only this key,
in its own 0600 file (cloud.head_credentials), of which the user's machine keeps a copy in the cluster's state
(`key_copy_path`). Both are named `raysweep-<cluster>`, so they are found by name even when local state is lost.

The role's policy: every service denied by default; in `compute` only the operations in
COMPUTE_OPERATIONS; in `general` only `get-operation` (polling the asynchronous operations those start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cloud import head_credentials
from cloud.exoscale_driver import ExoscaleAPIError, Secret
from cloud.head_credentials import HeadCredentials
from cloud.names import resource_name

log = logging.getLogger(__name__)

#: What the head may do in the `compute` service: list, read, create, relabel and delete instances.
COMPUTE_OPERATIONS = ("list-instances", "get-instance", "create-instance", "update-instance", "delete-instance")
#: What it may do in the `general` service: follow the operations the above start.
GENERAL_OPERATIONS = ("get-operation",)


def _allow_only(operations: tuple[str, ...]) -> dict:
    names = ", ".join(f"'{op}'" for op in operations)
    return {"type": "rules", "rules": [{"action": "allow", "expression": f"operation in [{names}]"}]}


def policy() -> dict:
    """The role's policy: deny every service, except the operations named above."""
    return {
        "default-service-strategy": "deny",
        "services": {"compute": _allow_only(COMPUTE_OPERATIONS), "general": _allow_only(GENERAL_OPERATIONS)},
    }


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


def ensure_role(driver, cluster: str) -> str:
    """The cluster's role (created when missing; its policy reset to ours when it exists)."""
    role_id = find_role(driver, cluster)
    if role_id is None:
        op = driver.ex_call(
            "POST",
            "/iam-role",
            {
                "name": resource_name(cluster),
                "description": f"raysweep cluster {cluster}: compute instances only",
                "policy": policy(),
            },
            what=f"create IAM role {resource_name(cluster)}",
        )
        role_id = str((op.get("reference") or {}).get("id") or find_role(driver, cluster))
        log.info("IAM role %s created (%s)", resource_name(cluster), role_id)
    else:
        driver.ex_call("PUT", f"/iam-role/{role_id}:policy", policy(), what=f"update IAM role {role_id}")
    return role_id


def create_key(driver, cluster: str, zone: str, endpoint: str | None) -> HeadCredentials:
    """A new API key with the cluster's role; earlier keys of the cluster (whose secret is lost) are deleted."""
    role_id = ensure_role(driver, cluster)
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


def ensure_key_file(driver, cluster: str, zone: str, endpoint: str | None, path: Path) -> HeadCredentials:
    """The cluster's key in `path` (0600): kept when the file is readable and the key still exists, else a
    new key (a lost local copy of the secret means a new key)."""
    try:
        creds = head_credentials.read(path)
    except (FileNotFoundError, ValueError):
        creds = None
    if creds is not None and creds.cluster == cluster and creds.endpoint == endpoint:
        if any(k.key == creds.key for k in find_keys(driver, cluster)):
            return creds
    creds = create_key(driver, cluster, zone, endpoint)
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
