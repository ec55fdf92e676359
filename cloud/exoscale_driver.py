"""Exoscale compute API v2 as an Apache Libcloud NodeDriver.

libcloud's bundled Exoscale driver speaks the CloudStack API that Exoscale has refused since 2024;
this one speaks https://api-{zone}.exoscale.com/v2. Requests are signed by Exoscale's reference signer
(requests-exoscale-auth's ExoscaleV2Auth) set as the auth of the requests session libcloud uses.

    import cloud  # registers the provider
    from libcloud.compute.providers import get_driver
    drv = get_driver("exoscale_v2")(key, secret, zone="ch-gva-2")

Asynchronous operations are polled until they end. Transient failures are retried with capped
exponential backoff and full jitter: 429 and 503 (not processed by the API) for every method; 502,
504 and connection errors only for requests that are safe to repeat (GET, PUT, DELETE), because a
POST that timed out may have been carried out. The driver is safe to use from several threads: each
thread gets its own connection. The API secret is kept in a `Secret`, which never shows its value in
a repr, a log line or an exception.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote, urlsplit

import requests
from exoscale_auth import ExoscaleV2Auth
from libcloud.common.base import ConnectionUserAndKey, JsonResponse
from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError, LibcloudError
from libcloud.compute.base import (
    KeyPair,
    Node,
    NodeAuthPassword,
    NodeAuthSSHKey,
    NodeDriver,
    NodeImage,
    NodeLocation,
    NodeSize,
)
from libcloud.compute.types import NodeState

log = logging.getLogger(__name__)

PROVIDER = "exoscale_v2"
API_PATH = "/v2"
ZONES = ("at-vie-1", "at-vie-2", "bg-sof-1", "ch-dk-2", "ch-gva-2", "de-fra-1", "de-muc-1", "hr-zag-1")


class Secret:
    """A secret string that shows itself only through reveal()."""

    __slots__ = ("_value",)

    def __init__(self, value: str | Secret):
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str) or not value:
            raise ValueError("the Exoscale API secret must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a Secret is not pickled")


class ExoscaleAPIError(BaseHTTPError):
    """The API refused a request (HTTP status `code`), with its message."""


class ExoscaleCapacityError(ExoscaleAPIError):
    """The zone cannot give the instance type now (no capacity): another zone, or later, may."""


class ExoscaleQuotaError(ExoscaleAPIError):
    """The request would pass a quota of the organization (instances, GPUs of a family, ...)."""


# How a refusal for a quota or for capacity reads: the quota or capacity said to be exceeded or lacking, not
# merely named (an IAM refusal of the operation get-quota names the service "quotas").
_QUOTA_REFUSAL = re.compile(r"quota[^.;]*\b(exceeded|reached)|\bexceed\w*[^.;]*\bquota|\blimit (exceeded|reached)")
_CAPACITY_REFUSAL = re.compile(
    r"\b(insufficient|no|not enough|out of|lack of)( \w+)? capacity|capacity[^.;]*\b(exhausted|unavailable)"
)


def _api_error(status: int, message: str, headers=None) -> ExoscaleAPIError:
    """The error for an API refusal: capacity and quota refusals get their own classes, so a caller can try
    another zone. Exoscale documents neither answer; they are recognised by status and message: a quota by a
    4xx saying a quota is exceeded ("Quota exceeded ..."), capacity by a 4xx/5xx saying capacity lacks
    ("Insufficient capacity ...")."""
    text = message.lower()
    if 400 <= status < 500 and _QUOTA_REFUSAL.search(text):
        return ExoscaleQuotaError(status, message, headers=headers)
    if status >= 400 and status not in _ALWAYS_RETRY and _CAPACITY_REFUSAL.search(text):
        return ExoscaleCapacityError(status, message, headers=headers)
    return ExoscaleAPIError(status, message, headers=headers)


class ExoscaleOperationError(LibcloudError):
    """An asynchronous operation ended in failure or timed out."""

    def __init__(
        self,
        value: str,
        reason: str | None = None,
        operation_id: str | None = None,
        reference_id: str | None = None,
        driver=None,
    ):
        super().__init__(value, driver)
        self.reason = reason
        self.operation_id = operation_id
        self.reference_id = reference_id  # the resource concerned, e.g. a half-made instance

    def __str__(self) -> str:  # the message, not LibcloudError's "<LibcloudError in <driver> ...>" repr
        return str(self.value)


class ExoscaleOperationCapacityError(ExoscaleOperationError):
    """A create accepted, whose operation then failed for lack of capacity in the zone (the other way a
    zone may say it, besides ExoscaleCapacityError for the request): another zone, or later, may."""


class ExoscaleV2Response(JsonResponse):
    def success(self) -> bool:
        return 200 <= self.status < 300

    def parse_error(self):
        try:
            body = json.loads(self.body) if self.body else {}
            message = body.get("message") or body.get("error") or self.body
        except ValueError:
            message = self.body or self.error
        message = str(message)[:500]
        error = _api_error(self.status, message, self.headers)
        if self.status in (401, 403) and type(error) is ExoscaleAPIError:
            raise InvalidCredsError(f"HTTP {self.status}: {message}")
        raise error


class ExoscaleV2Connection(ConnectionUserAndKey):
    """Signs every request with EXO2-HMAC-SHA256 through Exoscale's reference signer."""

    responseCls = ExoscaleV2Response
    host = "api-ch-gva-2.exoscale.com"

    def __init__(self, user_id, key, secure=True, host=None, port=None, **kwargs):
        super().__init__(user_id, Secret(key), secure=secure, host=host, port=port, **kwargs)

    def connect(self, *args, **kwargs):
        super().connect(*args, **kwargs)
        self.connection.session.auth = ExoscaleV2Auth(self.user_id, self.key.reveal())

    def add_default_headers(self, headers):
        headers["Content-Type"] = "application/json"
        headers["Accept"] = "application/json"
        return headers

    def encode_data(self, data):
        # the signer hashes the body as bytes; a str body breaks it
        return data.encode("utf-8") if isinstance(data, str) else data

    def __repr__(self) -> str:
        return f"<ExoscaleV2Connection {self.host}:{self.port} key={self.user_id}>"


