"""IAM of the simulated account: roles with policies, API keys bound to a role, and the policy decision for
each request signed with such a key. Knows nothing of HTTP.

A policy (`default-service-strategy` allow|deny, `services` by service class: `allow`, `deny` or `rules`) is
evaluated as Exoscale documents it (community.exoscale.com, "Write IAM Policies"): a service the policy does
not name gets the default strategy; a `rules` service takes the action of the first rule whose expression is
true, and denies when none is.

Deviations from Exoscale, on purpose:
- Rule expressions are CEL on Exoscale; here only the forms this project writes are understood (see
  SUPPORTED_EXPRESSIONS); any other expression, and any rule with `resources`, is refused with 400 when the
  role is created, instead of being evaluated.
- The service class of an operation comes from OPERATION_SERVICES below, derived from Exoscale's published
  spec, not from Exoscale's own evaluator: a policy proven here is proven against that table.
- The organization policy is not simulated (Exoscale's default allows everything).
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from cloud.sim.errors import ModelError as IAMError

SUPPORTED_EXPRESSIONS = ("true", "operation == 'NAME'", "operation in ['NAME', ...]")

_NAME = r"'([a-z0-9-]+)'|\"([a-z0-9-]+)\""
_EQ_RE = re.compile(rf"^operation\s*==\s*(?:{_NAME})$")
_IN_RE = re.compile(r"^operation\s+in\s+\[(.*)\]$")
_ITEM_RE = re.compile(rf"^\s*(?:{_NAME})\s*$")


@functools.lru_cache(maxsize=1)
def operation_services() -> dict[str, str]:
    """OPERATION_SERVICES: operation id -> IAM service class.

    Source: Exoscale's OpenAPI spec as the `exoscale` package ships it (`exoscale/openapi.json`): each
    operation's first tag, and that tag's `parent` in the spec's `tags` list (e.g. `create-instance` ->
    tag `instance` -> `compute`; `create-api-key` -> `api-key` -> `iam`; `list-zones` and `get-operation` ->
    `general`). A tag without a parent is its own service class.
    """
    from cloud.sim.spec import spec_path

    with open(spec_path()) as f:
        spec = json.load(f)
    parent = {t["name"]: t.get("parent") or t["name"] for t in spec.get("tags", [])}
    out = {}
    for item in spec["paths"].values():
        for op in item.values():
            if isinstance(op, dict) and "operationId" in op:
                tag = (op.get("tags") or ["general"])[0]
                out[op["operationId"]] = parent.get(tag, tag)
    return out


@dataclass(frozen=True)
class Expression:
    """A rule expression in the supported subset: always true, or true for a set of operations."""

    text: str
    operations: frozenset[str] | None  # None: `true`

    def matches(self, operation: str) -> bool:
        return self.operations is None or operation in self.operations


def parse_expression(text: str) -> Expression:
    """The supported subset of CEL; IAMError(invalid) naming the deviation for anything else."""
    t = text.strip()
    if t == "true":
        return Expression(text, None)
    m = _EQ_RE.match(t)
    if m:
        return Expression(text, frozenset([m.group(1) or m.group(2)]))
    m = _IN_RE.match(t)
    if m:
        names = []
        for item in m.group(1).split(",") if m.group(1).strip() else []:
            im = _ITEM_RE.match(item)
            if not im:
                break
            names.append(im.group(1) or im.group(2))
        else:
            return Expression(text, frozenset(names))
    raise IAMError(
        "invalid",
        f"IAM rule expression {text!r} is not supported by this local Exoscale (a deviation: Exoscale "
        f"evaluates any CEL); supported forms: {', '.join(SUPPORTED_EXPRESSIONS)}",
    )


@dataclass(frozen=True)
class Rule:
    action: str  # allow | deny
    expression: Expression


@dataclass(frozen=True)
class ServicePolicy:
    type: str  # allow | deny | rules
    rules: tuple[Rule, ...] = ()

    def decide(self, operation: str) -> bool:
        if self.type != "rules":
            return self.type == "allow"
        for r in self.rules:
            if r.expression.matches(operation):
                return r.action == "allow"
        return False  # no rule matched: denied whatever the default strategy


@dataclass(frozen=True)
class Policy:
    default_service_strategy: str
    services: dict[str, ServicePolicy]
    document: dict[str, Any]  # as given, rendered back as given

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> Policy:
        strategy = doc.get("default-service-strategy")
        if strategy not in ("allow", "deny"):
            raise IAMError("invalid", f"default-service-strategy {strategy!r}: expected allow or deny")
        services = {}
        for name, sp in (doc.get("services") or {}).items():
            kind = sp.get("type")
            if kind not in ("allow", "deny", "rules"):
                raise IAMError("invalid", f"service {name!r}: type {kind!r}: expected allow, deny or rules")
            rules = []
            for r in sp.get("rules") or []:
                if r.get("action") not in ("allow", "deny"):
                    raise IAMError(
                        "invalid", f"service {name!r}: rule action {r.get('action')!r}: expected allow or deny"
                    )
                if r.get("resources"):
                    raise IAMError(
                        "invalid",
                        f"service {name!r}: rule resources are not supported by this local Exoscale (a deviation)",
                    )
                rules.append(Rule(r["action"], parse_expression(str(r.get("expression", "")))))
            if kind == "rules" and not rules:
                raise IAMError("invalid", f"service {name!r}: type rules needs at least one rule")
            services[name] = ServicePolicy(kind, tuple(rules))
        return cls(strategy, services, doc)

    def allows(self, operation: str) -> bool:
        service = operation_services().get(operation, "general")
        sp = self.services.get(service)
        if sp is None:
            return self.default_service_strategy == "allow"
        return sp.decide(operation)


ALLOW_ALL = Policy("allow", {}, {"default-service-strategy": "allow", "services": {}})


@dataclass
class Role:
    id: str
    name: str
    description: str | None = None
    policy: Policy = ALLOW_ALL
    labels: dict[str, str] = field(default_factory=dict)
    permissions: list[str] = field(default_factory=list)
    editable: bool = True
    max_session_ttl: int | None = None


@dataclass
class APIKey:
    key: str
    name: str
    role_id: str
    secret: str = field(repr=False)


class IAM:
    """Roles and API keys. The account's own key (the one the sim was started with) is not an APIKey here:
    it is unrestricted, as an organization owner's key is."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.roles: dict[str, Role] = {}
        self.api_keys: dict[str, APIKey] = {}

    # ---------------------------------------------------------------------------------- roles
    def create_role(
        self,
        name: str,
        policy: dict[str, Any] | None = None,
        description: str | None = None,
        labels: dict[str, str] | None = None,
        permissions: list[str] | None = None,
        editable: bool = True,
        max_session_ttl: int | None = None,
    ) -> Role:
        parsed = Policy.parse(policy) if policy is not None else ALLOW_ALL
        with self.lock:
            if any(r.name == name for r in self.roles.values()):
                raise IAMError("conflict", f"an IAM role named {name!r} already exists")
            role = Role(
                str(uuid.uuid4()),
                name,
                description,
                parsed,
                dict(labels or {}),
                list(permissions or []),
                editable,
                max_session_ttl,
            )
            self.roles[role.id] = role
            return role

    def get_role(self, role_id: str) -> Role:
        with self.lock:
            role = self.roles.get(role_id)
            if role is None:
                raise IAMError("not-found", f"IAM role {role_id} not found")
            return role

    def list_roles(self) -> list[Role]:
        with self.lock:
            return list(self.roles.values())

    def update_role_policy(self, role_id: str, policy: dict[str, Any]) -> Role:
        parsed = Policy.parse(policy)
        with self.lock:
            role = self.get_role(role_id)
            if not role.editable:
                raise IAMError("forbidden", f"IAM role {role_id} is not editable")
            role.policy = parsed
            return role

    def delete_role(self, role_id: str) -> None:
        """Refused while API keys use the role (assumed from Exoscale's portal, which asks to delete them
        first): deleting the keys first, then the role, is the order that works on both."""
        with self.lock:
            self.get_role(role_id)
            users = [k.name for k in self.api_keys.values() if k.role_id == role_id]
            if users:
                raise IAMError("conflict", f"IAM role {role_id} is used by API key(s) {', '.join(users)}")
            del self.roles[role_id]

    # ------------------------------------------------------------------------------- api keys
    def create_api_key(self, name: str, role_id: str) -> APIKey:
        with self.lock:
            self.get_role(role_id)
            key = APIKey("EXO" + secrets.token_hex(12), name, role_id, secrets.token_urlsafe(32))
            self.api_keys[key.key] = key
            return key

    def get_api_key(self, key: str) -> APIKey:
        with self.lock:
            k = self.api_keys.get(key)
            if k is None:
                raise IAMError("not-found", f"API key {key} not found")
            return k

    def list_api_keys(self) -> list[APIKey]:
        with self.lock:
            return list(self.api_keys.values())

    def delete_api_key(self, key: str) -> None:
        with self.lock:
            self.get_api_key(key)
            del self.api_keys[key]

    # ------------------------------------------------------------------------------ decisions
    def secret_of(self, key: str) -> str | None:
        with self.lock:
            k = self.api_keys.get(key)
            return k.secret if k else None

    def authorize(self, key: str, operation: str) -> None:
        """IAMError(forbidden) when the role of `key` does not allow `operation`."""
        with self.lock:
            k = self.get_api_key(key)
            role = self.roles.get(k.role_id)
            if role is None or not role.policy.allows(operation):
                service = operation_services().get(operation, "general")
                raise IAMError(
                    "forbidden",
                    f"Forbidden: the IAM role of API key {key} does not allow {operation} (service {service})",
                )
