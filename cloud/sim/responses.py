"""The HTTP face of the simulated Exoscale: each served operation as a handler that reads the request's
fields, calls the state model (cloud.sim.model) and renders what it returns as the spec's JSON.

Handlers know no state rules (those are the model's) and nothing of signatures, faults or the server
(cloud.sim.server). cloud.sim.urls maps the spec's operation ids to these handlers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cloud.sim.iam import APIKey, Role
from cloud.sim.model import (
    UNSET,
    ZONES,
    Instance,
    InstancePool,
    InstanceType,
    Model,
    ModelError,
    Operation,
    Rule,
    SecurityGroup,
    SSHKey,
    Template,
)


@dataclass
class Request:
    """What a handler reads: the path's parameters, the query (first value of each name), the JSON body."""

    path_params: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    base_url: str | None = None  # scheme and address the client called, e.g. http://127.0.0.1:8080


# --------------------------------------------------------------------------------------- renderers


def render_zone(zone: str, base_url: str | None = None) -> dict:
    """A zone; its `api-endpoint` is where this sim serves that zone (BASE/ZONE/v2) when the address the
    client called is known, else Exoscale's own."""
    return {
        "name": zone,
        "api-endpoint": f"{base_url}/{zone}/v2" if base_url else f"https://api-{zone}.exoscale.com/v2",
        "sos-endpoint": f"https://sos-{zone}.exo.io",
    }


def render_quota(resource: str, usage: int, limit: int) -> dict:
    return {"resource": resource, "usage": usage, "limit": limit}


def _without_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def render_instance_type(t: InstanceType) -> dict:
    return _without_none(
        {
            "id": t.id,
            "family": t.family,
            "size": t.size,
            "cpus": t.cpus,
            "memory": t.memory,
            "gpus": t.gpus or None,
            "authorized": t.authorized,
            "zones": list(t.zones),
        }
    )


def render_template(t: Template) -> dict:
    return {
        "id": t.id,
        "name": t.name,
        "family": t.family,
        "version": t.version,
        "build": t.build,
        "default-user": t.default_user,
        "size": t.size,
        "visibility": t.visibility,
        "boot-mode": t.boot_mode,
        "ssh-key-enabled": True,
        "password-enabled": True,
        "zones": list(t.zones),
        "maintainer": "Exoscale",
        "description": "",
        "created-at": "2026-10-01T00:00:00Z",
    }


def render_ssh_key(k: SSHKey) -> dict:
    return {"name": k.name, "fingerprint": k.fingerprint}


def render_rule(r: Rule) -> dict:
    return _without_none(
        {
            "id": r.id,
            "flow-direction": r.flow_direction,
            "protocol": r.protocol,
            "network": r.network,
            "security-group": {"id": r.security_group_id} if r.security_group_id else None,
            "start-port": r.start_port,
            "end-port": r.end_port,
            "icmp": r.icmp,
            "description": r.description or None,
        }
    )


def render_security_group(g: SecurityGroup) -> dict:
    return {"id": g.id, "name": g.name, "description": g.description, "rules": [render_rule(r) for r in g.rules]}


def render_instance(i: Instance, model: Model) -> dict:
    groups = [model.security_groups[g] for g in i.security_group_ids if g in model.security_groups]
    keys = [model.ssh_keys[k] for k in i.ssh_keys if k in model.ssh_keys]
    d = {
        "id": i.id,
        "name": i.name,
        "state": i.state,
        "created-at": i.created_at,
        "disk-size": i.disk_size,
        "instance-type": render_instance_type(i.instance_type),
        "template": render_template(i.template),
        "labels": dict(i.labels),
        "ssh-keys": [render_ssh_key(k) for k in keys],
        "security-groups": [{"id": g.id, "name": g.name} for g in groups],
        "public-ip-assignment": i.public_ip_assignment,
        "mac-address": "06:" + ":".join(i.id.replace("-", "")[j : j + 2] for j in range(0, 10, 2)),
    }
    if keys:
        d["ssh-key"] = render_ssh_key(keys[0])
    if i.public_ip:
        d["public-ip"] = i.public_ip
    if i.manager_id:
        d["manager"] = {"id": i.manager_id, "type": "instance-pool"}
    return d


