"""A cluster's cloud resources, in SkyPilot's shape: query, run, wait and terminate instances, with any
libcloud NodeDriver that has our `ex_` extras (ExoscaleV2NodeDriver). No SSH here (cloud/ssh_ready.py).

The API is the source of truth: the cluster's instances carry the labels cluster=NAME and
managed-by=raysweep, its security group and SSH key the name raysweep-NAME (and the group a mark in its
description), and are found that way, so `down` removes all of it even when the local state is gone,
and `up` completes a partial cluster instead of duplicating it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeImage, NodeSize
from libcloud.compute.types import NodeState

from cloud import iam, pools
from cloud.config import ClusterSpec
from cloud.exoscale_driver import ExoscaleAPIError, ExoscaleSecurityGroup, md5_fingerprint
from cloud.fanout import fan_out
from cloud.names import MANAGED_BY, cluster_labels, resource_name
from cloud.retry import Progress, StepFailed, Wait, error_text, retry, transient
from cloud.state import ClusterState, NodeRecord, StateStore

log = logging.getLogger(__name__)

GONE_STATES = ("destroying", "destroyed", "expunging")
#: A label only nodes made through Ray's cluster launcher (an autoscaling cluster) carry.
RAY_KIND_LABEL = "ray-node-type"


class ProvisionError(Exception):
    pass


@dataclass
class Journal:
    """What `up` made so far, and what it was making (requests sent, answers not yet back)."""

    made: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)


class Interrupted(Exception):
    """Ctrl-C during `up`, with the journal of what was made when it came."""

    def __init__(self, journal: Journal):
        super().__init__("interrupted")
        self.journal = journal


def group_description(cluster: str) -> str:
    """The mark on the security groups raysweep makes; `down` deletes only a group that carries it."""
    return f"managed-by={MANAGED_BY} cluster={cluster}"


def made_by_raysweep(group: ExoscaleSecurityGroup, cluster: str) -> bool:
    return group.description == group_description(cluster)


def node_names(cluster: str, n: int) -> list[tuple[str, str]]:
    return [(f"{cluster}-head", "head")] + [(f"{cluster}-worker-{i}", "worker") for i in range(1, n)]


def _quiet(name: str, what: str) -> None:
    log.info("%s: %s", name, what)


# --------------------------------------------------------------------------------------------- query


def query_instances(driver, cluster: str, labels: Mapping[str, str] | None = None) -> list[Node]:
    """The cluster's instances (those also carrying `labels`, given), selected by comparing labels here.
    Exoscale's list-instances is not paged, and the wire format of its `labels` filter is not specified, so
    one unfiltered listing compared on this side can neither miss an instance of the cluster nor take one
    of another."""
    want = {**(labels or {}), **cluster_labels(cluster)}
    return [nd for nd in driver.list_nodes() if all(nd.extra["labels"].get(k) == v for k, v in want.items())]


def cluster_yaml_path(state_dir: Path) -> Path:
    """The Ray cluster YAML `up --max-workers` wrote and ran `ray up` on, in the cluster's state."""
    return state_dir / "cluster.yaml"


def is_autoscaling(state_dir: Path, nodes: Iterable[Node] = ()) -> bool:
    """Made by `up --max-workers` (its YAML is in the state `state_dir`) or by `ray up` on a `ray-config` YAML
    (the head's key was made here), or, with no local state, its nodes say so."""
    return (
        cluster_yaml_path(state_dir).exists()
        or iam.key_copy_path(state_dir).exists()
        or any(RAY_KIND_LABEL in n.extra.get("labels", {}) for n in nodes)
    )


def find_security_group(driver, cluster: str) -> ExoscaleSecurityGroup | None:
    name = resource_name(cluster)
    return next((g for g in driver.ex_list_security_groups() if g.name == name), None)


def _record(node: Node, user: str) -> NodeRecord:
    return NodeRecord(
        name=node.name,
        role=node.extra["labels"].get("role", "worker"),
        ip=node.public_ips[0] if node.public_ips else "",
        id=str(node.id),
        user=user,
        state=node.extra.get("state") or "",
    )


