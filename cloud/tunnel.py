"""The driver's way to a cluster: an SSH tunnel to ports on the head, with a watchdog, after a version check,
and the cluster's token in this process's environment for Ray's clients. `cloud.connect` builds on it."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from cloud import access
from cloud.config import ClusterConfig
from cloud.node_install import check_versions
from cloud.ray_auth import use_token_auth
from cloud.ray_runtime import RayClusterError
from cloud.remote import Remote
from cloud.state import NodeRecord

log = logging.getLogger(__name__)


class Tunnel:
    """Local ports forwarded over SSH to ports on the head (as the head sees them).

    A stalled path (a network partition) would leave Ray's client waiting forever on connections that
    look open, so a watchdog asks the head for an SSH keepalive reply every `interval` seconds; after
    `misses` unanswered ones it declares the head unreachable (`lost`) and closes the SSH transport,
    which makes Ray's client fail instead of hang.
    """

    def __init__(self, remote: Remote, head: NodeRecord, interval: float = 5.0, misses: int = 3):
        self._stack = ExitStack()
        self._conn = remote.connection(head)
        self._stack.enter_context(self._conn)
        self._conn.open()
        self.head = head
        self.lost = False
        self._closed = threading.Event()
        threading.Thread(target=self._watch, args=(interval, misses), name="tunnel-watchdog", daemon=True).start()

    def _answers(self, timeout: float) -> bool:
        transport = self._conn.transport
        if transport is None or not transport.is_active():
            return False
        replied = threading.Event()

        def ask() -> None:
            try:
                transport.global_request("keepalive@openssh.com", wait=True)  # any reply proves liveness
            except Exception:
                return
            replied.set()

        threading.Thread(target=ask, daemon=True).start()
        return replied.wait(timeout) and transport.is_active()

    def _watch(self, interval: float, misses: int) -> None:
        missed = 0
        while not self._closed.wait(interval):
            missed = 0 if self._answers(interval) else missed + 1
            if missed >= misses:
                log.warning(
                    "the head %s (%s) stopped answering over SSH; closing the tunnel", self.head.name, self.head.ip
                )
                self.lost = True
                try:
                    if self._conn.transport is not None:
                        self._conn.transport.close()
                except Exception:
                    pass
                return

    def forward(self, remote_host: str, remote_port: int) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._stack.enter_context(
            self._conn.forward_local(
                local_port=port, remote_port=remote_port, remote_host=remote_host, local_host="127.0.0.1"
            )
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the forwarder listens from its own thread
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                time.sleep(0.05)
        raise RayClusterError(f"the SSH tunnel to {remote_host}:{remote_port} on {self.head.name} did not open")

    def run(self, command: str, timeout: float) -> str | None:
        """Run a short command on the head over this tunnel's SSH connection; its stdout, or None if it failed."""
        try:
            r = self._conn.run(command, hide=True, warn=True, timeout=timeout, in_stream=False)
        except Exception as e:
            log.debug("command on the head %s failed: %s", self.head.name, e)
            return None
        return r.stdout if r.ok else None

    def close(self) -> None:
        self._closed.set()
        try:
            self._stack.close()
        except Exception:
            pass


def open_tunnel(cfg: ClusterConfig, remote_host: Callable[[NodeRecord], str], remote_port: int) -> tuple[Tunnel, int]:
    """Check versions, open a tunnel to remote_host(head):remote_port on the head, and put the cluster's
    token in this process's environment for Ray's clients; return (tunnel, local port)."""
    acc = access.connect(cfg)
    head = acc.state.require_head()
    check_versions(acc.remote, head)
    token = acc.store.ray_token()
    if token is None:
        raise RayClusterError(f"no Ray token for cluster {cfg.name!r}: run `exoscale.py start` first")
    tunnel = Tunnel(acc.remote, head)
    try:
        port = tunnel.forward(remote_host(head), remote_port)
        use_token_auth(token)
    except Exception:
        tunnel.close()
        raise
    return tunnel, port
