"""Who is calling: the EXO2-HMAC-SHA256 request signature as Exoscale documents it.

Authorization (what a restricted key may do) is the IAM model's job (cloud.sim.iam); this module only
says whether a request is signed by the holder of a key's secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from urllib.parse import parse_qs

_AUTH_RE = re.compile(r"^EXO2-HMAC-SHA256 (?P<pragmas>.+)$")


class AuthError(Exception):
    pass


def signature_message(
    method: str, raw_path: str, query: dict[str, list[str]], signed: list[str], body: bytes, expires: int
) -> bytes:
    """The message Exoscale signs: method and path, body, signed query values, headers (none), expiry."""
    values = "".join(query[n][0] for n in signed if n in query and len(query[n]) == 1)
    return b"\n".join([f"{method} {raw_path}".encode(), body, values.encode(), b"", str(expires).encode()])


def _pragmas(header: str | None) -> dict[str, str]:
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
    return pragmas


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
    """Check an Authorization header for one key pair; raise AuthError saying why it fails."""
    verify_request(
        method, raw_path, raw_query, body, header, lambda k: secret if hmac.compare_digest(k, key) else None, now
    )


def verify_request(
    method: str,
    raw_path: str,
    raw_query: str,
    body: bytes,
    header: str | None,
    secret_of: Callable[[str], str | None],
    now: float | None = None,
) -> str:
    """Check an Authorization header against the secret of the key it names (secret_of(key), None when the
    key is unknown); return the key, or raise AuthError saying why the request is refused."""
    pragmas = _pragmas(header)
    secret = secret_of(pragmas["credential"])
    if secret is None:
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
    expected = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    try:
        given = base64.b64decode(pragmas["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise AuthError("malformed signature: not base64") from None
    if not hmac.compare_digest(given, expected):
        raise AuthError("invalid request signature")
    return pragmas["credential"]