def status(driver, spec: ClusterSpec) -> ClusterState:
    """The cluster as the API sees it (and the local cache refreshed from it)."""
    return status_nodes(driver, spec)[0]


def status_nodes(driver, spec: ClusterSpec) -> tuple[ClusterState, list[Node]]:
    """status(), and the instances it was read from (their types and creation times: what they cost)."""
    store = StateStore(spec.state_dir)
    old = store.load()
    users = {n.name: n.user for n in old.nodes} if old else {}
    nodes = query_instances(driver, spec.name)
    state = ClusterState(
        spec.name,
        [_record(nd, users.get(nd.name, "ubuntu")) for nd in nodes],
        old.security_group_id if old else "",
        old.key_name if old else "",
    )
    if nodes:
        store.save(state)
    return state, nodes


# ------------------------------------------------------------------------------- key and group


def ensure_key(driver, spec: ClusterSpec, store: StateStore, progress: Progress) -> tuple[str, Path, bool]:
    """The cluster's key registered under raysweep-NAME: (name, private key path, whether made now)."""
    private = spec.ssh_key or store.ensure_key()
    public = Path(f"{private}.pub").read_text().strip()
    name = resource_name(spec.name)
    existing = {k.name: k for k in driver.list_key_pairs()}
    if name in existing:
        if existing[name].fingerprint and existing[name].fingerprint != md5_fingerprint(public):
            raise ProvisionError(
                f"an SSH key named {name} is registered with another fingerprint "
                f"({existing[name].fingerprint}); the cluster's nodes would not accept {private}. "
                f"Run `down` first, or set ssh_key to the key that was used"
            )
        return name, Path(private), False
    driver.import_key_pair_from_string(name, public)
    progress(name, "SSH key registered")
    return name, Path(private), True


def ensure_security_group(driver, spec: ClusterSpec, progress: Progress) -> tuple[ExoscaleSecurityGroup, bool]:
    """The cluster's group: inbound TCP 22 from the allowed CIDR, and everything between its members.
    Returns it and whether it was made now. A group of that name raysweep did not make is refused."""
    name = resource_name(spec.name)
    group = find_security_group(driver, spec.name)
    made = group is None
    if group is None:
        group = driver.ex_create_security_group(name, group_description(spec.name))
        progress(name, "security group created")
    elif not made_by_raysweep(group, spec.name):
        raise ProvisionError(
            f"a security group named {name} exists that raysweep did not make (its description is "
            f"{group.description!r}, not {group_description(spec.name)!r}); raysweep neither uses nor deletes it. "
            f"Rename or delete it, or choose another cluster name"
        )
    ingress = [r for r in group.rules if r.direction == "ingress"]
    if not any(r.protocol == "tcp" and r.start_port == 22 and r.cidr == spec.ssh_cidr for r in ingress):
        group = driver.ex_add_security_group_rule(
            group, "tcp", 22, 22, cidr=spec.ssh_cidr, description="SSH from the allowed CIDR"
        )
    if not any(r.protocol == "all" and r.source_group_id == group.id for r in ingress):
        group = driver.ex_add_security_group_rule(
            group, "all", source_group=group, description="everything between cluster members"
        )
    unexpected = [
        f"{r.protocol} {r.start_port or ''} from {r.cidr}".replace("  ", " ")
        for r in group.rules
        if r.direction == "ingress"
        and r.cidr
        and not (r.protocol == "tcp" and r.start_port == 22 and r.cidr == spec.ssh_cidr)
    ]
    if unexpected:
        log.warning("security group %s has extra inbound rules not made by raysweep: %s", name, unexpected)
    return group, made


@dataclass
class Shared:
    """What every instance of the cluster is made with: its SSH key and its security group."""

    key_name: str
    key_path: Path
    key_made: bool
    group: ExoscaleSecurityGroup
    group_made: bool