def render_instance_pool(p: InstancePool, model: Model) -> dict:
    groups = [g for g in p.security_group_ids if g in model.security_groups]
    keys = [{"name": k} for k in p.ssh_keys if k in model.ssh_keys]
    d = {
        "id": p.id,
        "name": p.name,
        "state": p.state,
        "size": p.size,
        "instance-type": {"id": p.instance_type.id},
        "template": {"id": p.template.id},
        "disk-size": p.disk_size,
        "labels": dict(p.labels),
        "ssh-keys": keys,
        "security-groups": [{"id": g} for g in groups],
        "public-ip-assignment": p.public_ip_assignment,
        "instance-prefix": p.instance_prefix,
        "instances": [{"id": i} for i in p.instance_ids],
    }
    if keys:
        d["ssh-key"] = keys[0]
    for name, value in (("description", p.description), ("user-data", p.user_data)):
        if value:
            d[name] = value
    if p.min_available is not None:
        d["min-available"] = p.min_available
    return d


def render_operation(op: Operation) -> dict:
    d: dict[str, Any] = {"id": op.id, "state": op.state}
    if op.reference_id:
        d["reference"] = {
            "id": op.reference_id,
            "link": f"/v2/{op.reference_kind}/{op.reference_id}",
            "command": op.command,
        }
    if op.reason:
        d["reason"] = op.reason
    if op.message:
        d["message"] = op.message
    return d


def render_role(role: Role) -> dict:
    return _without_none(
        {
            "id": role.id,
            "name": role.name,
            "description": role.description,
            "editable": role.editable,
            "labels": dict(role.labels),
            "permissions": list(role.permissions),
            "policy": role.policy.document,
            "max-session-ttl": role.max_session_ttl,
        }
    )


def render_api_key(key: APIKey, with_secret: bool = False) -> dict:
    d = {"key": key.key, "name": key.name, "role-id": key.role_id}
    if with_secret:
        d["secret"] = key.secret
    return d


# ---------------------------------------------------------------------------------------- handlers


def labels_filter(text: str) -> dict[str, str]:
    """The `labels` query filter as this sim reads it: space-separated key=value pairs (the spec gives the
    parameter as a bare string; the model's labels_filter fault can ignore or misread it)."""
    out = {}
    for pair in text.split():
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise ModelError("invalid", f"labels filter {text!r}: expected space-separated key=value pairs")
        out[k] = v
    return out


def list_zones(model: Model, request: Request) -> dict:
    return {"zones": [render_zone(z, request.base_url) for z in ZONES]}


def list_quotas(model: Model, request: Request) -> dict:
    return {"quotas": [render_quota(*q) for q in model.list_quotas()]}


def get_quota(model: Model, request: Request) -> dict:
    return render_quota(*model.get_quota(request.path_params["entity"]))


def list_instance_types(model: Model, request: Request) -> dict:
    return {"instance-types": [render_instance_type(t) for t in model.list_instance_types()]}


def get_instance_type(model: Model, request: Request) -> dict:
    return render_instance_type(model.get_instance_type(request.path_params["id"]))


def list_templates(model: Model, request: Request) -> dict:
    templates = model.list_templates(request.query.get("visibility"), request.query.get("family"))
    return {"templates": [render_template(t) for t in templates]}


def get_template(model: Model, request: Request) -> dict:
    return render_template(model.get_template(request.path_params["id"]))


def list_ssh_keys(model: Model, request: Request) -> dict:
    return {"ssh-keys": [render_ssh_key(k) for k in model.list_ssh_keys()]}


def register_ssh_key(model: Model, request: Request) -> dict:
    return render_operation(model.register_ssh_key(request.body["name"], request.body["public-key"]))


def get_ssh_key(model: Model, request: Request) -> dict:
    return render_ssh_key(model.get_ssh_key(request.path_params["name"]))


