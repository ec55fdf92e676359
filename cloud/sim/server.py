"""The request pipeline of the local Exoscale and the HTTP server that feeds it.

Every request goes through, in order: injected latency and faults (429/503); the spec's operation for its
method and path; the EXO2-HMAC-SHA256 signature (403 when missing, malformed, wrong or expired; public
operations such as list-zones may come unsigned); the IAM policy of a restricted key (403; its CEL rules see
the request as cloud.sim.iam.RequestContext says); validation
against Exoscale's published OpenAPI spec (400 with the reason); then the operation's handler
(cloud.sim.urls), which calls the state model. An operation of the spec that is not served answers 501.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

from cloud.sim.auth import AuthError, verify_request
from cloud.sim.iam import RequestContext, request_parameters
from cloud.sim.model import ZONES, Model, ModelError
from cloud.sim.responses import Request
from cloud.sim.spec import API_PREFIX, SpecError, SpecOperation, SpecValidator
from cloud.sim.urls import HANDLERS, PUBLIC_OPERATIONS

log = logging.getLogger(__name__)

STATUS_OF_ERROR_KIND = {
    "not-found": 404,
    "conflict": 409,
    "invalid": 400,
    "forbidden": 403,
    "quota": 403,
    "capacity": 500,
}


@dataclass
class HTTPFaults:
    """Faults of the HTTP layer: a share of requests refused with 429/503, latency per request."""

    error_rate: float = 0.0
    error_codes: tuple[int, ...] = (429, 503)
    latency_s: float = 0.0
    fail_next: list[tuple[int, str, str]] = field(default_factory=list)  # (status, METHOD or "", path prefix)
    seed: int | None = None
    max_consecutive: int = 3  # random faults never refuse the same request more often than this in a row

    def __post_init__(self) -> None:
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


@dataclass
class Exchange:
    """One request and its answer, as recorded for tests."""

    method: str
    path: str  # the API's path (/v2/...), without the zone prefix of a zone's endpoint
    query: dict[str, list[str]]
    body: bytes = field(repr=False)  # bodies may hold secrets (a new API key's, in its answer)
    status: int
    response: bytes = field(repr=False)
    zone: str = ""  # the zone whose endpoint was called


def split_zone(raw_path: str, default: str) -> tuple[str, str]:
    """(zone, API path) of a request path: /ZONE/v2/... is zone ZONE's endpoint (the `api-endpoint` that
    list-zones gives for it, as Exoscale gives https://api-ZONE.exoscale.com/v2), /v2/... the default zone's."""
    head, sep, rest = raw_path.lstrip("/").partition("/")
    if head in ZONES and sep and ("/" + rest).startswith(API_PREFIX):
        return head, "/" + rest
    return default, raw_path