def prepare(driver, spec: ClusterSpec, store: StateStore, progress: Progress, wait: Wait) -> Shared:
    """The cluster's SSH key and security group, each step tried again within `wait` when an operation fails
    (register-ssh-key, create-security-group, add-rule-to-security-group); StepFailed names the step that
    kept failing. Used by `up` and by the node provider's bootstrap."""
    key_name, key_path, key_made = retry(
        f"registering SSH key {resource_name(spec.name)}",
        lambda: ensure_key(driver, spec, store, progress),
        wait,
        progress,
    )
    group, group_made = retry(
        f"preparing security group {resource_name(spec.name)}",
        lambda: ensure_security_group(driver, spec, progress),
        wait,
        progress,
    )
    return Shared(key_name, key_path, key_made, group, group_made)


# ------------------------------------------------------------------------------------ instances


@dataclass
class CreateSpec:
    """What run_instances creates each missing node with."""

    size: NodeSize
    image: NodeImage
    key_name: str
    group: ExoscaleSecurityGroup


def run_instances(
    driver,
    spec: ClusterSpec,
    n: int,
    create: CreateSpec,
    progress: Progress = _quiet,
    journal: Journal | None = None,
) -> tuple[list[Node], dict[str, str], set[str]]:
    """Make the cluster's first n nodes exist: instances a failed operation left in error are replaced,
    missing ones created in parallel; existing ones and extra ones are kept. Returns (every instance of
    the cluster, {node that could not be made: why}, the nodes of those whose error may pass when tried
    again). Each node made is entered in `journal` at once."""
    journal = journal or Journal()
    existing = {nd.name: nd for nd in query_instances(driver, spec.name)}
    for nd in [nd for nd in existing.values() if nd.state in (NodeState.ERROR, NodeState.TERMINATED)]:
        progress(nd.name, f"in state {nd.extra.get('state')}; replacing it")
        err = destroy_instance(driver, nd)
        if err is not None:
            progress(nd.name, f"could not remove it: {err}")
        existing.pop(nd.name)
    wanted = node_names(spec.name, n)
    extra = sorted(nm for nm in existing if nm not in dict(wanted))
    if extra:
        progress(spec.name, f"keeping {len(extra)} node(s) beyond -n {n}: {', '.join(extra)} (down removes them)")
    for nm, _ in wanted:
        if nm in existing:
            progress(nm, f"exists ({existing[nm].extra.get('state')})")
    missing = [(nm, role) for nm, role in wanted if nm not in existing]

    def make_one(item: tuple[str, str]) -> Node:
        nm, role = item
        progress(nm, "creating")
        journal.in_flight.append(nm)
        node = create_instance(
            driver,
            nm,
            create.size,
            create.image,
            key_name=create.key_name,
            group=create.group,
            disk_size=spec.disk_size,
            labels={**spec.labels, **cluster_labels(spec.name), "role": role},
        )
        journal.made.append(f"instance {nm}")
        journal.in_flight.remove(nm)
        progress(
            nm, f"created ({node.extra.get('state')}, {node.public_ips[0] if node.public_ips else 'no address yet'})"
        )
        return node

    failed: dict[str, str] = {}
    retriable: set[str] = set()
    result = fan_out(missing, make_one, name=lambda item: item[0])
    existing.update(result.done)
    for nm, e in result.errors.items():
        if not isinstance(e, (LibcloudError, BaseHTTPError)):
            raise e
        failed[nm] = error_text(e)
        if transient(e):
            retriable.add(nm)
        progress(nm, f"FAILED: {failed[nm]}")
    return [existing[nm] for nm in sorted(existing)], failed, retriable


