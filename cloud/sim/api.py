"""The HTTP face of the simulated Exoscale API v2: signatures, spec checks, faults, routes.

Every request goes through, in order: injected latency and faults (429/503), the EXO2-HMAC-SHA256
signature check (403 when missing, malformed, wrong or expired), validation against Exoscale's
published OpenAPI spec as the `exoscale` package ships it (400 with the reason: unknown path or
method, bad parameter, body that breaks the schema), then the route, which calls the state model
(cloud.sim.model) and renders its objects as the spec's JSON. Knows nothing of the state rules.

This module shares no code with cloud.exoscale_driver on purpose: the sim must catch the driver's
mistakes, not repeat them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib.metadata
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

from cloud.sim.model import ZONES, Instance, InstanceType, Model, ModelError, Operation, SecurityGroup, SSHKey, Template

log = logging.getLogger(__name__)

API_PREFIX = "/v2"
_STATUS_OF_KIND = {"not-found": 404, "conflict": 409, "invalid": 400}


# ------------------------------------------------------------------------------------- the spec


def spec_path() -> str:
    """Exoscale's OpenAPI spec as shipped by the `exoscale` package (located, never imported)."""
    return str(importlib.metadata.distribution("exoscale").locate_file("exoscale/openapi.json"))


class SpecError(Exception):
    pass


class SpecValidator:
    """Requests (and, for tests, responses) checked against the OpenAPI spec with openapi-core."""

    _lock = threading.Lock()
    _shared: SpecValidator | None = None

    def __init__(self, path: str | None = None):
        from openapi_core import Config, OpenAPI

        with open(path or spec_path()) as f:
            self.spec = json.load(f)
        # openapi-core breaks ties between templates with as many variables by spec order, so that
        # PUT /instance/X:reboot would match /instance/{id}: give it the most literal templates first.
        ordered = dict(self.spec)
        ordered["paths"] = dict(
            sorted(self.spec["paths"].items(), key=lambda kv: -len(re.sub(r"\{[^}]+\}", "", kv[0])))
        )
        # The spec carries non-standard tag fields; lint it off, validate requests with it all the same.
        self.api = OpenAPI.from_dict(ordered, config=Config(spec_validator_cls=None))
        self.response_api = OpenAPI.from_dict(
            _with_response_deviations(ordered), config=Config(spec_validator_cls=None)
        )
        self.query_names = self._query_names()

    @classmethod
    def shared(cls) -> SpecValidator:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def _query_names(self) -> list[tuple[re.Pattern, str, set[str]]]:
        """(path regex, method, query parameter names) for every operation of the spec."""
        out = []
        for path, item in self.spec["paths"].items():
            rx = re.compile("^" + API_PREFIX + re.sub(r"\\\{[^}]+\\\}", "[^/:]+", re.escape(path)) + "$")
            for method, op in item.items():
                if isinstance(op, dict) and "responses" in op:
                    out.append(
                        (
                            rx,
                            method,
                            {
                                p["name"]
                                for p in op.get("parameters", []) + item.get("parameters", [])
                                if p.get("in") == "query"
                            },
                        )
                    )
        return out

    def _request(self, method: str, path: str, query: dict[str, list[str]], body: bytes | None):
        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        class Req:
            host_url = "https://api-ch-gva-2.exoscale.com"
            full_url_pattern = host_url + path
            content_type = "application/json"

        r = Req()
        r.path = path
        r.method = method.lower()
        r.parameters = RequestParameters(
            query=ImmutableMultiDict([(k, v) for k, vs in query.items() for v in vs]),
            header=Headers({"Content-Type": "application/json"}),
            cookie=ImmutableMultiDict(),
            path={},
        )
        r.body = body or None
        return r

    def validate_request(self, method: str, path: str, query: dict[str, list[str]], body: bytes | None) -> None:
        """Raise SpecError with the reason when the spec refuses the request.

        Stricter than the spec in one way: a query parameter the operation does not declare is refused,
        so that a misspelt filter in the driver fails loudly instead of being ignored.
        """
        try:
            self.api.validate_request(self._request(method, path, query, body))
        except Exception as e:  # openapi-core raises a family of errors; the text is the reason
            raise SpecError(_reason(e)) from None
        if query:
            known: set[str] = set()
            for rx, m, names in self.query_names:
                if m == method.lower() and rx.match(path):
                    known |= names
            unknown = set(query) - known
            if unknown:
                raise SpecError(f"unknown query parameter(s) {', '.join(sorted(unknown))} for {method.upper()} {path}")

    def validate_response(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes | None, status: int, response_body: bytes
    ) -> None:
        class Resp:
            status_code = status
            content_type = "application/json"
            data = response_body

        from werkzeug.datastructures import Headers

        Resp.headers = Headers({"Content-Type": "application/json"})
        try:
            self.response_api.validate_response(self._request(method, path, query, body), Resp())
        except Exception as e:
            raise SpecError(_reason(e)) from None


