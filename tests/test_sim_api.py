"""The local Exoscale API itself: its signature check against Exoscale's reference signer and the
documented example, and its spec checks."""

import json
import time

import pytest
import requests
from exoscale_auth import ExoscaleV2Auth

from cloud.sim.api import AuthError, SpecValidator, signature_message, verify_signature
from tests.conftest import SIM_KEY, SIM_SECRET

DOC_PATH = "/v2/resource/a02baf5a-a3e4-49a0-857b-8a08d276c1c0"


def test_documented_message_for_a_get():
    msg = signature_message("GET", DOC_PATH, {"p1": ["v1"], "p2": ["v2"]}, ["p1", "p2"], b"", 1599140767)
    assert msg == b"GET /v2/resource/a02baf5a-a3e4-49a0-857b-8a08d276c1c0\n\nv1v2\n\n1599140767"


def test_documented_message_for_a_post():
    body = b'{"name": "my-security-group"}'
    msg = signature_message("POST", "/v2/security-group", {}, [], body, 1599140767)
    assert msg == b'POST /v2/security-group\n{"name": "my-security-group"}\n\n\n1599140767'


def sign_with_reference(method, url, body=None, key=SIM_KEY, secret=SIM_SECRET, expires=None):
    req = requests.Request(method, url, data=body).prepare()
    auth = ExoscaleV2Auth(key, secret)
    auth._sign_request(req, expires or int(time.time()) + 600)
    return req


def check(req, secret=SIM_SECRET, body=None):
    path, _, query = req.path_url.partition("?")
    verify_signature(
        req.method,
        path,
        query,
        body if body is not None else (req.body or b""),
        req.headers.get("Authorization"),
        SIM_KEY,
        secret,
    )


@pytest.mark.parametrize(
    "method, url, body",
    [
        ("GET", "http://x/v2/instance", None),
        ("GET", "http://x/v2/instance?labels=cluster%3Dc1+role%3Dhead", None),
        ("GET", "http://x/v2/template?visibility=public&family=ubuntu", None),
        ("POST", "http://x/v2/security-group", b'{"name": "g\\u00e9"}'),
        ("DELETE", "http://x/v2/ssh-key/my-key", None),
    ],
)
def test_reference_signer_is_accepted(method, url, body):
    check(sign_with_reference(method, url, body))


def test_documented_header_shape_parses():
    req = sign_with_reference("GET", "http://x" + DOC_PATH + "?p1=v1&p2=v2", expires=int(time.time()) + 60)
    assert req.headers["Authorization"].startswith(
        f"EXO2-HMAC-SHA256 credential={SIM_KEY},signed-query-args=p1;p2,expires="
    )
    check(req)


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda r: r.headers.pop("Authorization"), "missing"),
        (lambda r: r.headers.__setitem__("Authorization", "Bearer abc"), "malformed"),
        (
            lambda r: r.headers.__setitem__(
                "Authorization", r.headers["Authorization"].replace("signature=", "signature=AA")
            ),
            "invalid request signature|not base64",
        ),
        (
            lambda r: r.headers.__setitem__("Authorization", r.headers["Authorization"].replace(SIM_KEY, "EXOother")),
            "unknown API key",
        ),
        (lambda r: setattr(r, "url", r.url.replace("public", "private")), "invalid request signature"),
        (lambda r: setattr(r, "url", r.url + "&extra=1"), "not covered"),
        (lambda r: setattr(r, "body", b'{"name": "evil"}'), "invalid request signature"),
    ],
)
def test_tampered_requests_refused(tamper, reason):
    req = sign_with_reference("POST", "http://x/v2/template?visibility=public", b'{"name": "ok"}')
    tamper(req)
    with pytest.raises(AuthError, match=reason):
        check(req)


def test_expired_and_wrong_secret_refused():
    with pytest.raises(AuthError, match="expired"):
        check(sign_with_reference("GET", "http://x/v2/zone", expires=int(time.time()) - 1))
    with pytest.raises(AuthError, match="invalid request signature"):
        check(sign_with_reference("GET", "http://x/v2/zone", secret="other"))