def wait_instances(
    driver, nodes: list[Node], progress: Progress = _quiet, wait: Wait | None = None
) -> tuple[list[Node], dict[str, str]]:
    """Wait until every node runs (a stopped one is started). Returns (nodes that run, {node that did
    not get there: its state and why}): an instance in error, one that vanished, or one still not
    running when the wait (default 600 s) ends is reported, never passed on quietly."""
    wait = wait or Wait(600.0)
    pending = {nd.id: nd for nd in nodes}
    running: list[Node] = []
    failed: dict[str, str] = {}
    started: set[object] = set()
    while pending:
        for node_id, nd in list(pending.items()):
            if nd.state == NodeState.RUNNING:
                running.append(pending.pop(node_id))
            elif nd.state in (NodeState.ERROR, NodeState.TERMINATED):
                failed[nd.name] = f"instance is in state {nd.extra.get('state')}"
                pending.pop(node_id)
            elif nd.state == NodeState.STOPPED and node_id not in started:
                progress(nd.name, "stopped; starting it")
                started.add(node_id)
                try:
                    driver.start_node(nd)
                except (LibcloudError, BaseHTTPError) as e:
                    failed[nd.name] = f"could not start it: {error_text(e)}"
                    pending.pop(node_id)
        if not pending:
            break
        if wait.over():
            for nd in pending.values():
                failed[nd.name] = f"still {nd.extra.get('state')} after {wait.timeout:g} s"
            break
        wait.beat(progress, "instances", f"waiting for {', '.join(sorted(nd.name for nd in pending.values()))} to run")
        wait.sleep()
        for node_id, nd in list(pending.items()):
            try:
                pending[node_id] = driver.ex_get_node(node_id)
            except ExoscaleAPIError as e:
                if e.code != 404:
                    raise
                failed[nd.name] = "instance vanished (404) while it was awaited"
                pending.pop(node_id)
    for name, why in sorted(failed.items()):
        progress(name, f"FAILED: {why}")
    return sorted(running, key=lambda nd: nd.name), failed


def create_instance(
    driver,
    name: str,
    size: NodeSize,
    image: NodeImage,
    *,
    key_name: str,
    group: ExoscaleSecurityGroup | str,
    disk_size: int,
    labels: Mapping[str, str],
) -> Node:
    """One instance, labelled from the start (never an untagged instance: `labels` must hold the cluster's,
    cluster_labels), with the cluster's SSH key and security group (the group or its id); waits for the
    create operation. Raises the driver's errors (ExoscaleOperationError: the operation failed, and its
    `reference_id` names what it left)."""
    return driver.create_node(
        name,
        size,
        image,
        ex_disk_size=disk_size,
        ex_ssh_keys=[key_name],
        ex_security_groups=[group],
        ex_labels=dict(labels),
    )


def destroy_instance(driver, node: Node | str) -> str | None:
    """Delete one instance (a Node, or its id) and wait for it; None when it is gone, or was already, or is
    being deleted already; else the error."""
    if isinstance(node, str):
        node = Node(node, node, NodeState.UNKNOWN, [], [], driver)
    try:
        driver.destroy_node(node)
        return None
    except ExoscaleAPIError as e:
        return None if e.code in (404, 409) else error_text(e)
    except (LibcloudError, BaseHTTPError) as e:
        return error_text(e)


def terminate_instances(driver, cluster: str, progress: Progress = _quiet, wait: Wait | None = None) -> dict[str, str]:
    """Delete every instance of the cluster, retrying failed deletes, until none is listed or the wait
    (default 300 s) ends. Returns {instance left: why}; empty when all are gone."""
    wait = wait or Wait(300.0)
    last_error: dict[str, str] = {}

    def heartbeat(names: list[str], _elapsed: float = 0.0) -> None:
        wait.beat(progress, "instances", f"waiting for {', '.join(sorted(names))} to be deleted")

    while True:
        nodes = query_instances(driver, cluster)
        if not nodes:
            return {}
        if wait.over():
            return {nd.name: last_error.get(nd.name, f"still {nd.extra.get('state')}") for nd in nodes}
        todo = [nd for nd in nodes if nd.extra.get("state") not in GONE_STATES]
        for nd in todo:
            progress(nd.name, "deleting again" if nd.name in last_error else "deleting")
        result = fan_out(
            todo,
            lambda nd: destroy_instance(driver, nd),
            name=lambda nd: nd.name,
            timeout=wait.left(),
            heartbeat=heartbeat,
            every=min(wait.every, 1.0),
        )
        for nm, err in result.done.items():
            if err is None:
                last_error.pop(nm, None)
                progress(nm, "deleted")
            else:
                last_error[nm] = err
                progress(nm, f"delete failed: {err}; retrying")
        for nm, e in result.errors.items():
            last_error[nm] = error_text(e)
            progress(nm, f"delete failed: {last_error[nm]}; retrying")
        for nm in result.pending:
            last_error[nm] = "its delete operation had not ended"
        if not todo or last_error:  # instances being deleted by someone else, or deletes to retry
            heartbeat([nd.name for nd in nodes])
            wait.sleep()


