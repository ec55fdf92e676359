"""The state of a simulated Exoscale account: resources, their rules, asynchronous operations, and its
IAM (roles and API keys, cloud.sim.iam).

Knows nothing of HTTP (the split moto uses): cloud.sim.responses turns requests into calls of this model
and its results into responses. Changes that Exoscale makes asynchronously are operations: pending
for `op_delay_s`, then applied (success) or, when a failure is injected, failed with a reason.
Operations advance whenever the model is used, so the model needs no thread of its own.

Hooks (InstanceHooks) are called, under the model's lock, when an instance is created, becomes
running, is stopped and is destroyed: cloud.sim.hosts boots each instance as a local host there.

Instance pools (Exoscale's managed groups of identical instances, one zone each) keep their members as
ordinary instances carrying the pool as their `manager`, so a member boots, lists and is read like any
instance. See InstancePool for what is assumed where Exoscale's documentation is silent.

One organization, seen per zone (Model.in_zone): SSH keys, security groups, IAM, quotas and the type table
are the organization's; instances and pools belong to the zone they were made in and are found only
there. Which types a zone offers is the type table's (cloud.sim.instance_types); how many more instances of
a type a zone can give is Faults.capacity; the organization's limits are Model.quotas (check_room).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cloud.sim.errors import ModelError
from cloud.sim.iam import IAM, APIKey, Role
from cloud.sim.instance_types import ALL_ZONES, AUTHORIZED_FAMILIES, FAMILY_ZONES, INSTANCE_TYPES, GiB

__all__ = ["IAM", "APIKey", "Faults", "Instance", "InstancePool", "Model", "ModelError", "Operation", "Role"]

ZONES = ALL_ZONES

_NS = uuid.UUID("7b0c6bde-4f3e-4c59-9c1e-4d8f2f0a5e11")


class _Unset:
    """The value of an optional argument left out (where None has a meaning of its own)."""


UNSET = _Unset()


def _check_base64(user_data: str) -> None:
    try:
        base64.b64decode(user_data, validate=True)
    except ValueError:
        raise ModelError("invalid", "user-data must be base64-encoded") from None


def _check_size(size: int) -> None:
    if size < 0:
        raise ModelError("invalid", f"size {size}: expected 0 or more")


def _stable_id(kind: str, name: str) -> str:
    return str(uuid.uuid5(_NS, f"{kind}/{name}"))


def _now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class InstanceType:
    id: str
    family: str
    size: str
    cpus: int
    memory: int
    zones: tuple[str, ...] = ZONES
    authorized: bool = True
    gpus: int = 0

    @property
    def name(self) -> str:
        return f"{self.family}.{self.size}"


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    family: str
    version: str
    default_user: str
    size: int
    visibility: str = "public"
    boot_mode: str = "legacy"
    zones: tuple[str, ...] = ZONES
    build: str = "2026-10-01-0"


@dataclass
class SSHKey:
    name: str
    public_key: str
    fingerprint: str


@dataclass
class Rule:
    id: str
    flow_direction: str
    protocol: str
    network: str | None = None
    security_group_id: str | None = None
    start_port: int | None = None
    end_port: int | None = None
    icmp: dict | None = None
    description: str = ""


@dataclass
class SecurityGroup:
    id: str
    name: str
    description: str = ""
    rules: list[Rule] = field(default_factory=list)


@dataclass
class Instance:
    id: str
    name: str
    instance_type: InstanceType
    template: Template
    disk_size: int
    state: str
    created_at: str
    labels: dict[str, str] = field(default_factory=dict)
    ssh_keys: list[str] = field(default_factory=list)
    security_group_ids: list[str] = field(default_factory=list)
    user_data: str | None = None  # base64, as given
    public_ip_assignment: str = "inet4"
    public_ip: str | None = None
    manager_id: str | None = None  # the instance pool this instance is a member of
    zone: str = "ch-gva-2"


@dataclass
class InstancePool:
    """An instance pool: the template of its members and the ids of its members, oldest first.

    As Exoscale documents it: one zone; `size` members are kept; a change of the instance type (and here of
    any member setting: template, disk, keys, groups, user data, labels) applies to new members only,
    existing ones stay untouched; members are named with `instance-prefix` (default `pool`).
    Assumed where the documentation is silent: members are named `PREFIX-XXXXX-YYYYY` (the first five
    characters of the pool's id, then five random letters; the form remembered from Exoscale's listings,
    not confirmed by its documentation, which says only that the prefix defaults to `pool`); they carry
    the pool's labels when they are made; scaling down removes the newest members first; deleting a member
    with delete-instance removes it from the pool and lowers its size by one, as an eviction does.
    """

    id: str
    name: str
    instance_type: InstanceType
    template: Template
    disk_size: int
    size: int
    state: str  # creating, running, scaling-up, scaling-down, updating, destroying, suspended
    description: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ssh_keys: list[str] = field(default_factory=list)
    security_group_ids: list[str] = field(default_factory=list)
    user_data: str | None = None
    public_ip_assignment: str = "inet4"
    instance_prefix: str = "pool"
    min_available: int | None = None
    instance_ids: list[str] = field(default_factory=list)
    zone: str = "ch-gva-2"


@dataclass
class Operation:
    id: str
    state: str  # pending, success, failure
    reference_id: str | None
    reference_kind: str  # instance, security-group, ssh-key
    command: str
    ready_at: float
    on_success: Callable[[], None] | None = None
    on_failure: Callable[[], None] | None = None
    reason: str | None = None
    message: str | None = None
    fail: bool = False
    fail_reason: str = "fault"  # the reason and message a failure gives (an injected fault's by default)
    fail_message: str | None = None


class InstanceHooks:
    """Override to give instances a life outside the model (cloud.sim.hosts boots local hosts)."""

    def allocate_ip(self, instance: Instance) -> str | None:
        return None  # None: the model picks one from its own pool

    def on_running(self, instance: Instance) -> None: ...

    def on_stopped(self, instance: Instance) -> None: ...

    def on_destroyed(self, instance: Instance) -> None: ...


LABELS_FILTER_MODES = ("exact", "ignore", "any")
CAPACITY_ANSWERS = ("request", "operation")


@dataclass
class Faults:
    """Faults of the model: operations that end in failure, and how long operations take."""

    op_delay_s: float = 0.2
    op_delays: dict[str, float] = field(default_factory=dict)  # command (e.g. "create-instance") -> its delay
    op_failure_rate: float = 0.0
    fail_next_ops: int = 0  # the next N operations fail, whatever the rate
    fail_ops_matching: str = ""  # only operations whose command contains this text count for fail_next_ops
    # How list-instances treats its `labels` filter, whose wire format the spec leaves open (a bare string):
    # "exact" (every key=value pair must match: what this sim assumes Exoscale does), "ignore" (the filter is
    # dropped: every instance is listed), "any" (an instance matching any one pair is listed). For testing
    # clients that must not depend on the server's reading of the filter.
    labels_filter: str = "exact"
    # What a zone can still give: "family.size@zone" -> how many instances of that type may exist there at
    # once (0: none at all). A type and zone not named have room without limit. A create, or a pool's
    # growth, past it is refused as out of capacity (see Model.check_room).
    capacity: dict[str, int] = field(default_factory=dict)
    # How create-instance says a zone lacks capacity, which Exoscale does not document: "request" (the
    # request is refused, 500) or "operation" (accepted, then its operation fails with reason
    # `unavailable` and the instance is gone). For clients that must cope with either. Pools: always
    # "request".
    capacity_answer: str = "request"

    def __post_init__(self) -> None:
        if self.labels_filter not in LABELS_FILTER_MODES:
            raise ValueError(f"labels_filter {self.labels_filter!r}: expected one of {', '.join(LABELS_FILTER_MODES)}")
        if self.capacity_answer not in CAPACITY_ANSWERS:
            raise ValueError(f"capacity_answer {self.capacity_answer!r}: expected one of {', '.join(CAPACITY_ANSWERS)}")
        for key, count in self.capacity.items():
            parse_capacity_key(key)
            if count < 0:
                raise ValueError(f"capacity {key}={count}: give a number of instances >= 0")


# The organization's quotas the sim keeps, as Exoscale names them in list-quotas (the `exo limits` command's
# resource names): instances in all zones, GPUs of all families, and GPUs per GPU family.
QUOTA_RESOURCES = ("instance", "gpu", "gpu2", "gpu3", "gpu3080ti", "gpua30", "gpua5000", "gpurtx6000pro")
UNLIMITED = -1  # the spec's "limit": -1 for unlimited


def parse_capacity_key(key: str) -> tuple[str, str]:
    """("family.size", "zone") of a capacity key "family.size@zone"; ValueError naming what is valid."""
    type_name, at, zone = key.partition("@")
    if not at:
        raise ValueError(f"capacity {key!r}: expected TYPE@ZONE, e.g. gpu3.small@de-fra-1")
    zones_of = {f"{family}.{size}": FAMILY_ZONES[family] for family, size, *_ in INSTANCE_TYPES}
    if type_name not in zones_of:
        families = sorted({name.partition(".")[0] for name in zones_of})
        raise ValueError(
            f"capacity {key!r}: unknown instance type {type_name!r}; types are FAMILY.SIZE, families: "
            f"{', '.join(families)}"
        )
    if zone not in ZONES:
        raise ValueError(f"capacity {key!r}: unknown zone {zone!r}; valid: {', '.join(ZONES)}")
    if zone not in zones_of[type_name]:
        raise ValueError(
            f"capacity {key!r}: {type_name} is not offered in {zone}, only in {', '.join(zones_of[type_name])}"
        )
    return type_name, zone


class Model:
    def __init__(
        self,
        zone: str = "ch-gva-2",
        faults: Faults | None = None,
        hooks: InstanceHooks | None = None,
        seed: int | None = None,
        ip_network: str = "10.77.0.0/16",
        authorized_families: Iterable[str] = (),
        quotas: dict[str, int] | None = None,
    ):
        """`authorized_families`: instance type families this account may use beyond the public ones (the
        GPU families need Exoscale's authorization). `quotas`: limits of the organization by resource (see
        QUOTA_RESOURCES); the others are unlimited, as Exoscale's own defaults are not published.

        `zone` is the zone this Model object serves; in_zone() gives the same account seen from another."""
        quotas = dict(quotas or {})
        for resource, limit in quotas.items():
            if resource not in QUOTA_RESOURCES:
                raise ValueError(f"quota {resource!r}: unknown resource; valid: {', '.join(QUOTA_RESOURCES)}")
            if limit < UNLIMITED:
                raise ValueError(f"quota {resource}={limit}: give a limit >= 0, or -1 for unlimited")
        self.quotas = {r: quotas.get(r, UNLIMITED) for r in QUOTA_RESOURCES}
        if zone not in ZONES:
            raise ValueError(f"unknown zone {zone!r}; valid: {', '.join(ZONES)}")
        self.zone = zone
        self.faults = faults or Faults()
        self.hooks = hooks or InstanceHooks()
        self.rng = random.Random(seed)
        self.lock = threading.RLock()
        self.instance_types = {t.id: t for t in self._catalogue_types(AUTHORIZED_FAMILIES | set(authorized_families))}
        self.templates = {t.id: t for t in self._catalogue_templates()}
        self.ssh_keys: dict[str, SSHKey] = {}
        self.security_groups: dict[str, SecurityGroup] = {}
        self.instances: dict[str, Instance] = {}
        self.instance_pools: dict[str, InstancePool] = {}
        self.operations: dict[str, Operation] = {}
        self._ips: Iterator = ipaddress.ip_network(ip_network).hosts()
        self._ips_in_use: set[str] = set()
        self.iam = IAM()

    def in_zone(self, zone: str) -> Model:
        """The same account as the API of `zone` serves it: SSH keys, security groups, IAM, quotas and the
        type table are the organization's (shared), instances and instance pools are listed and found only
        in their own zone. A view: it shares every piece of state with this Model."""
        if zone == self.zone:
            return self
        if zone not in ZONES:
            raise ValueError(f"unknown zone {zone!r}; valid: {', '.join(ZONES)}")
        view = copy.copy(self)
        view.zone = zone
        return view

    # ------------------------------------------------------------------------------- catalogue
    @staticmethod
    def _catalogue_types(authorized_families: frozenset[str]) -> list[InstanceType]:
        return [
            InstanceType(_stable_id("type", f"{family}.{size}"), family, size, cpus, memory,
                         zones=FAMILY_ZONES[family], authorized=family in authorized_families, gpus=gpus)
            for family, size, cpus, memory, gpus in INSTANCE_TYPES
        ]  # fmt: skip

    @staticmethod
    def _catalogue_templates() -> list[Template]:
        rows = [
            ("Linux Ubuntu 22.04 LTS 64-bit", "ubuntu", "22.04", "ubuntu"),
            ("Linux Ubuntu 24.04 LTS 64-bit", "ubuntu", "24.04", "ubuntu"),
            ("Linux Debian 12 (bookworm) 64-bit", "debian", "12", "debian"),
        ]
        return [Template(_stable_id("template", n), n, fam, ver, user, 10 * GiB) for n, fam, ver, user in rows]

    # ------------------------------------------------------------------------------ operations
    def tick(self) -> None:
        """Apply every pending operation whose time has come."""
        with self.lock:
            now = time.monotonic()
            for op in list(self.operations.values()):
                if op.state == "pending" and op.ready_at <= now:
                    if op.fail:
                        op.state, op.reason = "failure", op.fail_reason
                        op.message = op.fail_message or f"{op.command} failed (injected fault)"
                        if op.on_failure:
                            op.on_failure()
                    else:
                        op.state = "success"
                        if op.on_success:
                            op.on_success()

    def _operation(
        self, kind: str, ref: str | None, command: str, on_success=None, on_failure=None, may_fail: bool = True
    ) -> Operation:
        """A pending operation. `may_fail=False` for the model's own internal steps that no fault may break
        halfway (a pool member's removal: the pool has already let it go)."""
        f = self.faults
        fail = may_fail and self.rng.random() < f.op_failure_rate
        if may_fail and f.fail_next_ops > 0 and f.fail_ops_matching in command:
            f.fail_next_ops -= 1
            fail = True
        op = Operation(
            str(uuid.uuid4()),
            "pending",
            ref,
            kind,
            command,
            time.monotonic() + f.op_delays.get(command, f.op_delay_s),
            on_success,
            on_failure,
            fail=fail,
        )
        self.operations[op.id] = op
        return op

    def get_operation(self, op_id: str) -> Operation:
        with self.lock:
            self.tick()
            op = self.operations.get(op_id)
            if op is None:
                raise ModelError("not-found", f"operation {op_id} not found")
            return op

    # ------------------------------------------------------------------------------- catalogue
    def list_instance_types(self) -> list[InstanceType]:
        return list(self.instance_types.values())

    def get_instance_type(self, type_id: str) -> InstanceType:
        t = self.instance_types.get(type_id)
        if t is None:
            raise ModelError("not-found", f"instance type {type_id} not found")
        return t

    # ---------------------------------------------------------------------- quotas and capacity
    def quota_usage(self, resource: str) -> int:
        """How much of `resource` the organization uses now, in every zone."""
        with self.lock:
            if resource not in QUOTA_RESOURCES:
                raise ModelError("not-found", f"quota {resource!r} not found; known: {', '.join(QUOTA_RESOURCES)}")
            instances = list(self.instances.values())
            if resource == "instance":
                return len(instances)
            return sum(
                i.instance_type.gpus for i in instances if resource == "gpu" or i.instance_type.family == resource
            )

    def list_quotas(self) -> list[tuple[str, int, int]]:
        """(resource, usage, limit) of every quota; limit -1 is unlimited."""
        with self.lock:
            self.tick()
            return [(r, self.quota_usage(r), self.quotas[r]) for r in QUOTA_RESOURCES]

    def get_quota(self, resource: str) -> tuple[str, int, int]:
        with self.lock:
            self.tick()
            return resource, self.quota_usage(resource), self.quotas[resource]

    def capacity_shortfall(self, itype: InstanceType, count: int, zone: str) -> str | None:
        """Why `zone` cannot give `count` more instances of `itype` now (Faults.capacity), or None."""
        capacity = self.faults.capacity.get(f"{itype.name}@{zone}")
        if capacity is None or count <= 0:
            return None
        used = sum(1 for i in self.instances.values() if i.zone == zone and i.instance_type.id == itype.id)
        if used + count <= capacity:
            return None
        return f"Insufficient capacity: zone {zone} cannot provide {count} more {itype.name} instance(s) at the moment"

    def check_room(self, itype: InstanceType, count: int, zone: str, capacity: bool = True) -> None:
        """Refuse `count` more instances of `itype` in `zone` past the zone's capacity (Faults.capacity:
        ModelError kind "capacity"; not checked with capacity=False) or past a quota of the organization
        (kind "quota")."""
        if count <= 0:
            return
        shortfall = self.capacity_shortfall(itype, count, zone) if capacity else None
        if shortfall:
            raise ModelError("capacity", shortfall)
        needs = {"instance": count}
        if itype.gpus:
            needs["gpu"] = needs[itype.family] = itype.gpus * count
        for resource, need in needs.items():
            limit = self.quotas.get(resource, UNLIMITED)
            if limit == UNLIMITED:
                continue
            usage = self.quota_usage(resource)
            if usage + need > limit:
                raise ModelError(
                    "quota",
                    f"Quota exceeded for resource {resource}: limit {limit}, in use {usage}, requested {need} more",
                )

    def list_templates(self, visibility: str | None = None, family: str | None = None) -> list[Template]:
        return [
            t for t in self.templates.values() if (visibility in (None, t.visibility)) and (family in (None, t.family))
        ]

    def get_template(self, template_id: str) -> Template:
        t = self.templates.get(template_id)
        if t is None:
            raise ModelError("not-found", f"template {template_id} not found")
        return t

    # -------------------------------------------------------------------------------- ssh keys
    def register_ssh_key(self, name: str, public_key: str) -> Operation:
        with self.lock:
            self.tick()
            if name in self.ssh_keys:
                raise ModelError("conflict", f"an SSH key named {name!r} already exists")
            parts = public_key.split()
            try:
                blob = base64.b64decode(parts[1], validate=True) if len(parts) >= 2 else b""
            except ValueError:
                blob = b""
            if not parts or not parts[0].startswith(("ssh-", "ecdsa-")) or not blob:
                raise ModelError("invalid", "public-key is not an OpenSSH public key")
            fp = hashlib.md5(blob).hexdigest()
            self.ssh_keys[name] = SSHKey(name, public_key, ":".join(fp[i : i + 2] for i in range(0, 32, 2)))
            return self._operation("ssh-key", None, "register-ssh-key")

    def list_ssh_keys(self) -> list[SSHKey]:
        with self.lock:
            self.tick()
            return list(self.ssh_keys.values())

    def get_ssh_key(self, name: str) -> SSHKey:
        with self.lock:
            self.tick()
            if name not in self.ssh_keys:
                raise ModelError("not-found", f"SSH key {name!r} not found")
            return self.ssh_keys[name]

    def delete_ssh_key(self, name: str) -> Operation:
        with self.lock:
            self.get_ssh_key(name)
            return self._operation("ssh-key", None, "delete-ssh-key", on_success=lambda: self.ssh_keys.pop(name, None))

    # ------------------------------------------------------------------------- security groups
    def create_security_group(self, name: str, description: str = "") -> Operation:
        with self.lock:
            self.tick()
            if any(g.name == name for g in self.security_groups.values()):
                raise ModelError("conflict", f"a security group named {name!r} already exists")
            g = SecurityGroup(str(uuid.uuid4()), name, description)
            self.security_groups[g.id] = g
            return self._operation("security-group", g.id, "create-security-group")

    def list_security_groups(self) -> list[SecurityGroup]:
        with self.lock:
            self.tick()
            return list(self.security_groups.values())

    def get_security_group(self, group_id: str) -> SecurityGroup:
        with self.lock:
            self.tick()
            g = self.security_groups.get(group_id)
            if g is None:
                raise ModelError("not-found", f"security group {group_id} not found")
            return g

    def _security_group_named(self, name: str) -> SecurityGroup:
        for g in self.security_groups.values():
            if g.name == name:
                return g
        raise ModelError("not-found", f"security group {name!r} not found")

    def delete_security_group(self, group_id: str) -> Operation:
        with self.lock:
            self.get_security_group(group_id)
            users = [i.name for i in self.instances.values() if group_id in i.security_group_ids]
            if users:
                raise ModelError("conflict", f"security group {group_id} is in use by instance(s) {', '.join(users)}")
            pools = [p.name for p in self.instance_pools.values() if group_id in p.security_group_ids]
            if pools:
                raise ModelError(
                    "conflict", f"security group {group_id} is in use by instance pool(s) {', '.join(pools)}"
                )
            referring = [
                g.name
                for g in self.security_groups.values()
                if g.id != group_id and any(r.security_group_id == group_id for r in g.rules)
            ]
            if referring:
                raise ModelError("conflict", f"security group {group_id} is a rule source of {', '.join(referring)}")
            return self._operation(
                "security-group",
                group_id,
                "delete-security-group",
                on_success=lambda: self.security_groups.pop(group_id, None),
            )

    def add_rule(
        self,
        group_id: str,
        flow_direction: str,
        protocol: str,
        network: str | None = None,
        source_group_id: str | None = None,
        start_port: int | None = None,
        end_port: int | None = None,
        icmp: dict | None = None,
        description: str = "",
        source_group_name: str | None = None,
    ) -> Operation:
        """A rule whose source is a CIDR (`network`) or a security group, by id or by name."""
        with self.lock:
            g = self.get_security_group(group_id)
            if source_group_id is None and source_group_name is not None:
                source_group_id = self._security_group_named(source_group_name).id
            if (network is None) == (source_group_id is None):
                raise ModelError("invalid", "a rule needs exactly one of network or security-group")
            if network is not None:
                try:
                    ipaddress.ip_network(network, strict=False)
                except ValueError:
                    raise ModelError("invalid", f"network {network!r} is not a CIDR") from None
            if source_group_id is not None:
                self.get_security_group(source_group_id)
            if protocol in ("tcp", "udp"):
                if start_port is None or end_port is None or start_port > end_port:
                    raise ModelError("invalid", f"a {protocol} rule needs start-port <= end-port")
            elif start_port is not None or end_port is not None:
                raise ModelError("invalid", f"ports make no sense for protocol {protocol}")
            rule = Rule(
                str(uuid.uuid4()),
                flow_direction,
                protocol,
                network,
                source_group_id,
                start_port,
                end_port,
                icmp,
                description,
            )
            g.rules.append(rule)
            self._rules_changed(group_id)
            return self._operation("security-group", group_id, "add-rule-to-security-group")

    def delete_rule(self, group_id: str, rule_id: str) -> Operation:
        with self.lock:
            g = self.get_security_group(group_id)
            if not any(r.id == rule_id for r in g.rules):
                raise ModelError("not-found", f"rule {rule_id} not found in security group {group_id}")
            g.rules = [r for r in g.rules if r.id != rule_id]
            self._rules_changed(group_id)
            return self._operation("security-group", group_id, "delete-rule-from-security-group")

    def _rules_changed(self, group_id: str) -> None:
        for inst in self.instances.values():
            if inst.state == "running" and any(
                group_id in (gid, *self._sources_of(gid)) for gid in inst.security_group_ids
            ):
                self.hooks.on_running(inst)  # hosts re-apply their firewall

    def _sources_of(self, group_id: str) -> list[str]:
        g = self.security_groups.get(group_id)
        return [r.security_group_id for r in g.rules if r.security_group_id] if g else []

    # ------------------------------------------------------------------------------- instances
    def create_instance(
        self,
        name: str,
        instance_type_id: str,
        template_id: str,
        disk_size: int,
        ssh_keys: Sequence[str] = (),
        security_group_ids: Sequence[str] = (),
        labels: dict[str, str] | None = None,
        user_data: str | None = None,
        public_ip_assignment: str = "inet4",
    ) -> Operation:
        with self.lock:
            self.tick()
            itype, tmpl = self._check_instance_spec(
                instance_type_id, template_id, disk_size, ssh_keys, security_group_ids, user_data
            )
            late = self.faults.capacity_answer == "operation"
            shortfall = self.capacity_shortfall(itype, 1, self.zone) if late else None
            self.check_room(itype, 1, self.zone, capacity=not late)
            inst = self._add_instance(
                name, itype, tmpl, disk_size, ssh_keys, security_group_ids, labels, user_data, public_ip_assignment
            )
            if shortfall:
                return self._unplaced(inst, shortfall)
            return self._boot(inst)

    def _unplaced(self, inst: Instance, shortfall: str) -> Operation:
        """The create operation of an instance the zone has no room for: it fails (reason `unavailable`) and
        the instance is gone (Faults.capacity_answer "operation")."""

        op = self._operation(
            "instance", inst.id, "create-instance", on_failure=lambda: self._forget(inst), may_fail=False
        )
        op.fail, op.fail_reason, op.fail_message = True, "unavailable", shortfall
        return op

    def _check_instance_spec(
        self,
        instance_type_id: str,
        template_id: str,
        disk_size: int,
        ssh_keys: Sequence[str],
        security_group_ids: Sequence[str],
        user_data: str | None,
    ) -> tuple[InstanceType, Template]:
        """What an instance (or a pool's member) is made of, checked: its type and template."""
        itype = self.get_instance_type(instance_type_id)
        if not itype.authorized:
            raise ModelError(
                "forbidden",
                f"instance type {itype.family}.{itype.size} needs Exoscale's authorization for this account",
            )
        tmpl = self.get_template(template_id)
        if self.zone not in itype.zones:
            raise ModelError(
                "invalid",
                f"instance type {itype.name} is not available in zone {self.zone} (offered in {', '.join(itype.zones)})",
            )
        if self.zone not in tmpl.zones:
            raise ModelError("invalid", f"template {tmpl.name!r} is not available in zone {self.zone}")
        if disk_size * GiB < tmpl.size:
            raise ModelError(
                "invalid", f"disk-size {disk_size} GiB is smaller than the template ({tmpl.size // GiB} GiB)"
            )
        for k in ssh_keys:
            if k not in self.ssh_keys:
                raise ModelError("not-found", f"SSH key {k!r} not found")
        for gid in security_group_ids:
            self.get_security_group(gid)
        if user_data is not None:
            _check_base64(user_data)
        return itype, tmpl

    def _add_instance(
        self,
        name: str,
        itype: InstanceType,
        tmpl: Template,
        disk_size: int,
        ssh_keys: Sequence[str],
        security_group_ids: Sequence[str],
        labels: dict[str, str] | None,
        user_data: str | None,
        public_ip_assignment: str,
        manager_id: str | None = None,
        zone: str | None = None,
    ) -> Instance:
        inst = Instance(
            str(uuid.uuid4()),
            name,
            itype,
            tmpl,
            disk_size,
            "starting",
            _now_iso(),
            dict(labels or {}),
            list(ssh_keys),
            list(security_group_ids),
            user_data,
            public_ip_assignment,
            manager_id=manager_id,
            zone=zone or self.zone,
        )
        if public_ip_assignment != "none":
            inst.public_ip = self.hooks.allocate_ip(inst) or self._next_ip()
            self._ips_in_use.add(inst.public_ip)
        self.instances[inst.id] = inst
        return inst

    def _boot(self, inst: Instance) -> Operation:
        """The operation that makes a new instance running (or `error`, when it fails)."""

        def running():
            if inst.state == "starting":
                inst.state = "running"
                self.hooks.on_running(inst)

        def failed():
            if inst.state == "starting":
                inst.state = "error"

        return self._operation("instance", inst.id, "create-instance", running, failed)

    def _next_ip(self) -> str:
        for ip in self._ips:
            if str(ip) not in self._ips_in_use:
                return str(ip)
        raise ModelError("invalid", "no public IP address left in the simulated pool")

    def list_instances(self, labels: dict[str, str] | None = None, ip_address: str | None = None) -> list[Instance]:
        with self.lock:
            self.tick()
            return [
                i
                for i in self.instances.values()
                if i.zone == self.zone and self._labels_match(i.labels, labels) and ip_address in (None, i.public_ip)
            ]

    def _labels_match(self, have: dict[str, str], wanted: dict[str, str] | None) -> bool:
        mode = self.faults.labels_filter
        if not wanted or mode == "ignore":
            return True
        if mode == "any":
            return any(have.get(k) == v for k, v in wanted.items())
        return all(have.get(k) == v for k, v in wanted.items())

    def update_instance(
        self,
        instance_id: str,
        name: str | None = None,
        labels: dict[str, str] | _Unset | None = UNSET,
        user_data: str | None = None,
    ) -> Operation:
        """Change name, labels or user data. `labels` replaces the whole map, as Exoscale does (the spec
        makes the field nullable: null or {} clears it); left out, the labels stay."""
        with self.lock:
            inst = self.get_instance(instance_id)
            if inst.state in ("destroying", "destroyed"):
                raise ModelError("conflict", f"instance {instance_id} is {inst.state}")
            if user_data is not None:
                _check_base64(user_data)

            def apply() -> None:
                if name is not None:
                    inst.name = name
                if not isinstance(labels, _Unset):
                    inst.labels = dict(labels or {})
                if user_data is not None:
                    inst.user_data = user_data

            return self._operation("instance", instance_id, "update-instance", apply)

    def get_instance(self, instance_id: str) -> Instance:
        with self.lock:
            self.tick()
            inst = self.instances.get(instance_id)
            if inst is None or inst.zone != self.zone:
                raise ModelError("not-found", f"instance {instance_id} not found")
            return inst

    def delete_instance(self, instance_id: str) -> Operation:
        """A pool's member leaves its pool at once, the pool's size lowered by one (see InstancePool)."""
        with self.lock:
            inst = self.get_instance(instance_id)
            if inst.state == "destroying":
                raise ModelError("conflict", f"instance {instance_id} is already being destroyed")
            previous = inst.state
            pool = self.instance_pools.get(inst.manager_id or "")
            if pool is not None and instance_id in pool.instance_ids:
                pool.instance_ids.remove(instance_id)
                pool.size -= 1
            else:
                pool = None

            def failed():
                inst.state = previous
                if pool is not None and pool.id in self.instance_pools:
                    pool.instance_ids.append(instance_id)
                    pool.size += 1

            return self._destroy(inst, "delete-instance", failed)

    def _destroy(self, inst: Instance, command: str, on_failure: Callable[[], None] | None = None) -> Operation:
        """Mark an instance destroying; the operation that removes it (it cannot fail without on_failure)."""
        inst.state = "destroying"
        return self._operation(
            "instance", inst.id, command, lambda: self._forget(inst), on_failure, may_fail=on_failure is not None
        )

    def _forget(self, inst: Instance) -> None:
        """An instance is gone: out of the model, its address free, its host (if any) removed."""
        self.instances.pop(inst.id, None)
        if inst.public_ip:
            self._ips_in_use.discard(inst.public_ip)
        inst.state = "destroyed"
        self.hooks.on_destroyed(inst)

    def _transition(
        self,
        instance_id: str,
        allowed: tuple[str, ...],
        during: str,
        after: str,
        command: str,
        hook: Callable[[Instance], None],
    ) -> Operation:
        with self.lock:
            inst = self.get_instance(instance_id)
            if inst.state not in allowed:
                raise ModelError(
                    "conflict", f"instance {instance_id} is {inst.state}; {command} needs {' or '.join(allowed)}"
                )
            previous = inst.state
            inst.state = during

            def done():
                inst.state = after
                hook(inst)

            def failed():
                inst.state = previous

            return self._operation("instance", instance_id, command, done, failed)

    def start_instance(self, instance_id: str) -> Operation:
        return self._transition(
            instance_id, ("stopped",), "starting", "running", "start-instance", self.hooks.on_running
        )

    def stop_instance(self, instance_id: str) -> Operation:
        return self._transition(
            instance_id, ("running",), "stopping", "stopped", "stop-instance", self.hooks.on_stopped
        )

    def reboot_instance(self, instance_id: str) -> Operation:
        def reboot(inst):
            self.hooks.on_stopped(inst)
            self.hooks.on_running(inst)

        return self._transition(instance_id, ("running",), "starting", "running", "reboot-instance", reboot)

    # -------------------------------------------------------------------------- instance pools
    def create_instance_pool(
        self,
        name: str,
        instance_type_id: str,
        template_id: str,
        disk_size: int,
        size: int,
        description: str | None = None,
        labels: dict[str, str] | None = None,
        ssh_keys: Sequence[str] = (),
        security_group_ids: Sequence[str] = (),
        user_data: str | None = None,
        public_ip_assignment: str = "inet4",
        instance_prefix: str | None = None,
        min_available: int | None = None,
    ) -> Operation:
        with self.lock:
            self.tick()
            itype, tmpl = self._check_instance_spec(
                instance_type_id, template_id, disk_size, ssh_keys, security_group_ids, user_data
            )
            _check_size(size)
            self.check_room(itype, size, self.zone)
            pool = InstancePool(
                str(uuid.uuid4()),
                name,
                itype,
                tmpl,
                disk_size,
                size,
                "creating",
                description,
                dict(labels or {}),
                list(ssh_keys),
                list(security_group_ids),
                user_data,
                public_ip_assignment,
                instance_prefix or "pool",
                min_available,
                zone=self.zone,
            )
            self.instance_pools[pool.id] = pool
            for _ in range(size):
                self._add_member(pool)

            def failed():
                pool.state = "suspended"

            return self._operation(
                "instance-pool", pool.id, "create-instance-pool", lambda: self._settled(pool), failed
            )

    def _settled(self, pool: InstancePool) -> None:
        if pool.state != "destroying":
            pool.state = "running"

    def _add_member(self, pool: InstancePool) -> Instance:
        suffix = "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        inst = self._add_instance(
            f"{pool.instance_prefix}-{pool.id[:5]}-{suffix}",
            pool.instance_type,
            pool.template,
            pool.disk_size,
            pool.ssh_keys,
            pool.security_group_ids,
            pool.labels,
            pool.user_data,
            pool.public_ip_assignment,
            manager_id=pool.id,
            zone=pool.zone,
        )
        pool.instance_ids.append(inst.id)
        self._boot(inst)
        return inst

    def _remove_member(self, pool: InstancePool, instance_id: str) -> None:
        pool.instance_ids.remove(instance_id)
        inst = self.instances.get(instance_id)
        if inst is not None and inst.state != "destroying":
            self._destroy(inst, "delete-instance")

    def list_instance_pools(self) -> list[InstancePool]:
        with self.lock:
            self.tick()
            return [p for p in self.instance_pools.values() if p.zone == self.zone]

    def get_instance_pool(self, pool_id: str) -> InstancePool:
        with self.lock:
            self.tick()
            pool = self.instance_pools.get(pool_id)
            if pool is None or pool.zone != self.zone:
                raise ModelError("not-found", f"instance pool {pool_id} not found")
            return pool

    def _changeable_pool(self, pool_id: str, command: str) -> InstancePool:
        pool = self.get_instance_pool(pool_id)
        if pool.state == "destroying":
            raise ModelError("conflict", f"instance pool {pool_id} is destroying; {command} is refused")
        return pool

    def scale_instance_pool(self, pool_id: str, size: int) -> Operation:
        """New members for a larger size; for a smaller one, the newest members are removed."""
        with self.lock:
            pool = self._changeable_pool(pool_id, "scale-instance-pool")
            _check_size(size)
            members = len(pool.instance_ids)
            if size > members:
                self.check_room(pool.instance_type, size - members, pool.zone)
                pool.state = "scaling-up"
                for _ in range(size - members):
                    self._add_member(pool)
            elif size < members:
                pool.state = "scaling-down"
                for iid in pool.instance_ids[size:]:
                    self._remove_member(pool, iid)
            pool.size = size
            return self._operation("instance-pool", pool.id, "scale-instance-pool", lambda: self._settled(pool))

    def evict_instance_pool_members(self, pool_id: str, instance_ids: Sequence[str]) -> Operation:
        """Remove the members named, the pool's size lowered by as many."""
        with self.lock:
            pool = self._changeable_pool(pool_id, "evict-instance-pool-members")
            if not instance_ids:
                raise ModelError("invalid", "instances: name at least one member of the pool to evict")
            strangers = [i for i in instance_ids if i not in pool.instance_ids]
            if strangers:
                raise ModelError(
                    "invalid", f"instance(s) {', '.join(strangers)} are not members of instance pool {pool_id}"
                )
            pool.state = "scaling-down"
            for iid in dict.fromkeys(instance_ids):
                self._remove_member(pool, iid)
            pool.size = len(pool.instance_ids)
            return self._operation("instance-pool", pool.id, "evict-instance-pool-members", lambda: self._settled(pool))

    def update_instance_pool(
        self,
        pool_id: str,
        name: str | None = None,
        description: str | None = None,
        labels: dict[str, str] | _Unset | None = UNSET,
        instance_type_id: str | None = None,
        template_id: str | None = None,
        disk_size: int | None = None,
        ssh_keys: Sequence[str] | None = None,
        security_group_ids: Sequence[str] | None = None,
        user_data: str | None = None,
        public_ip_assignment: str | None = None,
        instance_prefix: str | None = None,
        min_available: int | None = None,
    ) -> Operation:
        """Change the pool; its member settings apply to members made from now on (see InstancePool).
        `labels` replaces the whole map, as update-instance does; left out, the labels stay."""
        with self.lock:
            pool = self._changeable_pool(pool_id, "update-instance-pool")
            itype, tmpl = self._check_instance_spec(
                instance_type_id or pool.instance_type.id,
                template_id or pool.template.id,
                pool.disk_size if disk_size is None else disk_size,
                pool.ssh_keys if ssh_keys is None else ssh_keys,
                pool.security_group_ids if security_group_ids is None else security_group_ids,
                user_data,
            )
            previous = pool.state
            pool.state = "updating"

            def apply() -> None:
                pool.instance_type, pool.template = itype, tmpl
                for attr, value in (
                    ("name", name),
                    ("description", description),
                    ("disk_size", disk_size),
                    ("user_data", user_data),
                    ("public_ip_assignment", public_ip_assignment),
                    ("instance_prefix", instance_prefix),
                    ("min_available", min_available),
                ):
                    if value is not None:
                        setattr(pool, attr, value)
                if ssh_keys is not None:
                    pool.ssh_keys = list(ssh_keys)
                if security_group_ids is not None:
                    pool.security_group_ids = list(security_group_ids)
                if not isinstance(labels, _Unset):
                    pool.labels = dict(labels or {})
                self._settled(pool)

            def failed() -> None:
                pool.state = previous

            return self._operation("instance-pool", pool.id, "update-instance-pool", apply, failed)

    def delete_instance_pool(self, pool_id: str) -> Operation:
        """The pool and all its members."""
        with self.lock:
            pool = self._changeable_pool(pool_id, "delete-instance-pool")
            pool.state = "destroying"
            for iid in list(pool.instance_ids):
                self._remove_member(pool, iid)
            pool.size = 0
            return self._operation(
                "instance-pool",
                pool.id,
                "delete-instance-pool",
                lambda: self.instance_pools.pop(pool.id, None),
                may_fail=False,
            )

    # ------------------------------------------------------------------------------- IAM
    def policy_resource(self, tag: str, resource_id: str | None) -> dict[str, dict[str, str]]:
        """The `resource` an IAM rule sees for an operation of the spec's `tag` on `resource_id` (see
        cloud.sim.iam): an instance's or a pool's id and name; empty for anything else."""
        with self.lock:
            if resource_id is None:
                return {}
            if tag == "instance" and resource_id in self.instances:
                inst = self.instances[resource_id]
                return {"instance": {"id": inst.id, "name": inst.name}}
            if tag == "instance-pool" and resource_id in self.instance_pools:
                pool = self.instance_pools[resource_id]
                return {"instance_pool": {"id": pool.id, "name": pool.name}}
            return {}

    # -------------------------------------------------------------------------------- IAM roles
    def create_iam_role(self, name: str, policy: dict[str, Any] | None = None, **options: Any) -> Operation:
        with self.lock:
            self.tick()
            role = self.iam.create_role(name, policy, **options)
            return self._operation("iam-role", role.id, "create-iam-role")

    def update_iam_role_policy(self, role_id: str, policy: dict[str, Any]) -> Operation:
        with self.lock:
            self.iam.update_role_policy(role_id, policy)
            return self._operation("iam-role", role_id, "update-iam-role-policy")

    def delete_iam_role(self, role_id: str) -> Operation:
        with self.lock:
            self.iam.delete_role(role_id)
            return self._operation("iam-role", role_id, "delete-iam-role")

    def create_api_key(self, name: str, role_id: str) -> APIKey:
        """The new key with its secret: the only time the secret is shown."""
        with self.lock:
            return self.iam.create_api_key(name, role_id)

    def delete_api_key(self, key: str) -> Operation:
        with self.lock:
            self.iam.delete_api_key(key)
            return self._operation("api-key", None, "delete-api-key")