def delete_ssh_key(model: Model, request: Request) -> dict:
    return render_operation(model.delete_ssh_key(request.path_params["name"]))


def list_security_groups(model: Model, request: Request) -> dict:
    return {"security-groups": [render_security_group(g) for g in model.list_security_groups()]}


def create_security_group(model: Model, request: Request) -> dict:
    body = request.body
    return render_operation(model.create_security_group(body["name"], body.get("description", "")))


def get_security_group(model: Model, request: Request) -> dict:
    return render_security_group(model.get_security_group(request.path_params["id"]))


def delete_security_group(model: Model, request: Request) -> dict:
    return render_operation(model.delete_security_group(request.path_params["id"]))


def add_rule_to_security_group(model: Model, request: Request) -> dict:
    body = request.body
    source_group = body.get("security-group") or {}
    return render_operation(
        model.add_rule(
            request.path_params["id"],
            body["flow-direction"],
            body["protocol"],
            network=body.get("network"),
            source_group_id=source_group.get("id"),
            source_group_name=source_group.get("name"),
            start_port=body.get("start-port"),
            end_port=body.get("end-port"),
            icmp=body.get("icmp"),
            description=body.get("description", ""),
        )
    )


def delete_rule_from_security_group(model: Model, request: Request) -> dict:
    return render_operation(model.delete_rule(request.path_params["id"], request.path_params["rule_id"]))


def list_instances(model: Model, request: Request) -> dict:
    labels = labels_filter(request.query["labels"]) if request.query.get("labels") else None
    instances = model.list_instances(labels, request.query.get("ip-address"))
    with model.lock:
        return {"instances": [render_instance(i, model) for i in instances]}


def create_instance(model: Model, request: Request) -> dict:
    body = request.body
    ssh_keys = [k["name"] for k in body.get("ssh-keys", [])] + (
        [body["ssh-key"]["name"]] if body.get("ssh-key") else []
    )
    return render_operation(
        model.create_instance(
            body["name"] if "name" in body else f"vm-{int(time.time())}",
            body["instance-type"]["id"],
            body["template"]["id"],
            body["disk-size"],
            ssh_keys,
            [g["id"] for g in body.get("security-groups", [])],
            body.get("labels"),
            body.get("user-data"),
            body.get("public-ip-assignment", "inet4"),
        )
    )


def get_instance(model: Model, request: Request) -> dict:
    instance = model.get_instance(request.path_params["id"])
    with model.lock:
        return render_instance(instance, model)


def update_instance(model: Model, request: Request) -> dict:
    body = request.body
    return render_operation(
        model.update_instance(
            request.path_params["id"],
            name=body.get("name"),
            labels=body["labels"] if "labels" in body else UNSET,
            user_data=body.get("user-data"),
        )
    )


def delete_instance(model: Model, request: Request) -> dict:
    return render_operation(model.delete_instance(request.path_params["id"]))


def start_instance(model: Model, request: Request) -> dict:
    return render_operation(model.start_instance(request.path_params["id"]))


def stop_instance(model: Model, request: Request) -> dict:
    return render_operation(model.stop_instance(request.path_params["id"]))


def reboot_instance(model: Model, request: Request) -> dict:
    return render_operation(model.reboot_instance(request.path_params["id"]))


def get_operation(model: Model, request: Request) -> dict:
    return render_operation(model.get_operation(request.path_params["id"]))


def create_iam_role(model: Model, request: Request) -> dict:
    body = request.body
    return render_operation(
        model.create_iam_role(
            body["name"],
            body.get("policy"),
            description=body.get("description"),
            labels=body.get("labels"),
            permissions=body.get("permissions"),
            editable=body.get("editable", True),
            max_session_ttl=body.get("max-session-ttl"),
        )
    )


def list_iam_roles(model: Model, request: Request) -> dict:
    return {"iam-roles": [render_role(r) for r in model.iam.list_roles()]}


def get_iam_role(model: Model, request: Request) -> dict:
    return render_role(model.iam.get_role(request.path_params["id"]))


def update_iam_role_policy(model: Model, request: Request) -> dict:
    return render_operation(model.update_iam_role_policy(request.path_params["id"], request.body))