@dataclass
class ExoscaleSecurityGroupRule:
    """One rule of a security group, in the driver's own terms (as libcloud's EC2 and OpenStack drivers
    give theirs): the API's wire names stop in the converter."""

    id: str
    direction: str  # ingress or egress
    protocol: str  # tcp, udp, icmp, icmpv6, all, ...
    start_port: int | None = None
    end_port: int | None = None
    cidr: str | None = None  # the source (ingress) or destination (egress) network, or
    source_group_id: str | None = None  # ... the members of this security group
    description: str = ""
    icmp_type: int | None = None
    icmp_code: int | None = None


@dataclass
class ExoscaleSecurityGroup:
    id: str
    name: str
    description: str = ""
    rules: list[ExoscaleSecurityGroupRule] = field(default_factory=list)
    driver: Any = field(default=None, repr=False, compare=False)


@dataclass
class ExoscaleInstancePool:
    """An instance pool: Exoscale keeps `size` identical instances (its members, `node_ids`) running in one
    zone. The member settings are those new members get; existing members keep what they were made with."""

    id: str
    name: str
    size: int
    state: str  # creating, running, scaling-up, scaling-down, updating, destroying, suspended
    node_ids: list[str] = field(default_factory=list)
    instance_type_id: str | None = None
    template_id: str | None = None
    disk_size: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    security_group_ids: list[str] = field(default_factory=list)
    ssh_keys: list[str] = field(default_factory=list)
    instance_prefix: str | None = None
    description: str = ""
    driver: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ExoscaleInstanceType:
    """An instance type and the zones that offer it (list-instance-types answers every zone's types)."""

    id: str
    name: str  # family.size, e.g. standard.medium
    cpus: int
    memory: int  # bytes
    gpus: int
    zones: tuple[str, ...]
    authorized: bool = True  # False: the organization needs Exoscale's authorization for the family

    @property
    def family(self) -> str:
        return self.name.partition(".")[0]


@dataclass(frozen=True)
class ExoscaleQuota:
    """One quota of the organization: `limit` -1 is unlimited."""

    resource: str
    usage: int
    limit: int

    @property
    def unlimited(self) -> bool:
        return self.limit < 0


@dataclass
class RetryPolicy:
    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 10.0
    retry_after_cap_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * (2**attempt)))  # full jitter


_IDEMPOTENT = frozenset({"GET", "PUT", "DELETE", "HEAD"})
_ALWAYS_RETRY = frozenset({429, 503})
_RETRY_IF_IDEMPOTENT = frozenset({502, 504})


