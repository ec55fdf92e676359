"""IAM of the simulated account: roles with policies, API keys bound to a role, and the policy decision for
each request signed with such a key. Knows nothing of HTTP.

A policy (`default-service-strategy` allow|deny, `services` by service class: `allow`, `deny` or `rules`) is
evaluated as Exoscale documents it in "Write IAM Policies"
(https://community.exoscale.com/product/iam/how-to/policy-guide/):
- a service the policy does not name gets the default strategy;
- a `rules` service evaluates its rules in order; each rule's expression is CEL (Common Expression
  Language, evaluated here by cel-python); the first rule whose expression is true decides, by its action
  (allow or deny);
- a rule whose expression is invalid concludes nothing: the next rule is evaluated;
- when no rule decides, the request is refused, whatever the default strategy.

The bindings of an expression, as that guide lists them (`service`, `zone`, `now`, `source_ip`, `api_key`,
`operation`), plus `parameters` and `resource` (see RequestContext for what each holds here). Functions
beyond standard CEL: `source_ip.inIpRange('CIDR')`, from Exoscale's bucket-policy guide
(https://community.exoscale.com/documentation/storage/bucketpolicy/), and `parameters.has('name')`, from
Exoscale's own IAM example in its Terraform provider (`examples/iam-priv-instance`).

Where the documentation leaves a behaviour open, the narrowest reading is taken, and said here:
- "Invalid" covers an expression that does not parse, one whose evaluation fails (e.g. a parameter or
  resource field the request does not have, a type mismatch) and one whose value is not a boolean. Such a
  rule is skipped, deny rules included: a policy should allow on conditions rather than deny on fields a
  request may lack.
- `parameters`: the operation's path parameters (`id`), its query parameters and the top-level fields of its
  JSON body, each name with `-` written `_` (Exoscale's example writes `parameters.public_ip_assignment` for
  the body's `public-ip-assignment`); nested values are as sent (`parameters.instance_type.id`). A path
  parameter wins over a body field of the same name.
- `resource`: documented only by example (`resource.sks_nodepool.name`). Here, for an operation on one
  instance or one instance pool named by its path, `resource.instance` or `resource.instance_pool` holds
  that resource's `id` and `name` as they are before the request (nothing else); other operations have an
  empty `resource`.
- `source_ip`: the address the TCP connection comes from; no forwarding header is believed.
- `now`: an RFC 3339 string in UTC (the guide: "a CEL timestamp (string, can be coerced ... via
  timestamp(now))").

Deviations from Exoscale, on purpose:
- Rules with `resources` (in the spec, not documented in the guide) are refused with 400 when the role is
  created, instead of being evaluated in some guessed way.
- The service class of an operation comes from OPERATION_SERVICES below, derived from Exoscale's published
  spec, not from Exoscale's own evaluator: a policy proven here is proven against that table.
- The organization policy is not simulated (Exoscale's default allows everything).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import secrets
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import celpy
import celpy.celtypes as celtypes

from cloud.sim.errors import ModelError as IAMError

log = logging.getLogger(__name__)


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


def parameter_name(name: str) -> str:
    """A request field's name as a CEL identifier: `public-ip-assignment` -> `public_ip_assignment`."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class RequestContext:
    """What a rule expression sees of one request (the bindings; see the module's docstring)."""

    operation: str
    api_key: str
    source_ip: str
    zone: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    resource: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    now: datetime | None = None

    @property
    def service(self) -> str:
        return operation_services().get(self.operation, "general")

    def bindings(self) -> dict[str, Any]:
        now = self.now or datetime.now(timezone.utc)
        return {
            "service": self.service,
            "zone": self.zone,
            "now": now.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "source_ip": self.source_ip,
            "api_key": self.api_key,
            "operation": self.operation,
            "parameters": dict(self.parameters),
            "resource": {k: dict(v) for k, v in self.resource.items()},
        }