def delete_iam_role(model: Model, request: Request) -> dict:
    return render_operation(model.delete_iam_role(request.path_params["id"]))


def create_api_key(model: Model, request: Request) -> dict:
    return render_api_key(model.create_api_key(request.body["name"], request.body["role-id"]), with_secret=True)


def list_api_keys(model: Model, request: Request) -> dict:
    return {"api-keys": [render_api_key(k) for k in model.iam.list_api_keys()]}


def get_api_key(model: Model, request: Request) -> dict:
    return render_api_key(model.iam.get_api_key(request.path_params["id"]))


def delete_api_key(model: Model, request: Request) -> dict:
    return render_operation(model.delete_api_key(request.path_params["id"]))


def _ssh_key_names(body: dict) -> list[str]:
    """`ssh-keys` and the older single `ssh-key`, as names."""
    names = [k["name"] for k in body.get("ssh-keys") or []]
    if body.get("ssh-key"):
        names.append(body["ssh-key"]["name"])
    return list(dict.fromkeys(names))


# Fields of the spec's instance pools that this sim does not model: refused rather than ignored.
UNSIMULATED_POOL_FIELDS = ("anti-affinity-groups", "elastic-ips", "private-networks", "deploy-target")


def _refuse_unsimulated(body: dict) -> None:
    given = [f for f in UNSIMULATED_POOL_FIELDS if body.get(f)]
    if given:
        raise ModelError(
            "invalid", f"instance pool field(s) {', '.join(given)} are not simulated by this local Exoscale"
        )


def create_instance_pool(model: Model, request: Request) -> dict:
    body = request.body
    _refuse_unsimulated(body)
    return render_operation(
        model.create_instance_pool(
            body["name"],
            body["instance-type"]["id"],
            body["template"]["id"],
            body["disk-size"],
            body["size"],
            description=body.get("description"),
            labels=body.get("labels"),
            ssh_keys=_ssh_key_names(body),
            security_group_ids=[g["id"] for g in body.get("security-groups") or []],
            user_data=body.get("user-data"),
            public_ip_assignment=body.get("public-ip-assignment", "inet4"),
            instance_prefix=body.get("instance-prefix"),
            min_available=body.get("min-available"),
        )
    )


def list_instance_pools(model: Model, request: Request) -> dict:
    pools = model.list_instance_pools()
    with model.lock:
        return {"instance-pools": [render_instance_pool(p, model) for p in pools]}


def get_instance_pool(model: Model, request: Request) -> dict:
    pool = model.get_instance_pool(request.path_params["id"])
    with model.lock:
        return render_instance_pool(pool, model)


def scale_instance_pool(model: Model, request: Request) -> dict:
    return render_operation(model.scale_instance_pool(request.path_params["id"], request.body["size"]))


def evict_instance_pool_members(model: Model, request: Request) -> dict:
    return render_operation(
        model.evict_instance_pool_members(request.path_params["id"], request.body.get("instances") or [])
    )


def update_instance_pool(model: Model, request: Request) -> dict:
    body = request.body
    _refuse_unsimulated(body)
    return render_operation(
        model.update_instance_pool(
            request.path_params["id"],
            name=body.get("name"),
            description=body.get("description"),
            labels=body["labels"] if "labels" in body else UNSET,
            instance_type_id=(body.get("instance-type") or {}).get("id"),
            template_id=(body.get("template") or {}).get("id"),
            disk_size=body.get("disk-size"),
            ssh_keys=_ssh_key_names(body) if "ssh-keys" in body or "ssh-key" in body else None,
            security_group_ids=[g["id"] for g in body.get("security-groups") or []]
            if "security-groups" in body
            else None,
            user_data=body.get("user-data"),
            public_ip_assignment=body.get("public-ip-assignment"),
            instance_prefix=body.get("instance-prefix"),
            min_available=body.get("min-available"),
        )
    )


def delete_instance_pool(model: Model, request: Request) -> dict:
    return render_operation(model.delete_instance_pool(request.path_params["id"]))