# Where the published spec and the live API disagree, the live API wins; each deviation is named here.
KNOWN_RESPONSE_DEVIATIONS = {
    # The spec marks security-group.rules writeOnly, yet GET /security-group/{id} returns the rules:
    # Exoscale's own Terraform provider imports a rule by reading them back.
    ("security-group", "rules"): "writeOnly",
}


def _with_response_deviations(spec: dict) -> dict:
    import copy

    spec = copy.deepcopy(spec)
    for (schema, prop), marker in KNOWN_RESPONSE_DEVIATIONS.items():
        spec["components"]["schemas"][schema]["properties"][prop].pop(marker, None)
    return spec


def _reason(e: Exception) -> str:
    text = str(e)
    cause = e.__cause__ or e.__context__
    errors = getattr(cause, "schema_errors", None)
    if errors:
        text += ": " + "; ".join(getattr(x, "message", str(x)) for x in errors)
    return text.replace("https://api-ch-gva-2.exoscale.com", "")[:600]


# ---------------------------------------------------------------------------------- signatures

_AUTH_RE = re.compile(r"^EXO2-HMAC-SHA256 (?P<pragmas>.+)$")


class AuthError(Exception):
    pass


def signature_message(
    method: str, raw_path: str, query: dict[str, list[str]], signed: list[str], body: bytes, expires: int
) -> bytes:
    """The message Exoscale signs: method and path, body, signed query values, headers (none), expiry."""
    values = "".join(query[n][0] for n in signed if n in query and len(query[n]) == 1)
    return b"\n".join([f"{method} {raw_path}".encode(), body, values.encode(), b"", str(expires).encode()])


