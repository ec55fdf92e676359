"""Exoscale's published OpenAPI spec, as the `exoscale` package ships it: which operation a request is, and
whether the spec accepts it (requests) or would accept it (responses, for tests).

Where the live API (or Exoscale's own SDK) and the spec disagree, the live side wins and each deviation is
named in KNOWN_REQUEST_DEVIATIONS / KNOWN_RESPONSE_DEVIATIONS.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

API_PREFIX = "/v2"
SPEC_HOST = "https://api-ch-gva-2.exoscale.com"


def spec_path() -> str:
    """Exoscale's OpenAPI spec as shipped by the `exoscale` package (located, never imported)."""
    return str(importlib.metadata.distribution("exoscale").locate_file("exoscale/openapi.json"))


class SpecError(Exception):
    pass


@dataclass(frozen=True)
class SpecOperation:
    """One operation of the spec: its id (e.g. `create-instance`), method, path template and tags."""

    operation_id: str
    method: str  # upper case
    template: str  # e.g. /instance/{id}:start
    tags: tuple[str, ...]
    query_names: frozenset[str]
    pattern: re.Pattern

    def path_params(self, path: str) -> dict[str, str]:
        m = self.pattern.match(path)
        return m.groupdict() if m else {}


# Where the spec marks a request body required and Exoscale's own SDK sends none, the SDK wins: Exoscale
# serves that client. Operation id -> why.
KNOWN_REQUEST_DEVIATIONS = {
    "start-instance": "the SDK's start_instance() without options sends no body; the spec marks one required",
}

# Schema markers of the spec that Exoscale's own clients do not honour in requests: (schema, property) -> marker.
KNOWN_REQUEST_SCHEMA_DEVIATIONS = {
    # The spec marks security-group-resource.id readOnly, yet a rule whose source is another group is added
    # by that group's id (the SDK's add_rule_to_security_group(security_group={"id": ...}), the exo CLI).
    ("security-group-resource", "id"): "readOnly",
}

# Where the published spec and the live API disagree on a response, the live API wins.
KNOWN_RESPONSE_DEVIATIONS = {
    # The spec marks security-group.rules writeOnly, yet GET /security-group/{id} returns the rules:
    # Exoscale's own Terraform provider imports a rule by reading them back.
    ("security-group", "rules"): "writeOnly",
    # The spec's instance-pool.size is exclusiveMinimum 0, yet scale-instance-pool accepts size 0 (minimum 0,
    # not exclusive), so a pool scaled to nothing is answered with size 0.
    ("instance-pool", "size"): "exclusiveMinimum",
}


def _head(path: str) -> str:
    """The first segment of a path (a literal in every template of the spec), without any :action."""
    return path.lstrip("/").split("/", 1)[0].split(":", 1)[0]


def _param_regex(template: str) -> re.Pattern:
    rx = ""
    for part in re.split(r"(\{[^}]+\})", template):
        if part.startswith("{") and part.endswith("}"):
            rx += f"(?P<{re.sub(r'[^A-Za-z0-9_]', '_', part[1:-1])}>[^/:]+)"
        else:
            rx += re.escape(part)
    return re.compile("^" + rx + "$")