def delete_security_group(
    driver, cluster: str, progress: Progress = _quiet, wait: Wait | None = None
) -> tuple[bool, str | None]:
    """Delete the cluster's group if raysweep made it, waiting while Exoscale still refuses it because
    instances are being torn down. Returns (whether it was deleted now, the error if it is left)."""
    wait = wait or Wait(300.0)
    group = find_security_group(driver, cluster)
    name = resource_name(cluster)
    if group is None:
        return False, None
    if not made_by_raysweep(group, cluster):
        progress(name, f"left alone: raysweep did not make it (description {group.description!r})")
        return False, None
    while True:
        try:
            driver.ex_delete_security_group(group)
            progress(name, "security group deleted")
            return True, None
        except ExoscaleAPIError as e:
            if e.code == 404:
                return False, None
            if e.code != 409 or wait.over():
                progress(name, f"FAILED: {error_text(e)}")
                return False, error_text(e)
            wait.beat(progress, name, f"still in use, waiting: {error_text(e)}")
        except (LibcloudError, BaseHTTPError) as e:
            if wait.over():
                return False, error_text(e)
            progress(name, f"delete failed: {error_text(e)}; retrying")
        wait.sleep()


# ------------------------------------------------------------------------------------ up / down


@dataclass
class UpResult:
    state: ClusterState
    key_path: Path
    failed: dict[str, str] = field(default_factory=dict)


def up(
    driver,
    spec: ClusterSpec,
    n: int | None = None,
    progress: Progress = _quiet,
    running_timeout: float = 600.0,
) -> UpResult:
    """Key, group, instances created and running, the local state saved. SSH readiness is the next
    step (cloud.ssh_ready). A failed operation is tried again within `running_timeout` (the key and the
    group: StepFailed when they never succeed; an instance: reported in `failed`). Ctrl-C raises
    Interrupted with the journal of what was made."""
    n = n or spec.nodes
    store = StateStore(spec.state_dir)
    store.ensure_dir()
    journal = Journal()
    try:
        size = driver.ex_get_size(spec.instance_type)  # one-line errors listing the valid ones
        image = driver.ex_get_image(spec.template)
        user = image.extra.get("default_user") or "ubuntu"
        wait = Wait(running_timeout)
        shared = prepare(driver, spec, store, progress, wait)
        key_name, key_path, group = shared.key_name, shared.key_path, shared.group
        if shared.key_made:
            journal.made.append(f"SSH key {key_name}")
        if shared.group_made:
            journal.made.append(f"security group {group.name}")
        create = CreateSpec(size, image, key_name, group)
        while True:
            nodes, failed, retriable = run_instances(driver, spec, n, create, progress, journal)
            if not retriable or wait.over():
                break
            progress(spec.name, f"trying again to make {', '.join(sorted(retriable))} ({wait.elapsed():.0f} s so far)")
            wait.sleep()
        for nd in nodes:  # a new machine may reuse an old address
            if f"instance {nd.name}" in journal.made and nd.public_ips:
                store.forget_host(nd.public_ips[0])
        running, not_running = wait_instances(driver, nodes, progress, Wait(running_timeout))
    except KeyboardInterrupt:
        raise Interrupted(journal) from None
    state = ClusterState(spec.name, [_record(nd, user) for nd in running], group.id, key_name)
    store.save(state)
    return UpResult(state, key_path, {**failed, **not_running})