class App:
    """The request pipeline, independent of the HTTP server that feeds it. `key`/`secret` is the account's
    own, unrestricted key pair; keys made with create-api-key are restricted by their role."""

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

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes, source_ip: str = "127.0.0.1"
    ) -> tuple[int, dict, bytes]:
        """One request; `source_ip` is the address it came from (the `source_ip` of IAM rules)."""
        raw_path, _, raw_query = target.partition("?")
        zone, api_path = split_zone(raw_path, self.model.zone)
        model = self.model.in_zone(zone)
        status, payload = self._handle(model, method, raw_path, api_path, raw_query, headers, body, source_ip)
        data = json.dumps(payload).encode() if payload is not None else b""
        if self.record:
            with self._record_lock:
                query = parse_qs(raw_query, keep_blank_values=True)
                self.exchanges.append(Exchange(method, unquote(api_path), query, body, status, data, zone))
        return status, {"Content-Type": "application/json"}, data

    def _secret_of(self, key: str) -> str | None:
        return self._secret if key == self.key else self.model.iam.secret_of(key)

    def _policy_request(
        self,
        model: Model,
        caller: str,
        operation: SpecOperation,
        sub: str,
        raw_query: str,
        body: bytes,
        source_ip: str,
    ) -> RequestContext:
        """What the IAM rules of a restricted key see of this request (cloud.sim.iam.RequestContext). The
        body is read leniently here: a body the spec refuses is refused after this check, as on Exoscale."""
        query = {k: v[0] for k, v in parse_qs(raw_query, keep_blank_values=True).items()}
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}
        path_params = operation.path_params(sub)
        return RequestContext(
            operation.operation_id,
            caller,
            source_ip,
            model.zone,
            request_parameters(path_params, query, parsed if isinstance(parsed, dict) else {}),
            model.policy_resource(operation.tags[0] if operation.tags else "", path_params.get("id")),
        )

    def _handle(
        self,
        model: Model,
        method: str,
        raw_path: str,
        api_path: str,
        raw_query: str,
        headers: dict[str, str],
        body: bytes,
        source_ip: str,
    ) -> tuple[int, Any]:
        """`raw_path` as sent (and signed); `api_path` the same without a zone endpoint's prefix."""
        if self.faults.latency_s:
            time.sleep(self.faults.latency_s)
        path = unquote(api_path)
        sub = path.removeprefix(API_PREFIX)
        fault = self.faults.pick(method, sub)
        if fault:
            return fault, {"message": "Too Many Requests" if fault == 429 else "Service Unavailable"}
        operation = self.validator.find(method, sub) if path.startswith(API_PREFIX + "/") else None
        authorization = headers.get("authorization")
        if operation is None or operation.operation_id not in PUBLIC_OPERATIONS or authorization:
            try:
                caller = verify_request(method, raw_path, raw_query, body, authorization, self._secret_of)
                if operation is not None and caller != self.key:
                    model.iam.authorize(
                        caller, self._policy_request(model, caller, operation, sub, raw_query, body, source_ip)
                    )
            except AuthError as e:
                return 403, {"message": str(e)}
            except ModelError as e:
                return STATUS_OF_ERROR_KIND.get(e.kind, 403), {"message": e.message}
        if not path.startswith(API_PREFIX + "/"):
            return 404, {"message": f"no such path {path}"}
        query = parse_qs(raw_query, keep_blank_values=True)
        try:
            self.validator.validate_request(method, path, query, body)
        except SpecError as e:
            return 400, {"message": f"Invalid request: {e}"}
        assert operation is not None  # the spec accepted the request, so it knows its operation
        handler = HANDLERS.get(operation.operation_id)
        if handler is None:
            return 501, {"message": f"{operation.operation_id} ({method} {sub}) is valid but not simulated"}
        try:
            request = Request(
                operation.path_params(sub),
                {k: v[0] for k, v in query.items()},
                json.loads(body) if body else {},
                base_url=_base_url(headers),
            )
            return 200, handler(model, request)
        except ModelError as e:
            return STATUS_OF_ERROR_KIND.get(e.kind, 400), {"message": e.message}


def _base_url(headers: dict[str, str]) -> str | None:
    """The scheme and address the client used (its Host header), for the endpoints list-zones gives."""
    host = headers.get("host")
    return f"http://{host}" if host else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "exoscale-sim/1"
    server: _HTTPServer

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, headers, data = self.server.app.handle(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, self.client_address[0]
            )
        except Exception as e:  # a bug of the local Exoscale: a 500 saying so, not a connection closed unanswered
            log.exception("%s %s: the local Exoscale failed", self.command, self.path)
            status, headers = 500, {"Content-Type": "application/json"}
            message = f"the local Exoscale failed: {type(e).__name__}: {e}"
            data = json.dumps({"message": message}).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # clients open many connections at once (one per thread); 5 would reset some

    def __init__(self, address: tuple[str, int], app: App):
        super().__init__(address, _Handler)
        self.app = app


class SimServer:
    """The API served over HTTP on a thread per address; use as a context manager or start()/stop().

    `host` is the address the endpoint names; `also_on` lists more addresses served on the same port (with
    hosts, the bridge's gateway is the endpoint and loopback is also served)."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0, also_on: tuple[str, ...] = ()):
        self.app = app
        self.httpd = _HTTPServer((host, port), app)
        self._servers = [self.httpd]
        try:
            for address in also_on:
                self._servers.append(_HTTPServer((address, self.port), app))
        except OSError:
            for s in self._servers:
                s.server_close()
            raise
        self._threads: list[threading.Thread] = []

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/v2"

    def start(self) -> SimServer:
        for s in self._servers:
            t = threading.Thread(target=s.serve_forever, name="exoscale-sim", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