def request_parameters(
    path_params: Mapping[str, str], query: Mapping[str, str], body: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The `parameters` binding: body fields, then query, then path parameters (the path wins), top-level
    names with `-` as `_`."""
    out: dict[str, Any] = {}
    for source in (body or {}, query, path_params):
        for k, v in source.items():
            out[parameter_name(k)] = v
    return out


def _in_ip_range(ip: celtypes.Value, cidr: celtypes.Value) -> celtypes.BoolType:
    return celtypes.BoolType(ipaddress.ip_address(str(ip)) in ipaddress.ip_network(str(cidr), strict=False))


def _has(mapping: celtypes.Value, name: celtypes.Value) -> celtypes.BoolType:
    if not isinstance(mapping, celtypes.MapType):
        raise TypeError(f"has() on {type(mapping).__name__}, expected a map")
    return celtypes.BoolType(celtypes.StringType(str(name)) in mapping)


FUNCTIONS: dict[str, Any] = {"inIpRange": _in_ip_range, "has": _has}

_ENV = celpy.Environment()


@dataclass(frozen=True)
class Rule:
    """One rule: its action and its CEL expression, compiled once (None when it does not compile)."""

    action: str  # allow | deny
    expression: str
    program: Any = field(default=None, repr=False, compare=False)
    invalid: str | None = None  # why the expression does not compile

    @classmethod
    def compile(cls, action: str, expression: str) -> Rule:
        try:
            program = _ENV.program(_ENV.compile(expression), functions=FUNCTIONS)
        except Exception as e:  # celpy's parse errors and anything its compiler raises on odd input
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return cls(action, expression, None, f"does not parse: {reason}")
        return cls(action, expression, program)

    def verdict(self, activation: Any) -> bool | None:
        """True or False when the expression evaluates to a boolean; None when it is invalid (skipped)."""
        if self.program is None:
            return None
        try:
            value = self.program.evaluate(activation)
        except Exception as e:  # CELEvalError, and errors of the extra functions on bad input
            log.debug("IAM rule %r skipped: %s", self.expression, e)
            return None
        if not isinstance(value, celtypes.BoolType):
            log.debug("IAM rule %r skipped: its value %r is not a boolean", self.expression, value)
            return None
        return bool(value)


@dataclass(frozen=True)
class ServicePolicy:
    type: str  # allow | deny | rules
    rules: tuple[Rule, ...] = ()

    def decide(self, activation: Any) -> bool:
        if self.type != "rules":
            return self.type == "allow"
        for r in self.rules:
            verdict = r.verdict(activation)
            if verdict:
                return r.action == "allow"
        return False  # no rule decided: denied whatever the default strategy


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
            for i, r in enumerate(sp.get("rules") or []):
                if r.get("action") not in ("allow", "deny"):
                    raise IAMError(
                        "invalid", f"service {name!r}: rule action {r.get('action')!r}: expected allow or deny"
                    )
                if r.get("resources"):
                    raise IAMError(
                        "invalid",
                        f"service {name!r}: rule resources are not supported by this local Exoscale (a deviation)",
                    )
                rule = Rule.compile(r["action"], str(r.get("expression", "")))
                if rule.invalid:
                    log.info("IAM policy: service %s, rule %d %s; it will be skipped", name, i, rule.invalid)
                rules.append(rule)
            if kind == "rules" and not rules:
                raise IAMError("invalid", f"service {name!r}: type rules needs at least one rule")
            services[name] = ServicePolicy(kind, tuple(rules))
        return cls(strategy, services, doc)

    def allows(self, request: RequestContext) -> bool:
        sp = self.services.get(request.service)
        if sp is None:
            return self.default_service_strategy == "allow"
        return sp.decide(celpy.json_to_cel(request.bindings()))


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

    def authorize(self, key: str, request: RequestContext) -> None:
        """IAMError(forbidden) when the role of `key` does not allow the request."""
        with self.lock:
            k = self.get_api_key(key)
            role = self.roles.get(k.role_id)
            if role is None or not role.policy.allows(request):
                raise IAMError(
                    "forbidden",
                    f"Forbidden: the IAM role of API key {key} does not allow {request.operation} "
                    f"(service {request.service})",
                )
