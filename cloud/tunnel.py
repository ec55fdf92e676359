"""The driver's way to a cluster: an SSH tunnel to ports on the head, with a watchdog, after a version check,
and the cluster's token in this process's environment for Ray's clients. `cloud.connect` builds on it."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from contextlib import ExitStack

import paramiko

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
        """Forward a new local port (127.0.0.1 only) to remote_host:remote_port as the head sees it; the port."""
        transport = self._conn.transport
        if transport is None or not transport.is_active():
            raise RayClusterError(f"the SSH connection to {self.head.name} ({self.head.ip}) is closed")
        forwarder = _Forwarder(transport, remote_host, remote_port)
        self._stack.callback(forwarder.close)
        return forwarder.port

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


class _Forwarder:
    """One local listening port whose connections each become a `direct-tcpip` channel to a host and port
    seen from the SSH server, with one thread per direction.

    Not Fabric's `forward_local`: it select()s on the channels, which gives each a wake-up pipe, and
    paramiko's `Channel.close()` closes that pipe while the transport thread may be writing to it when data
    arrives at that moment; the transport thread then dies ("Bad file descriptor", "Broken pipe") and takes
    every channel of the tunnel with it. Blocking `recv` on a channel needs no pipe.
    """

    CHUNK = 65536

    def __init__(self, transport: paramiko.Transport, remote_host: str, remote_port: int):
        self._transport = transport
        self._dest = (remote_host, remote_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[tuple[socket.socket, paramiko.Channel]] = set()
        self._closed = False
        threading.Thread(target=self._accept, name=f"forward-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn, peer), name=f"forward-{self.port}", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            chan = self._transport.open_channel("direct-tcpip", self._dest, peer, timeout=30)
        except Exception as e:  # the far port refused, or the transport is gone: the local client sees EOF
            log.debug("cannot open a channel to %s:%d: %s", *self._dest, e)
            conn.close()
            return
        pair = (conn, chan)
        with self._lock:
            closed = self._closed
            if not closed:
                self._open.add(pair)
        if not closed:
            up = threading.Thread(target=self._pump, args=(conn.recv, chan.sendall, pair), daemon=True)
            up.start()
            self._pump(chan.recv, conn.sendall, pair)
            up.join()
            with self._lock:
                self._open.discard(pair)
        self._end(pair)
        conn.close()

    def _pump(self, recv: Callable[[int], bytes], send: Callable[[bytes], object], pair: tuple) -> None:
        """Copy until either side ends, then end both, which wakes the other direction's blocked recv."""
        try:
            while data := recv(self.CHUNK):
                send(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        self._end(pair)

    @staticmethod
    def _end(pair: tuple[socket.socket, paramiko.Channel]) -> None:
        conn, chan = pair
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):  # the transport is gone already
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pairs = list(self._open)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self._listener.close()
        for pair in pairs:
            self._end(pair)


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