class SpecValidator:
    """Requests (and, for tests, responses) checked against the OpenAPI spec with openapi-core."""

    _lock = threading.Lock()
    _shared: SpecValidator | None = None

    def __init__(self, path: str | None = None):
        from openapi_core import Config, OpenAPI

        with open(path or spec_path()) as f:
            self.spec: dict[str, Any] = json.load(f)
        # openapi-core breaks ties between templates with as many variables by spec order, so that
        # PUT /instance/X:reboot would match /instance/{id}: give it the most literal templates first.
        ordered = dict(self.spec)
        ordered["paths"] = dict(
            sorted(self.spec["paths"].items(), key=lambda kv: -len(re.sub(r"\{[^}]+\}", "", kv[0])))
        )
        # The spec carries non-standard tag fields; lint it off, validate requests with it all the same.
        self._request_spec = _with_request_deviations(ordered)
        self.api = OpenAPI.from_dict(self._request_spec, config=Config(spec_validator_cls=None))
        self.response_api = OpenAPI.from_dict(
            _with_response_deviations(ordered), config=Config(spec_validator_cls=None)
        )
        self._api_lock = threading.Lock()
        self._per_template: dict[str, Any] = {}  # path template -> OpenAPI of that path alone (fast to match)
        self.operations = self._operations()
        self._by_head: dict[tuple[str, str], list[SpecOperation]] = {}
        for o in self.operations:  # (method, first path segment) -> candidates, most literal first
            self._by_head.setdefault((o.method, _head(o.template)), []).append(o)
        self.tag_parents = {t["name"]: t.get("parent") for t in self.spec.get("tags", [])}

    @classmethod
    def shared(cls) -> SpecValidator:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def _operations(self) -> list[SpecOperation]:
        out = []
        for path, item in self.spec["paths"].items():
            for method, op in item.items():
                if isinstance(op, dict) and "responses" in op:
                    params = op.get("parameters", []) + item.get("parameters", [])
                    out.append(
                        SpecOperation(
                            op["operationId"],
                            method.upper(),
                            path,
                            tuple(op.get("tags", ())),
                            frozenset(p["name"] for p in params if p.get("in") == "query"),
                            _param_regex(path),
                        )
                    )
        # the most literal templates first, as for openapi-core above
        out.sort(key=lambda o: -len(re.sub(r"\{[^}]+\}", "", o.template)))
        return out

    def find(self, method: str, path: str) -> SpecOperation | None:
        """The spec's operation for METHOD and a path below /v2 (e.g. /instance/ID), or None."""
        for op in self._by_head.get((method.upper(), _head(path)), ()):
            if op.pattern.match(path):
                return op
        return None

    def _api_for(self, template: str) -> Any:
        """The spec reduced to one path: openapi-core matches a request against every path otherwise."""
        from openapi_core import Config, OpenAPI

        with self._api_lock:
            api = self._per_template.get(template)
            if api is None:
                reduced = {**self._request_spec, "paths": {template: self._request_spec["paths"][template]}}
                api = OpenAPI.from_dict(reduced, config=Config(spec_validator_cls=None))
                self._per_template[template] = api
            return api

    def _request(self, method: str, path: str, query: dict[str, list[str]], body: bytes | None) -> Any:
        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        class Req:
            host_url = SPEC_HOST
            full_url_pattern = host_url + path
            content_type = "application/json"

        r: Any = Req()
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
        """Raise SpecError with the reason when the spec refuses the request (path includes /v2).

        Stricter than the spec in one way: a query parameter the operation does not declare is refused,
        so that a misspelt filter in the driver fails loudly instead of being ignored.
        """
        op = self.find(method, path.removeprefix(API_PREFIX))
        api = self._api_for(op.template) if op is not None else self.api  # the whole spec says what is wrong
        try:
            api.validate_request(self._request(method, path, query, body))
        except Exception as e:  # openapi-core raises a family of errors; the text is the reason
            raise SpecError(_reason(e)) from None
        if query:
            unknown = set(query) - (op.query_names if op else set())
            if unknown:
                raise SpecError(f"unknown query parameter(s) {', '.join(sorted(unknown))} for {method.upper()} {path}")

    def validate_response(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes | None, status: int, response_body: bytes
    ) -> None:
        from werkzeug.datastructures import Headers

        class Resp:
            status_code = status
            content_type = "application/json"
            data = response_body
            headers = Headers({"Content-Type": "application/json"})

        try:
            self.response_api.validate_response(self._request(method, path, query, body), Resp())
        except Exception as e:
            raise SpecError(_reason(e)) from None


def _with_request_deviations(spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    for (schema, prop), marker in KNOWN_REQUEST_SCHEMA_DEVIATIONS.items():
        spec["components"]["schemas"][schema]["properties"][prop].pop(marker, None)
    for item in spec["paths"].values():
        for op in item.values():
            if isinstance(op, dict) and op.get("operationId") in KNOWN_REQUEST_DEVIATIONS and "requestBody" in op:
                op["requestBody"]["required"] = False
    return spec


def _with_response_deviations(spec: dict) -> dict:
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
    return text.replace(SPEC_HOST, "")[:600]