def verify_signature(
    method: str,
    raw_path: str,
    raw_query: str,
    body: bytes,
    header: str | None,
    key: str,
    secret: str,
    now: float | None = None,
) -> None:
    """Check an Authorization header as Exoscale documents it; raise AuthError saying why it fails."""
    if not header:
        raise AuthError("missing Authorization header")
    m = _AUTH_RE.match(header.strip())
    if not m:
        raise AuthError("malformed Authorization header: expected 'EXO2-HMAC-SHA256 credential=...'")
    pragmas = {}
    for part in m.group("pragmas").split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise AuthError(f"malformed Authorization header: bad pragma {part!r}")
        pragmas[name.strip()] = value.strip()
    for required in ("credential", "expires", "signature"):
        if required not in pragmas:
            raise AuthError(f"malformed Authorization header: no {required}=")
    if not hmac.compare_digest(pragmas["credential"], key):
        raise AuthError("unknown API key")
    try:
        expires = int(pragmas["expires"])
    except ValueError:
        raise AuthError("malformed Authorization header: expires is not a UNIX timestamp") from None
    if expires < (time.time() if now is None else now):
        raise AuthError("request signature expired")
    query = parse_qs(raw_query, keep_blank_values=True)
    signed = [n for n in pragmas.get("signed-query-args", "").split(";") if n]
    unsigned = set(query) - set(signed)
    if unsigned:
        raise AuthError(f"query parameter(s) {', '.join(sorted(unsigned))} not covered by the signature")
    message = signature_message(method, raw_path, query, signed, body, expires)
    expected = base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()
    try:
        given = base64.b64decode(pragmas["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise AuthError("malformed signature: not base64") from None
    if not hmac.compare_digest(given, base64.b64decode(expected)):
        raise AuthError("invalid request signature")


# --------------------------------------------------------------------------------------- faults


@dataclass
class HTTPFaults:
    """Faults of the HTTP layer: a share of requests refused with 429/503, latency per request."""

    error_rate: float = 0.0
    error_codes: tuple[int, ...] = (429, 503)
    latency_s: float = 0.0
    fail_next: list[tuple[int, str, str]] = field(default_factory=list)  # (status, METHOD or "", path prefix)
    seed: int | None = None
    max_consecutive: int = 3  # random faults never refuse the same request more often than this in a row

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._streak: dict[tuple[str, str], int] = {}

    def pick(self, method: str, path: str) -> int | None:
        with self._lock:
            for i, (status, m, prefix) in enumerate(self.fail_next):
                if m in ("", method) and path.startswith(prefix):
                    del self.fail_next[i]
                    return status
            key = (method, path)
            if (
                self.error_rate
                and self._streak.get(key, 0) < self.max_consecutive
                and self._rng.random() < self.error_rate
            ):
                self._streak[key] = self._streak.get(key, 0) + 1
                return self._rng.choice(self.error_codes)
            self._streak.pop(key, None)
        return None


# --------------------------------------------------------------------------------------- render


def r_zone(z: str) -> dict:
    return {"name": z, "api-endpoint": f"https://api-{z}.exoscale.com/v2", "sos-endpoint": f"https://sos-{z}.exo.io"}


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def r_instance_type(t: InstanceType) -> dict:
    return _clean(
        {
            "id": t.id,
            "family": t.family,
            "size": t.size,
            "cpus": t.cpus,
            "memory": t.memory,
            "authorized": t.authorized,
            "zones": list(t.zones),
        }
    )


def r_template(t: Template) -> dict:
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


def r_ssh_key(k: SSHKey) -> dict:
    return {"name": k.name, "fingerprint": k.fingerprint}


def r_rule(r) -> dict:
    return _clean(
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


def r_security_group(g: SecurityGroup, with_rules: bool = True) -> dict:
    d = {"id": g.id, "name": g.name, "description": g.description}
    if with_rules:
        d["rules"] = [r_rule(r) for r in g.rules]
    return d


def r_instance(i: Instance, model: Model) -> dict:
    groups = [model.security_groups[g] for g in i.security_group_ids if g in model.security_groups]
    keys = [model.ssh_keys[k] for k in i.ssh_keys if k in model.ssh_keys]
    d = {
        "id": i.id,
        "name": i.name,
        "state": i.state,
        "created-at": i.created_at,
        "disk-size": i.disk_size,
        "instance-type": r_instance_type(i.instance_type),
        "template": r_template(i.template),
        "labels": dict(i.labels),
        "ssh-keys": [r_ssh_key(k) for k in keys],
        "security-groups": [{"id": g.id, "name": g.name} for g in groups],
        "public-ip-assignment": i.public_ip_assignment,
        "mac-address": "06:" + ":".join(i.id.replace("-", "")[j : j + 2] for j in range(0, 10, 2)),
    }
    if keys:
        d["ssh-key"] = r_ssh_key(keys[0])
    if i.public_ip:
        d["public-ip"] = i.public_ip
    return d


def r_operation(op: Operation) -> dict:
    d = {"id": op.id, "state": op.state}
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


# --------------------------------------------------------------------------------------- routes

Handler = Callable[["App", dict, dict, Any], tuple[int, Any]]
ROUTES: list[tuple[str, re.Pattern, Handler]] = []


def route(method: str, pattern: str):
    rx = re.compile("^" + re.sub(r"\{([a-z_]+)\}", r"(?P<\1>[^/:]+)", pattern) + "$")

    def deco(fn):
        ROUTES.append((method, rx, fn))
        return fn

    return deco


def _labels_filter(text: str) -> dict[str, str]:
    out = {}
    for pair in text.split():
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise ModelError("invalid", f"labels filter {text!r}: expected space-separated key=value pairs")
        out[k] = v
    return out


@route("GET", "/zone")
def list_zones(app, p, q, b):
    return 200, {"zones": [r_zone(z) for z in ZONES]}


@route("GET", "/instance-type")
def list_instance_types(app, p, q, b):
    return 200, {"instance-types": [r_instance_type(t) for t in app.model.list_instance_types()]}


@route("GET", "/instance-type/{id}")
def get_instance_type(app, p, q, b):
    return 200, r_instance_type(app.model.get_instance_type(p["id"]))


@route("GET", "/template")
def list_templates(app, p, q, b):
    return 200, {"templates": [r_template(t) for t in app.model.list_templates(q.get("visibility"), q.get("family"))]}


@route("GET", "/template/{id}")
def get_template(app, p, q, b):
    return 200, r_template(app.model.get_template(p["id"]))


@route("GET", "/ssh-key")
def list_ssh_keys(app, p, q, b):
    return 200, {"ssh-keys": [r_ssh_key(k) for k in app.model.list_ssh_keys()]}


@route("POST", "/ssh-key")
def register_ssh_key(app, p, q, b):
    return 200, r_operation(app.model.register_ssh_key(b["name"], b["public-key"]))


@route("GET", "/ssh-key/{name}")
def get_ssh_key(app, p, q, b):
    return 200, r_ssh_key(app.model.get_ssh_key(p["name"]))


@route("DELETE", "/ssh-key/{name}")
def delete_ssh_key(app, p, q, b):
    return 200, r_operation(app.model.delete_ssh_key(p["name"]))


@route("GET", "/security-group")
def list_security_groups(app, p, q, b):
    return 200, {"security-groups": [r_security_group(g) for g in app.model.list_security_groups()]}


@route("POST", "/security-group")
def create_security_group(app, p, q, b):
    return 200, r_operation(app.model.create_security_group(b["name"], b.get("description", "")))


@route("GET", "/security-group/{id}")
def get_security_group(app, p, q, b):
    return 200, r_security_group(app.model.get_security_group(p["id"]))


@route("DELETE", "/security-group/{id}")
def delete_security_group(app, p, q, b):
    return 200, r_operation(app.model.delete_security_group(p["id"]))


@route("POST", "/security-group/{id}/rules")
def add_rule(app, p, q, b):
    src = b.get("security-group") or {}
    src_id = src.get("id")
    if src and not src_id and src.get("name"):
        matches = [g.id for g in app.model.list_security_groups() if g.name == src["name"]]
        if not matches:
            raise ModelError("not-found", f"security group {src['name']!r} not found")
        src_id = matches[0]
    return 200, r_operation(
        app.model.add_rule(
            p["id"],
            b["flow-direction"],
            b["protocol"],
            network=b.get("network"),
            source_group_id=src_id,
            start_port=b.get("start-port"),
            end_port=b.get("end-port"),
            icmp=b.get("icmp"),
            description=b.get("description", ""),
        )
    )


@route("DELETE", "/security-group/{id}/rules/{rule_id}")
def delete_rule(app, p, q, b):
    return 200, r_operation(app.model.delete_rule(p["id"], p["rule_id"]))


@route("GET", "/instance")
def list_instances(app, p, q, b):
    labels = _labels_filter(q["labels"]) if q.get("labels") else None
    insts = app.model.list_instances(labels, q.get("ip-address"))
    with app.model.lock:
        return 200, {"instances": [r_instance(i, app.model) for i in insts]}


@route("POST", "/instance")
def create_instance(app, p, q, b):
    return 200, r_operation(
        app.model.create_instance(
            b["name"] if "name" in b else f"vm-{int(time.time())}",
            b["instance-type"]["id"],
            b["template"]["id"],
            b["disk-size"],
            [k["name"] for k in b.get("ssh-keys", [])] + ([b["ssh-key"]["name"]] if b.get("ssh-key") else []),
            [g["id"] for g in b.get("security-groups", [])],
            b.get("labels"),
            b.get("user-data"),
            b.get("public-ip-assignment", "inet4"),
        )
    )


@route("GET", "/instance/{id}")
def get_instance(app, p, q, b):
    inst = app.model.get_instance(p["id"])
    with app.model.lock:
        return 200, r_instance(inst, app.model)


@route("DELETE", "/instance/{id}")
def delete_instance(app, p, q, b):
    return 200, r_operation(app.model.delete_instance(p["id"]))


@route("PUT", "/instance/{id}:start")
def start_instance(app, p, q, b):
    return 200, r_operation(app.model.start_instance(p["id"]))


@route("PUT", "/instance/{id}:stop")
def stop_instance(app, p, q, b):
    return 200, r_operation(app.model.stop_instance(p["id"]))


@route("PUT", "/instance/{id}:reboot")
def reboot_instance(app, p, q, b):
    return 200, r_operation(app.model.reboot_instance(p["id"]))


@route("GET", "/operation/{id}")
def get_operation(app, p, q, b):
    return 200, r_operation(app.model.get_operation(p["id"]))


# ------------------------------------------------------------------------------------------ app


@dataclass
class Exchange:
    """One request and its answer, as recorded for tests."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    status: int
    response: bytes


class App:
    """The request pipeline, independent of the HTTP server that feeds it."""

    def __init__(
        self,
        model: Model,
        key: str,
        secret: str,
        faults: HTTPFaults | None = None,
        validator: SpecValidator | None = None,
        record: bool = False,
    ):
        self.model = model
        self.key = key
        self._secret = secret
        self.faults = faults or HTTPFaults()
        self.validator = validator or SpecValidator.shared()
        self.record = record
        self.exchanges: list[Exchange] = []
        self._record_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<sim App key={self.key}>"

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        raw_path, _, raw_query = target.partition("?")
        status, payload, extra = self._handle(method, raw_path, raw_query, headers, body)
        data = json.dumps(payload).encode() if payload is not None else b""
        if self.record:
            with self._record_lock:
                self.exchanges.append(
                    Exchange(method, unquote(raw_path), parse_qs(raw_query, keep_blank_values=True), body, status, data)
                )
        return status, {"Content-Type": "application/json", **extra}, data

    def _handle(self, method, raw_path, raw_query, headers, body):
        if self.faults.latency_s:
            time.sleep(self.faults.latency_s)
        path = unquote(raw_path)
        fault = self.faults.pick(method, path.removeprefix(API_PREFIX))
        if fault:
            msg = "Too Many Requests" if fault == 429 else "Service Unavailable"
            return fault, {"message": msg}, {}
        try:
            verify_signature(method, raw_path, raw_query, body, headers.get("authorization"), self.key, self._secret)
        except AuthError as e:
            return 403, {"message": str(e)}, {}
        query = parse_qs(raw_query, keep_blank_values=True)
        if not path.startswith(API_PREFIX + "/"):
            return 404, {"message": f"no such path {path}"}, {}
        try:
            self.validator.validate_request(method, path, query, body)
        except SpecError as e:
            return 400, {"message": f"Invalid request: {e}"}, {}
        sub = path[len(API_PREFIX) :]
        for m, rx, fn in ROUTES:
            match = rx.match(sub)
            if m == method and match:
                try:
                    payload = json.loads(body) if body else {}
                    q = {k: v[0] for k, v in query.items()}
                    status, out = fn(self, match.groupdict(), q, payload)
                    return status, out, {}
                except ModelError as e:
                    return _STATUS_OF_KIND.get(e.kind, 400), {"message": e.message}, {}
        return 501, {"message": f"{method} {sub} is valid but not simulated"}, {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "exoscale-sim/1"

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, headers, data = self.server.app.handle(
            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
        )
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)


class SimServer:
    """The API served over HTTP on a thread; use as a context manager or start()/stop()."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = app
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/v2"

    def start(self) -> SimServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="exoscale-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