def test_http_403_for_bad_signature_and_400_for_spec_violations(sim):
    base = f"http://{sim.host}:{sim.port}"
    r = requests.get(base + "/v2/instance")
    assert r.status_code == 403 and "missing" in r.json()["message"]
    r = requests.get(base + "/v2/zone")  # public on Exoscale: its SDK sends it unsigned
    assert r.status_code == 200 and r.json()["zones"]
    r = requests.get(base + "/v2/zone", headers={"Authorization": "EXO2-HMAC-SHA256 credential=x"})
    assert r.status_code == 403  # but a signature, when given, must be right
    auth = ExoscaleV2Auth(SIM_KEY, SIM_SECRET)
    cases = [
        ("GET", "/v2/no-such-thing", None, "Path not found"),
        ("DELETE", "/v2/zone", None, "Operation delete not found"),
        ("GET", "/v2/template?visibility=everyone", None, "visibility"),
        ("GET", "/v2/instance?lables=a%3Db", None, "unknown query parameter(s) lables"),
        ("POST", "/v2/instance", {"name": "x", "disk-size": 5}, "instance-type' is a required property"),
        ("POST", "/v2/ssh-key", {"name": "has space", "public-key": "x"}, "does not match"),
        ("PUT", "/v2/instance/7b0c6bde-4f3e-4c59-9c1e-4d8f2f0a5e11", None, "request body"),
        ("GET", "/v2/instance/not-a-uuid", None, "uuid"),
    ]
    for method, path, body, reason in cases:
        data = json.dumps(body).encode() if body is not None else None
        r = requests.request(method, base + path, data=data, auth=auth, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (method, path, r.status_code, r.text)
        assert reason.lower() in r.json()["message"].lower(), (path, r.json()["message"])


def test_spec_is_located_without_importing_the_package():
    import sys

    SpecValidator()
    assert "exoscale" not in sys.modules or not hasattr(sys.modules["exoscale"], "__path__")


def test_random_faults_refuse_a_request_at_most_max_consecutive_times():
    from cloud.sim.api import HTTPFaults

    f = HTTPFaults(error_rate=1.0, seed=3, max_consecutive=3)
    got = [f.pick("GET", "/zone") for _ in range(8)]
    assert got[:3] == [got[0], got[1], got[2]] and all(got[:3]) and got[3] is None
    assert all(got[4:7]) and got[7] is None  # a fresh streak after a success
    assert f.pick("GET", "/instance") is not None  # streaks are per request


def test_declined_operations_answer_501_and_coverage_lists_them(sim):
    from cloud.sim.urls import HANDLERS, coverage

    served, declined = coverage("compute")
    assert "update-instance" in served and "create-elastic-ip" in declined["elastic-ip"]
    assert set(served) <= set(HANDLERS) and not set(HANDLERS) & {op for ops in declined.values() for op in ops}
    auth = ExoscaleV2Auth(SIM_KEY, SIM_SECRET)
    r = requests.get(f"http://{sim.host}:{sim.port}/v2/elastic-ip", auth=auth)
    assert r.status_code == 501 and "list-elastic-ips" in r.json()["message"]


def test_a_failure_of_the_local_exoscale_itself_is_a_500_that_says_so(sim, monkeypatch):
    """A bug in the sim's own code is answered, not a connection closed unanswered (which a client retries as
    an unreachable API until its timeout)."""

    def broken(method, target, headers, body, source_ip="127.0.0.1"):
        raise TypeError("handle() got an unexpected keyword argument")

    monkeypatch.setattr(sim.app, "handle", broken)
    r = requests.get(f"http://{sim.host}:{sim.port}/v2/zone", timeout=10)
    assert r.status_code == 500
    assert r.json()["message"] == "the local Exoscale failed: TypeError: handle() got an unexpected keyword argument"
