"""The SSH tunnel a driver reaches its cluster through: throughput of one forwarded connection, the round
trip of a small request, and the time to open a connection, through `cloud.tunnel`'s forwarder and, for
comparison, Fabric's `forward_local` (which the tunnel used before), on one sim host (needs root).

A server on the hosts' gateway (this machine, as the head sees it) plays the far end: for throughput it
sends MB megabytes to each connection; for round trips it echoes 200-byte requests; for opening, it greets
each connection with 9 bytes (as a gRPC server sends its SETTINGS frame) and waits for it to close. Rounds
alternate which forwarder goes first, each through a new SSH connection. Fabric's forwarder select()s on
paramiko channels and so races the transport thread when a connection closes as data arrives (see the
README): a round in which it broke the tunnel is counted (`fabric_rounds_broken`), not measured.

    python -m bench.tunnel [--mb 200] [--rounds 3] [--connections 100]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import ExitStack

from bench.common import cli, median, report, scratch_dir, sim_with_hosts
from cloud.remote import Remote
from cloud.sim.local import cluster_toml
from cloud.state import StateStore
from cloud.tunnel import Tunnel


class FarEnd:
    """The far end: a bulk sender on one port, a greeter on another."""

    def __init__(self, host: str, size: int):
        self.size = size
        self.bulk = socket.create_server((host, 0))
        self.greet = socket.create_server((host, 0))
        self.echo = socket.create_server((host, 0))
        threading.Thread(target=self._serve, args=(self.bulk, self._send_bulk), daemon=True).start()
        threading.Thread(target=self._serve, args=(self.greet, self._greet), daemon=True).start()
        threading.Thread(target=self._serve, args=(self.echo, self._echo), daemon=True).start()

    @staticmethod
    def _serve(server: socket.socket, handle) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def _send_bulk(self, conn: socket.socket) -> None:
        chunk = b"x" * (1 << 20)
        with conn:
            try:
                for _ in range(self.size // len(chunk)):
                    conn.sendall(chunk)
            except OSError:
                pass

    @staticmethod
    def _greet(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"\0" * 9)
                while conn.recv(4096):
                    pass
            except OSError:
                pass

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass


def forward(kind: str, tunnel: Tunnel, stack: ExitStack, dest: tuple[str, int]) -> int:
    if kind == "ours":
        return tunnel.forward(*dest)
    with socket.socket() as s:  # Fabric binds the port we name
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stack.enter_context(
        tunnel._conn.forward_local(local_port=port, remote_port=dest[1], remote_host=dest[0], local_host="127.0.0.1")
    )
    deadline = time.monotonic() + 10
    while True:  # Fabric's forwarder listens from its own thread
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("Fabric's forwarder did not listen within 10 s") from None
            time.sleep(0.05)


def throughput(port: int, size: int) -> float:
    """MB/s of one connection reading `size` bytes."""
    got = 0
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        while data := s.recv(1 << 16):
            got += len(data)
    if got != size:
        raise SystemExit(f"read {got} bytes through the tunnel, expected {size}")
    return got / 2**20 / (time.perf_counter() - t0)


def opening(port: int, n: int) -> float:
    """Median milliseconds from connect() to the far end's greeting, over n connections."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.settimeout(30)
            if len(s.recv(9)) == 0:
                raise SystemExit("a connection through the tunnel got no greeting")
            times.append((time.perf_counter() - t0) * 1000)
    return median(times)


def round_trips(port: int, n: int, size: int = 200) -> float:
    """Median milliseconds of a request of `size` bytes and its echo on one connection (as Ray's client
    sends a small request and waits for the answer), over n round trips."""
    times = []
    message = b"r" * size
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.settimeout(30)
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(message)
            got = 0
            while got < size:
                data = s.recv(size - got)
                if not data:
                    raise SystemExit("the echo connection through the tunnel closed")
                got += len(data)
            times.append((time.perf_counter() - t0) * 1000)
    return median(times)


def one_round(kind: str, remote: Remote, head, far: FarEnd, size: int, n: int) -> tuple[float, float, float] | None:
    """(MB/s, round-trip ms, opening ms) through a new tunnel with forwarder `kind`; None when the tunnel
    broke under it (Fabric's forwarder does, now and then: see the module's docstring)."""
    with ExitStack() as stack:
        tunnel = Tunnel(remote, head)
        stack.callback(tunnel.close)
        try:
            mb_s = throughput(forward(kind, tunnel, stack, far.bulk.getsockname()), size)
            rtt = round_trips(forward(kind, tunnel, stack, far.echo.getsockname()), n)
            opened = opening(forward(kind, tunnel, stack, far.greet.getsockname()), n)
            stack.close()  # Fabric raises here what its forwarder's threads raised
        except (Exception, SystemExit) as e:
            if kind == "ours":
                raise
            print(f"{kind}: the tunnel broke ({type(e).__name__}: {str(e).strip()[-200:]})", file=sys.stderr)
            return None
    return mb_s, rtt, opened


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=200, help="megabytes per throughput round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=100, help="connections per opening round")
    a = p.parse_args(argv)
    work = scratch_dir("bench-tunnel-")
    name = f"bench-tun-{uuid.uuid4().hex[:4]}"
    with sim_with_hosts(offer_packages=False) as local:
        env = {**os.environ, **local.client_env(work / "state")}
        config = str(cluster_toml(work / f"{name}.toml", name))
        cli(env, "--config", config, "up", "-n", "1", "--autostop", "0")
        try:
            store = StateStore(work / "state" / name)
            head = store.load().head()
            assert local.hooks is not None  # sim_with_hosts boots hosts
            far = FarEnd(local.hooks.gateway, a.mb << 20)
            results: dict[str, list[tuple[float, float, float]]] = {"ours": [], "fabric": []}
            broke = 0
            for r in range(a.rounds):
                for kind in ("ours", "fabric") if r % 2 == 0 else ("fabric", "ours"):
                    got = one_round(
                        kind, Remote(store.key_path, store.known_hosts), head, far, a.mb << 20, a.connections
                    )
                    if got is None:
                        broke += 1
                        continue
                    results[kind].append(got)
                    print(
                        f"round {r + 1} {kind}: {got[0]:.0f} MB/s, round trip {got[1]:.2f} ms, open {got[2]:.1f} ms",
                        file=sys.stderr,
                    )
        finally:
            cli(env, "--config", config, "down", "--yes")

    def med(kind: str, i: int) -> float | None:
        return median([x[i] for x in results[kind]]) if results[kind] else None

    ours_mb_s, fabric_mb_s = med("ours", 0), med("fabric", 0)
    return report(
        "tunnel",
        mb=a.mb,
        rounds=a.rounds,
        connections=a.connections,
        ours_mb_s=ours_mb_s,
        fabric_mb_s=fabric_mb_s,
        throughput_ratio=ours_mb_s / fabric_mb_s if ours_mb_s and fabric_mb_s else None,
        ours_round_trip_ms=med("ours", 1),
        fabric_round_trip_ms=med("fabric", 1),
        ours_open_ms=med("ours", 2),
        fabric_open_ms=med("fabric", 2),
        fabric_rounds_broken=broke,
    )


if __name__ == "__main__":
    main()
