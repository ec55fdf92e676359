"""Is there Ray at an address? A quick check before ray.init, which otherwise waits 20-120 s at a port
that answers but is not Ray and then fails with a traceback.

Ray's GCS (HOST:6379) and its Client server (ray://HOST:10001) both speak gRPC, i.e. HTTP/2 without TLS
unless RAY_USE_TLS is set: such a server answers the HTTP/2 connection preface with a SETTINGS frame at
once. An HTTP/1 server, an SSH server or a silent port does not. Imports nothing of Ray.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

__all__ = ["RayAddressError", "check_ray_address"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
_SETTINGS = 0x4


class RayAddressError(ValueError):
    """The address does not lead to Ray; the message is one line naming it and what was expected."""


def _expected(client: bool) -> str:
    if client:
        return "a Ray Client server (gRPC), e.g. ray://HEAD:10001"
    return "a Ray head's GCS (gRPC), e.g. HEAD:6379, or ray://HEAD:10001 for Ray Client"


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Raise RayAddressError unless `address` (HOST:PORT or ray://HOST:PORT) answers like Ray's gRPC."""
    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    url = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = url.hostname, url.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise RayAddressError(f"{address!r} is not HOST:PORT or ray://HOST:PORT")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise RayAddressError(
            f"{address!r}: cannot reach Ray there ({e.strerror or e}); expected {_expected(client)}"
        ) from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true"):
            return  # a TLS handshake is Ray's business; the port at least answers
        try:
            sock.sendall(_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except TimeoutError:
            raise RayAddressError(
                f"{address!r} accepts connections but said nothing in {timeout:g} s: not Ray "
                f"(expected {_expected(client)})"
            ) from None
        except OSError as e:
            head = b""
            detail = e.strerror or str(e)
        else:
            detail = "it closed the connection" if not head else f"it answered {head[:9]!r}"
        if len(head) == 9 and head[3] == _SETTINGS and head[5:9] == b"\0\0\0\0":
            return
        raise RayAddressError(
            f"{address!r} answers but is not Ray ({detail}, not HTTP/2); expected {_expected(client)}"
        )
