"""Which operations of Exoscale's spec the local Exoscale serves: operation id -> handler.

Requests are matched to the spec's operations by cloud.sim.spec (method and path template), so a path
here is never written twice; an operation of the spec that is not in this table is answered 501.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloud.sim import responses
from cloud.sim.model import Model

Handler = Callable[[Model, responses.Request], Any]

HANDLERS: dict[str, Handler] = {
    "list-zones": responses.list_zones,
    "list-instance-types": responses.list_instance_types,
    "get-instance-type": responses.get_instance_type,
    "list-templates": responses.list_templates,
    "get-template": responses.get_template,
    "list-ssh-keys": responses.list_ssh_keys,
    "register-ssh-key": responses.register_ssh_key,
    "get-ssh-key": responses.get_ssh_key,
    "delete-ssh-key": responses.delete_ssh_key,
    "list-security-groups": responses.list_security_groups,
    "create-security-group": responses.create_security_group,
    "get-security-group": responses.get_security_group,
    "delete-security-group": responses.delete_security_group,
    "add-rule-to-security-group": responses.add_rule_to_security_group,
    "delete-rule-from-security-group": responses.delete_rule_from_security_group,
    "list-instances": responses.list_instances,
    "create-instance": responses.create_instance,
    "get-instance": responses.get_instance,
    "update-instance": responses.update_instance,
    "delete-instance": responses.delete_instance,
    "start-instance": responses.start_instance,
    "stop-instance": responses.stop_instance,
    "reboot-instance": responses.reboot_instance,
    "create-instance-pool": responses.create_instance_pool,
    "list-instance-pools": responses.list_instance_pools,
    "get-instance-pool": responses.get_instance_pool,
    "scale-instance-pool": responses.scale_instance_pool,
    "evict-instance-pool-members": responses.evict_instance_pool_members,
    "update-instance-pool": responses.update_instance_pool,
    "delete-instance-pool": responses.delete_instance_pool,
    "get-operation": responses.get_operation,
    "list-quotas": responses.list_quotas,
    "get-quota": responses.get_quota,
    "create-iam-role": responses.create_iam_role,
    "list-iam-roles": responses.list_iam_roles,
    "get-iam-role": responses.get_iam_role,
    "update-iam-role-policy": responses.update_iam_role_policy,
    "delete-iam-role": responses.delete_iam_role,
    "create-api-key": responses.create_api_key,
    "list-api-keys": responses.list_api_keys,
    "get-api-key": responses.get_api_key,
    "delete-api-key": responses.delete_api_key,
}

# Operations Exoscale serves without credentials (its SDK sends none for them).
PUBLIC_OPERATIONS = frozenset({"list-zones"})


def coverage(service: str = "compute") -> tuple[list[str], dict[str, list[str]]]:
    """(operations of `service` served, those declined by the spec's tag), `service` as in the IAM table."""
    from cloud.sim.iam import operation_services
    from cloud.sim.spec import SpecValidator

    services = operation_services()
    served: list[str] = []
    declined: dict[str, list[str]] = {}
    for op in SpecValidator.shared().operations:
        if services.get(op.operation_id) != service:
            continue
        if op.operation_id in HANDLERS:
            served.append(op.operation_id)
        else:
            declined.setdefault(op.tags[0] if op.tags else "-", []).append(op.operation_id)
    return sorted(served), {tag: sorted(ops) for tag, ops in sorted(declined.items())}