class ExoscaleV2NodeDriver(NodeDriver):
    """Exoscale compute (API v2) for one zone."""

    connectionCls = ExoscaleV2Connection
    type = PROVIDER
    name = "Exoscale (API v2)"
    website = "https://www.exoscale.com/"
    features = {"create_node": ["ssh_key"]}  # noqa: RUF012  (libcloud declares it per instance)

    NODE_STATE_MAP = {  # noqa: RUF012  (libcloud's name; read only)
        "starting": NodeState.STARTING,
        "running": NodeState.RUNNING,
        "stopping": NodeState.STOPPING,
        "stopped": NodeState.STOPPED,
        "destroying": NodeState.PENDING,
        "destroyed": NodeState.TERMINATED,
        "expunging": NodeState.TERMINATED,
        "migrating": NodeState.PENDING,
        "error": NodeState.ERROR,
    }

    def __init__(
        self,
        key: str,
        secret: str | Secret,
        zone: str = "ch-gva-2",
        secure: bool = True,
        host: str | None = None,
        port: int | None = None,
        timeout: float | None = 60,
        retry: RetryPolicy | None = None,
        operation_timeout_s: float = 900.0,
        api_path: str = API_PATH,
        **kwargs,
    ):
        """`host`/`port`/`secure`/`api_path`: another endpoint than https://api-ZONE.exoscale.com/v2 (a
        local Exoscale); ex_zone_driver() finds another zone's endpoint as Exoscale lists it."""
        if host is None and zone not in ZONES:
            raise ValueError(f"unknown Exoscale zone {zone!r}; valid zones: {', '.join(ZONES)}")
        self.zone = zone
        self.api_path = "/" + api_path.strip("/")
        self.retry = retry or RetryPolicy()
        self.operation_timeout_s = operation_timeout_s
        self._local = threading.local()
        self._conn_params = (
            key,
            Secret(secret),
            secure,
            host or f"api-{zone}.exoscale.com",
            port or (443 if secure else 80),
            timeout,
        )
        super().__init__(
            key,
            secret=self._conn_params[1],
            secure=secure,
            host=self._conn_params[3],
            port=self._conn_params[4],
            timeout=timeout,
            **kwargs,
        )

    # One connection per thread: libcloud's Connection keeps per-request state on itself.
    @property
    def connection(self) -> ExoscaleV2Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            key, secret, secure, host, port, timeout = self._conn_params
            conn = self.connectionCls(key, secret, secure=secure, host=host, port=port, timeout=timeout)
            conn.driver = self  # type: ignore[assignment]  # libcloud annotates the class; it sets the instance
            conn.connect()
            self._local.conn = conn
        return conn

    @connection.setter
    def connection(self, value) -> None:
        self._local.conn = value  # the one BaseDriver.__init__ makes serves the creating thread

    def __repr__(self) -> str:
        return f"<ExoscaleV2NodeDriver zone={self.zone} endpoint={self._conn_params[3]}:{self._conn_params[4]}>"

    # ------------------------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, params: dict | None = None, body: Any = None) -> Any:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        attempt = 0
        while True:
            try:
                return self.connection.request(self.api_path + path, params=params, data=data, method=method).object
            except ExoscaleAPIError as e:
                retryable = e.code in _ALWAYS_RETRY or (e.code in _RETRY_IF_IDEMPOTENT and method in _IDEMPOTENT)
                if not retryable or attempt + 1 >= self.retry.attempts:
                    raise type(e)(e.code, f"{method} {path}: {e.message}", headers=e.headers) from None
                wait = self.retry.delay(attempt)
                after = (e.headers or {}).get("retry-after")
                if after:
                    try:
                        wait = max(wait, min(float(after), self.retry.retry_after_cap_s))
                    except ValueError:
                        pass
                log.info("%s %s: HTTP %s, retrying in %.2f s", method, path, e.code, wait)
            except (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError) as e:
                if method not in _IDEMPOTENT or attempt + 1 >= self.retry.attempts:
                    raise LibcloudError(
                        f"{method} {path}: {type(e).__name__}: cannot reach the Exoscale API "
                        f"at {self._conn_params[3]}:{self._conn_params[4]}",
                        driver=self,
                    ) from None
                wait = self.retry.delay(attempt)
                log.info("%s %s: %s, retrying in %.2f s", method, path, type(e).__name__, wait)
            time.sleep(wait)
            attempt += 1

    def _wait_operation(self, op: dict, what: str) -> dict:
        """Poll an operation until it ends; return it on success, raise ExoscaleOperationError otherwise."""
        deadline = time.monotonic() + self.operation_timeout_s
        delay = 0.1
        while op.get("state") == "pending":
            if time.monotonic() > deadline:
                raise ExoscaleOperationError(
                    f"{what}: operation {op.get('id')} still pending after {self.operation_timeout_s:g} s",
                    "timeout",
                    op.get("id"),
                    _ref_id(op),
                    driver=self,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
            op = self._request("GET", f"/operation/{op['id']}")
        if op.get("state") != "success":
            message = str(op.get("message") or "")
            failed = ExoscaleOperationError
            if _CAPACITY_REFUSAL.search(message.lower()):
                failed = ExoscaleOperationCapacityError
            raise failed(
                f"{what} failed: {op.get('reason', op.get('state'))}: {op.get('message', 'no message')}",
                op.get("reason") or op.get("state"),
                op.get("id"),
                _ref_id(op),
                driver=self,
            )
        return op

    def _operate(self, method: str, path: str, what: str, body: Any = None) -> dict:
        return self._wait_operation(self._request(method, path, body=body), what)

    # ---------------------------------------------------------------------------------- catalogue

    def list_locations(self) -> list[NodeLocation]:
        return [self._to_location(z) for z in self._request("GET", "/zone").get("zones", [])]

    def list_sizes(self, location=None) -> list[NodeSize]:
        types = self._request("GET", "/instance-type").get("instance-types", [])
        return sorted(
            (self._to_size(t) for t in types if self.zone in t.get("zones", [self.zone])),
            key=lambda s: (s.extra["family"], s.ram),
        )

    def list_images(
        self, location=None, ex_visibility: str | None = None, ex_family: str | None = None
    ) -> list[NodeImage]:
        images = []
        for visibility in [ex_visibility] if ex_visibility else ["public", "private"]:
            params = {"visibility": visibility}
            if ex_family:
                params["family"] = ex_family
            images += [self._to_image(t) for t in self._request("GET", "/template", params=params).get("templates", [])]
        return images

    def ex_list_instance_types(self) -> list[ExoscaleInstanceType]:
        """Every instance type of Exoscale with the zones that offer it (list_sizes gives this zone's)."""
        types = self._request("GET", "/instance-type").get("instance-types", [])
        return sorted((self._to_instance_type(t) for t in types), key=lambda t: (t.family, t.memory, t.cpus))

    def ex_list_quotas(self) -> list[ExoscaleQuota]:
        return [self._to_quota(q) for q in self._request("GET", "/quota").get("quotas", [])]

    def ex_get_quota(self, resource: str) -> ExoscaleQuota:
        """One quota, e.g. "instance" (what the Kubernetes cluster-autoscaler reads) or "gpu3"."""
        return self._to_quota(self._request("GET", f"/quota/{quote(resource, safe='')}"))

    def ex_zone_driver(self, zone: str) -> ExoscaleV2NodeDriver:
        """A driver for `zone`, with this one's credentials and settings, at the API endpoint list-zones
        gives for it (as Exoscale's Go SDK switches zones): https://api-ZONE.exoscale.com/v2 on Exoscale."""
        if zone == self.zone:
            return self
        endpoints = {loc.id: loc.extra.get("api_endpoint") for loc in self.list_locations()}
        if zone not in endpoints:
            raise ValueError(f"unknown Exoscale zone {zone!r}; valid zones: {', '.join(sorted(endpoints))}")
        url = urlsplit(endpoints[zone] or f"https://api-{zone}.exoscale.com/v2")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise LibcloudError(f"zone {zone}: the API lists an unusable endpoint {endpoints[zone]!r}", driver=self)
        secure = url.scheme == "https"
        key, secret, _, _, _, timeout = self._conn_params
        return type(self)(
            key,
            secret,
            zone=zone,
            secure=secure,
            host=url.hostname,
            port=url.port or (443 if secure else 80),
            timeout=timeout,
            retry=self.retry,
            operation_timeout_s=self.operation_timeout_s,
            api_path=url.path or API_PATH,
        )

    def ex_get_size(self, name_or_id: str) -> NodeSize:
        return self._find(self.list_sizes(), name_or_id, "instance type")

    def ex_get_image(self, name_or_id: str) -> NodeImage:
        return self._find(self.list_images(), name_or_id, "template")

    def _find(self, items: list, name_or_id: str, what: str):
        """The item whose id or name is `name_or_id`, else a one-line error listing the valid names."""
        for item in items:
            if name_or_id in (item.id, item.name):
                return item
        raise ValueError(
            f"unknown {what} {name_or_id!r} in {self.zone}; valid: {', '.join(sorted({i.name for i in items}))}"
        )

    # ------------------------------------------------------------------------------------- nodes

    def create_node(
        self,
        name: str,
        size: NodeSize | str,
        image: NodeImage | str,
        location=None,
        auth: NodeAuthSSHKey | NodeAuthPassword | None = None,
        ex_disk_size: int = 50,
        ex_ssh_keys: Iterable[str | KeyPair] | None = None,
        ex_security_groups: Iterable[str | ExoscaleSecurityGroup] | None = None,
        ex_userdata: str | None = None,
        ex_labels: dict[str, str] | None = None,
        ex_public_ip: str = "inet4",
    ) -> Node:
        """Create an instance and wait until its creation ends.

        `auth=NodeAuthSSHKey(public_key)` (libcloud's way, used by deploy_node) lets the instance accept
        that key: Exoscale takes only registered keys by name, so the key registered with the same
        fingerprint is used, or the key is registered as `libcloud-<fingerprint>`."""
        if location is not None and getattr(location, "id", location) != self.zone:
            raise ValueError(
                f"this driver serves zone {self.zone}; make another for {getattr(location, 'id', location)}"
            )
        fields = self._instance_fields(
            size, image, ex_disk_size, ex_ssh_keys, ex_security_groups, ex_userdata, ex_labels, ex_public_ip, auth
        )
        body = {"name": name, **fields}
        op = self._operate("POST", "/instance", f"create instance {name!r}", body)
        return self.ex_get_node(_required_ref(op))

    def _instance_fields(
        self,
        size: NodeSize | str,
        image: NodeImage | str,
        disk_size: int,
        ssh_keys: Iterable[str | KeyPair] | None,
        security_groups: Iterable[str | ExoscaleSecurityGroup] | None,
        userdata: str | None,
        labels: dict[str, str] | None,
        public_ip: str,
        auth: NodeAuthSSHKey | NodeAuthPassword | None = None,
    ) -> dict[str, Any]:
        """An instance's settings (create_node's, and a pool's for its members) as the API's request fields."""
        if public_ip not in ("inet4", "dual", "none"):
            raise ValueError(f"ex_public_ip must be inet4, dual or none, got {public_ip!r}")
        size_id = size.id if isinstance(size, NodeSize) else self.ex_get_size(size).id
        image_id = image.id if isinstance(image, NodeImage) else self.ex_get_image(image).id
        body: dict[str, Any] = {
            "instance-type": {"id": size_id},
            "template": {"id": image_id},
            "disk-size": int(disk_size),
            "public-ip-assignment": public_ip,
        }
        keys = [k.name if isinstance(k, KeyPair) else k for k in ssh_keys or ()]
        if auth is not None and isinstance(self._get_and_check_auth(auth), NodeAuthSSHKey):
            keys.append(self._registered_key_name(cast(NodeAuthSSHKey, auth).pubkey))
        if keys:
            body["ssh-keys"] = [{"name": k} for k in dict.fromkeys(keys)]
        if security_groups:
            body["security-groups"] = [{"id": g} for g in self._security_group_ids(security_groups)]
        if userdata:
            body["user-data"] = base64.b64encode(userdata.encode("utf-8")).decode("ascii")
        if labels:
            body["labels"] = dict(labels)
        return body

    def ex_get_node(self, node_id: str) -> Node:
        return self._to_node(self._request("GET", f"/instance/{node_id}"))

    def list_nodes(self, ex_labels: dict[str, str] | None = None) -> list[Node]:
        params = None
        if ex_labels:
            bad = [k for k, v in ex_labels.items() if any(c.isspace() for c in k + v) or "=" in k]
            if bad:
                raise ValueError(f"label filter keys/values may not hold white space or '=' in keys: {bad}")
            params = {"labels": " ".join(f"{k}={v}" for k, v in ex_labels.items())}
        instances = self._request("GET", "/instance", params=params).get("instances", [])
        nodes = [self._to_node(i) for i in instances]
        if ex_labels:  # never act on what the filter did not ask for, whatever the API returned
            nodes = [n for n in nodes if all(n.extra["labels"].get(k) == v for k, v in ex_labels.items())]
        return nodes

    def destroy_node(self, node: Node) -> bool:
        self._operate("DELETE", f"/instance/{node.id}", f"destroy instance {node.name!r}")
        return True

    def reboot_node(self, node: Node) -> bool:
        self._operate("PUT", f"/instance/{node.id}:reboot", f"reboot instance {node.name!r}")
        return True

    def start_node(self, node: Node) -> bool:
        self._operate("PUT", f"/instance/{node.id}:start", f"start instance {node.name!r}", {})
        return True

    def stop_node(self, node: Node) -> bool:
        self._operate("PUT", f"/instance/{node.id}:stop", f"stop instance {node.name!r}")
        return True

    # --------------------------------------------------------------------------------- key pairs

    def list_key_pairs(self) -> list[KeyPair]:
        return [self._to_key_pair(k) for k in self._request("GET", "/ssh-key").get("ssh-keys", [])]

    def get_key_pair(self, name: str) -> KeyPair:
        return self._to_key_pair(self._request("GET", f"/ssh-key/{name}"))

    def import_key_pair_from_string(self, name: str, key_material: str) -> KeyPair:
        self._operate(
            "POST", "/ssh-key", f"register SSH key {name!r}", {"name": name, "public-key": key_material.strip()}
        )
        kp = self.get_key_pair(name)
        kp.public_key = key_material.strip()
        return kp

    def _registered_key_name(self, public_key: str) -> str:
        """The name of the registered key with this public key's fingerprint; registers it when none is."""
        fingerprint = md5_fingerprint(public_key)
        for k in self.list_key_pairs():
            if k.fingerprint == fingerprint:
                return k.name
        name = "libcloud-" + fingerprint.replace(":", "")[:16]
        self.import_key_pair_from_string(name, public_key)
        return name

    def import_key_pair_from_file(self, name: str, key_file_path: str) -> KeyPair:
        with open(key_file_path) as f:
            return self.import_key_pair_from_string(name, f.read())

    def delete_key_pair(self, key_pair: KeyPair | str) -> bool:
        name = key_pair.name if isinstance(key_pair, KeyPair) else key_pair
        self._operate("DELETE", f"/ssh-key/{name}", f"delete SSH key {name!r}")
        return True

    # --------------------------------------------------------------------------- security groups

    def ex_list_security_groups(self) -> list[ExoscaleSecurityGroup]:
        return [self._to_security_group(g) for g in self._request("GET", "/security-group").get("security-groups", [])]

    def ex_get_security_group(self, group_id: str) -> ExoscaleSecurityGroup:
        return self._to_security_group(self._request("GET", f"/security-group/{group_id}"))

    def ex_create_security_group(self, name: str, description: str | None = None) -> ExoscaleSecurityGroup:
        body = {"name": name}
        if description:
            body["description"] = description
        op = self._operate("POST", "/security-group", f"create security group {name!r}", body)
        return self.ex_get_security_group(_required_ref(op))

    def ex_delete_security_group(self, group: ExoscaleSecurityGroup | str) -> bool:
        gid = self._security_group_ids([group])[0]
        self._operate("DELETE", f"/security-group/{gid}", f"delete security group {gid}")
        return True

    def ex_add_security_group_rule(
        self,
        group: ExoscaleSecurityGroup | str,
        protocol: str = "tcp",
        start_port: int | None = None,
        end_port: int | None = None,
        cidr: str | None = None,
        source_group: ExoscaleSecurityGroup | str | None = None,
        direction: str = "ingress",
        description: str | None = None,
        icmp_type: int = -1,
        icmp_code: int = -1,
    ) -> ExoscaleSecurityGroup:
        """Allow `protocol` (tcp, udp, icmp, all...) from a CIDR or from members of another group."""
        if (cidr is None) == (source_group is None):
            raise ValueError("give exactly one source: cidr='0.0.0.0/0' or source_group=<group>")
        if direction not in ("ingress", "egress"):
            raise ValueError(f"direction must be ingress or egress, got {direction!r}")
        gid = self._security_group_ids([group])[0]
        body: dict[str, Any] = {"flow-direction": direction, "protocol": protocol}
        if cidr is not None:
            body["network"] = cidr
        elif source_group is not None:  # the spec makes a source group's id read-only here: it is named
            body["security-group"] = {"name": self._security_group_name(source_group)}
        if protocol in ("tcp", "udp"):
            if start_port is None:
                raise ValueError(f"a {protocol} rule needs start_port (and end_port for a range)")
            body["start-port"] = int(start_port)
            body["end-port"] = int(end_port if end_port is not None else start_port)
        elif protocol in ("icmp", "icmpv6"):
            body["icmp"] = {"type": icmp_type, "code": icmp_code}
        if description:
            body["description"] = description
        self._operate("POST", f"/security-group/{gid}/rules", f"add rule to security group {gid}", body)
        return self.ex_get_security_group(gid)

    def _security_group_name(self, group: ExoscaleSecurityGroup | str) -> str:
        if isinstance(group, ExoscaleSecurityGroup):
            return group.name
        if _looks_like_uuid(group):
            return self.ex_get_security_group(group).name
        return group

    def _security_group_ids(self, groups: Iterable[ExoscaleSecurityGroup | str]) -> list[str]:
        ids: list[str] = []
        names: dict[str, str] = {}
        for g in groups:
            if isinstance(g, ExoscaleSecurityGroup):
                ids.append(g.id)
            elif _looks_like_uuid(g):
                ids.append(g)
            else:
                if not names:
                    names = {sg.name: sg.id for sg in self.ex_list_security_groups()}
                if g not in names:
                    raise ValueError(f"no security group named {g!r}; existing: {', '.join(sorted(names)) or 'none'}")
                ids.append(names[g])
        return ids

    # ---------------------------------------------------------------------------- instance pools

    def ex_create_instance_pool(
        self,
        name: str,
        size: NodeSize | str,
        image: NodeImage | str,
        count: int,
        ex_disk_size: int = 50,
        ex_ssh_keys: Iterable[str | KeyPair] | None = None,
        ex_security_groups: Iterable[str | ExoscaleSecurityGroup] | None = None,
        ex_userdata: str | None = None,
        ex_labels: dict[str, str] | None = None,
        ex_public_ip: str = "inet4",
        ex_instance_prefix: str | None = None,
        ex_description: str | None = None,
    ) -> ExoscaleInstancePool:
        """Create an instance pool of `count` members (at least 1: the API refuses an empty new pool) of
        instance type `size` from template `image`, with create_node's member settings; wait until its
        creation ends. Its members may still be starting: wait for them with ex_get_node."""
        if count < 1:
            raise ValueError(f"a new instance pool needs count >= 1 (scale it to 0 afterwards), got {count}")
        fields = self._instance_fields(
            size, image, ex_disk_size, ex_ssh_keys, ex_security_groups, ex_userdata, ex_labels, ex_public_ip
        )
        body = {"name": name, "size": int(count), **fields}
        if ex_instance_prefix:
            body["instance-prefix"] = ex_instance_prefix
        if ex_description:
            body["description"] = ex_description
        op = self._operate("POST", "/instance-pool", f"create instance pool {name!r}", body)
        return self.ex_get_instance_pool(_required_ref(op))

    def ex_get_instance_pool(self, pool_id: str) -> ExoscaleInstancePool:
        return self._to_instance_pool(self._request("GET", f"/instance-pool/{pool_id}"))

    def ex_list_instance_pools(self) -> list[ExoscaleInstancePool]:
        return [self._to_instance_pool(p) for p in self._request("GET", "/instance-pool").get("instance-pools", [])]

    def ex_scale_instance_pool(self, pool: ExoscaleInstancePool | str, count: int) -> ExoscaleInstancePool:
        """Set the number of members: new ones are made, or Exoscale removes the ones it chooses (to choose,
        evict them with ex_evict_instance_pool_members)."""
        if count < 0:
            raise ValueError(f"an instance pool's count must be >= 0, got {count}")
        pid = _pool_id(pool)
        self._operate(
            "PUT", f"/instance-pool/{pid}:scale", f"scale instance pool {pid} to {count}", {"size": int(count)}
        )
        return self.ex_get_instance_pool(pid)

    def ex_evict_instance_pool_members(
        self, pool: ExoscaleInstancePool | str, nodes: Iterable[Node | str]
    ) -> ExoscaleInstancePool:
        """Remove these members (destroyed) and lower the pool's size by as many."""
        ids = list(dict.fromkeys(n.id if isinstance(n, Node) else n for n in nodes))
        if not ids:
            raise ValueError("ex_evict_instance_pool_members: name at least one member")
        pid = _pool_id(pool)
        self._operate(
            "PUT",
            f"/instance-pool/{pid}:evict",
            f"evict {len(ids)} member(s) of instance pool {pid}",
            {"instances": ids},
        )
        return self.ex_get_instance_pool(pid)

    def ex_delete_instance_pool(self, pool: ExoscaleInstancePool | str) -> bool:
        """Delete the pool and its members."""
        pid = _pool_id(pool)
        self._operate("DELETE", f"/instance-pool/{pid}", f"delete instance pool {pid}")
        return True

    # -------------------------------------------------------------------------------- converters

    def _to_location(self, z: dict) -> NodeLocation:
        name = z["name"]
        return NodeLocation(
            id=name,
            name=name,
            country=name.split("-")[0].upper(),
            driver=self,
            extra={"api_endpoint": z.get("api-endpoint")},
        )

    def _to_size(self, t: dict) -> NodeSize:
        return NodeSize(
            id=t["id"],
            name=f"{t['family']}.{t['size']}",
            ram=int(t.get("memory", 0)) // (1024 * 1024),
            disk=None,  # type: ignore[arg-type]  # unknown, as in libcloud's own drivers: disk-size is per instance
            bandwidth=None,
            price=None,  # type: ignore[arg-type]  # the API publishes no prices
            driver=self,
            extra={
                "cpus": t.get("cpus"),
                "gpus": t.get("gpus", 0),
                "family": t["family"],
                "size": t["size"],
                "authorized": t.get("authorized", True),
                "zones": t.get("zones", []),
            },
        )

    def _to_instance_type(self, t: dict) -> ExoscaleInstanceType:
        return ExoscaleInstanceType(
            id=t["id"],
            name=f"{t['family']}.{t['size']}",
            cpus=int(t.get("cpus") or 0),
            memory=int(t.get("memory") or 0),
            gpus=int(t.get("gpus") or 0),
            zones=tuple(t.get("zones") or ()),
            authorized=bool(t.get("authorized", True)),
        )

    @staticmethod
    def _to_quota(q: dict) -> ExoscaleQuota:
        return ExoscaleQuota(
            resource=q.get("resource", ""), usage=int(q.get("usage") or 0), limit=int(q.get("limit", -1))
        )

    def _to_image(self, t: dict) -> NodeImage:
        return NodeImage(
            id=t["id"],
            name=t["name"],
            driver=self,
            extra={
                "default_user": t.get("default-user"),
                "family": t.get("family"),
                "version": t.get("version"),
                "build": t.get("build"),
                "visibility": t.get("visibility"),
                "size": t.get("size"),
                "boot_mode": t.get("boot-mode"),
                "zones": t.get("zones", []),
            },
        )

    def _to_node(self, i: dict) -> Node:
        manager = i.get("manager") or {}
        public = [i["public-ip"]] if i.get("public-ip") else []
        if i.get("ipv6-address"):
            public.append(i["ipv6-address"])
        return Node(
            id=i["id"],
            name=i.get("name", ""),
            state=self.NODE_STATE_MAP.get(i.get("state") or "", NodeState.UNKNOWN),
            public_ips=public,
            private_ips=[],
            driver=self,
            created_at=i.get("created-at"),
            extra={
                "zone": self.zone,
                "state": i.get("state"),
                "labels": dict(i.get("labels") or {}),
                "instance_type_id": (i.get("instance-type") or {}).get("id"),
                "instance_type": _type_name(i.get("instance-type") or {}),
                "template_id": (i.get("template") or {}).get("id"),
                "security_group_ids": [g.get("id") for g in i.get("security-groups") or []],
                "ssh_keys": [k.get("name") for k in i.get("ssh-keys") or []],
                "disk_size": i.get("disk-size"),
                "instance_pool_id": manager.get("id") if manager.get("type") == "instance-pool" else None,
            },
        )

    def _to_instance_pool(self, p: dict) -> ExoscaleInstancePool:
        return ExoscaleInstancePool(
            id=p["id"],
            name=p.get("name", ""),
            size=int(p.get("size") or 0),
            state=p.get("state", ""),
            node_ids=[i["id"] for i in p.get("instances") or []],
            instance_type_id=(p.get("instance-type") or {}).get("id"),
            template_id=(p.get("template") or {}).get("id"),
            disk_size=p.get("disk-size"),
            labels=dict(p.get("labels") or {}),
            security_group_ids=[g.get("id") for g in p.get("security-groups") or []],
            ssh_keys=[k.get("name") for k in p.get("ssh-keys") or []],
            instance_prefix=p.get("instance-prefix"),
            description=p.get("description") or "",
            driver=self,
        )

    def _to_key_pair(self, k: dict) -> KeyPair:
        # the API never returns the public key; import_key_pair_from_string fills it in
        return KeyPair(name=k["name"], public_key="", fingerprint=k.get("fingerprint") or "", driver=self)

    def _to_security_group(self, g: dict) -> ExoscaleSecurityGroup:
        return ExoscaleSecurityGroup(
            id=g["id"],
            name=g.get("name", ""),
            description=g.get("description") or "",
            rules=[self._to_rule(r) for r in g.get("rules") or []],
            driver=self,
        )

    def _to_rule(self, r: dict) -> ExoscaleSecurityGroupRule:
        icmp = r.get("icmp") or {}
        return ExoscaleSecurityGroupRule(
            id=r.get("id", ""),
            direction=r.get("flow-direction", ""),
            protocol=r.get("protocol", ""),
            start_port=r.get("start-port"),
            end_port=r.get("end-port"),
            cidr=r.get("network"),
            source_group_id=(r.get("security-group") or {}).get("id"),
            description=r.get("description") or "",
            icmp_type=icmp.get("type"),
            icmp_code=icmp.get("code"),
        )

    # ------------------------------------------------------------------- updates, other services

    def ex_update_node(self, node: Node, name: str | None = None, labels: dict[str, str] | None = None) -> Node:
        """Rename an instance and/or replace its labels (Exoscale replaces the whole label set: read,
        merge and write under a lock of your own to change one label without losing the others)."""
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if labels is not None:
            body["labels"] = dict(labels)
        if not body:
            raise ValueError("ex_update_node: give name and/or labels")
        self._operate("PUT", f"/instance/{node.id}", f"update instance {node.name!r}", body)
        return self.ex_get_node(str(node.id))

    def ex_call(self, method: str, path: str, body: Any = None, params: dict | None = None, what: str = "") -> Any:
        """A signed request to any API v2 path (retried as every request is); an operation it returns is
        waited for when `what` names it. For services this driver has no methods for (e.g. IAM)."""
        answer = self._request(method, path, params=params, body=body)
        if what and isinstance(answer, dict) and "state" in answer and "id" in answer:
            return self._wait_operation(answer, what)
        return answer


def md5_fingerprint(public_key: str) -> str:
    """The MD5 fingerprint Exoscale shows for an SSH public key ("aa:bb:..."), from "TYPE BASE64 [COMMENT]"."""
    try:
        blob = base64.b64decode(public_key.split()[1], validate=True)
    except (IndexError, ValueError):
        raise ValueError("not an SSH public key: expected 'TYPE BASE64 [COMMENT]'") from None
    digest = hashlib.md5(blob).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


def _required_ref(op: dict) -> str:
    """The id of the resource an operation made; an operation that names none is an API fault."""
    ref = _ref_id(op)
    if not ref:
        raise ExoscaleOperationError(
            f"operation {op.get('id')} succeeded but names no resource", "no-reference", op.get("id")
        )
    return ref


def _pool_id(pool: ExoscaleInstancePool | str) -> str:
    return pool.id if isinstance(pool, ExoscaleInstancePool) else pool


def _ref_id(op: dict) -> str | None:
    return (op.get("reference") or {}).get("id")


def _looks_like_uuid(text: str) -> bool:
    import uuid

    try:
        uuid.UUID(str(text))
        return True
    except ValueError:
        return False


def _type_name(t: dict) -> str | None:
    """An instance type's name (family.size) when the reference carries them; Exoscale's list-instances may give
    the id alone, which ExoscaleV2NodeDriver.ex_list_instance_types resolves."""
    family, size = t.get("family"), t.get("size")
    return f"{family}.{size}" if family and size else None