@dataclass
class DownPlan:
    nodes: list[Node]
    group: ExoscaleSecurityGroup | None
    foreign_group: bool  # a group of the cluster's name that raysweep did not make: left alone
    has_key: bool

    @property
    def empty(self) -> bool:
        return not self.nodes and (self.group is None or self.foreign_group) and not self.has_key


def plan_down(driver, cluster: str) -> DownPlan:
    """What `down` would remove: the cluster's instances, its security group, whether its key exists."""
    nodes = query_instances(driver, cluster)
    group = find_security_group(driver, cluster)
    return DownPlan(
        nodes,
        group,
        group is not None and not made_by_raysweep(group, cluster),
        any(k.name == resource_name(cluster) for k in driver.list_key_pairs()),
    )


@dataclass
class DownResult:
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # what is left: why
    elapsed_s: float = 0.0  # how long it tried


def down(driver, spec: ClusterSpec, progress: Progress = _quiet, wait: Wait | None = None) -> DownResult:
    """Remove every instance, the security group and the SSH key of the cluster, retrying what fails,
    until the wait (default 300 s) ends; idempotent, so a second `down` finishes what the first left."""
    wait = wait or Wait(300.0)
    result = DownResult()
    try:  # an autoscaling cluster's instance pools first: else they would make new members as these go
        gone, kept = pools.delete_pools(driver, spec.name, progress)
    except (LibcloudError, BaseHTTPError) as e:
        gone, kept = [], {f"instance pools of {spec.name}": error_text(e)}
    result.removed += gone
    result.failed.update(kept)
    before = {nd.name for nd in query_instances(driver, spec.name)}
    left = terminate_instances(driver, spec.name, progress, wait)
    result.removed += [f"instance {nm}" for nm in sorted(before - set(left))]
    result.failed.update({f"instance {nm}": why for nm, why in left.items()})
    name = resource_name(spec.name)
    if left or kept:  # the group cannot go while instances or pools use it
        group = find_security_group(driver, spec.name)
        if group is not None and made_by_raysweep(group, spec.name):
            result.failed[f"security group {name}"] = "kept until the instances are gone"
    else:
        deleted, err = delete_security_group(driver, spec.name, progress, wait)
        if err is not None:
            result.failed[f"security group {name}"] = err
        elif deleted:
            result.removed.append(f"security group {name}")
    try:
        if retry(f"deleting SSH key {name}", lambda: delete_key(driver, name), wait, progress, name):
            result.removed.append(f"SSH key {name}")
            progress(name, "SSH key deleted")
    except StepFailed as e:
        result.failed[f"SSH key {name}"] = f"{e.error} ({e.tries} tries)"
    except (LibcloudError, BaseHTTPError) as e:
        result.failed[f"SSH key {name}"] = error_text(e)
    if not result.failed:
        StateStore(spec.state_dir).remove(keep_key=spec.ssh_key is not None)
    result.elapsed_s = wait.elapsed()
    return result


def delete_key(driver, name: str) -> bool:
    """Delete the SSH key `name`; False when there is none (any more)."""
    if not any(k.name == name for k in driver.list_key_pairs()):
        return False
    try:
        driver.delete_key_pair(name)
    except ExoscaleAPIError as e:
        if e.code != 404:
            raise
        return False
    return True


def leftovers(driver, cluster: str) -> list[str] | None:
    """When the cluster has no instances left but its security group, SSH key or restricted key remain (what
    an autostop leaves for `down`), their descriptions; None when instances exist or nothing is left."""
    plan = plan_down(driver, cluster)
    if plan.nodes:
        return None
    group = plan.group is not None and not plan.foreign_group
    name = resource_name(cluster)
    rest = [f"instance pool {p.name}" for p in pools.find_pools(driver, cluster).values()]
    rest += [f"security group {name}"] * group + [f"SSH key {name}"] * plan.has_key
    if iam.exists(driver, cluster):
        rest.append(f"restricted API key and IAM role {name}")
    return rest or None
