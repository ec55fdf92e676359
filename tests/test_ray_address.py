"""An --address that answers but is not Ray is refused at once, in one line naming it."""

import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray

from tests.conftest import ROOT, run_cli

PROBE = """
import sys
from pipeline import tasks
try:
    tasks.ensure_ray(sys.argv[1])
except tasks.RayAddressError as e:
    print(e)
    sys.exit(3)
print("connected")
"""


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def http_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def silent_port():
    """A TCP server that accepts and never says anything."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(s.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    yield s.getsockname()[1]
    stop.set()
    for c in held:
        c.close()
    s.close()


def _ensure_ray(address: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    try:
        return subprocess.run(
            [sys.executable, "-c", PROBE, address], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"ensure_ray({address!r}) still waiting after 60 s for a port that is not Ray")


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_http_port_refused_in_one_line(http_port, scheme):
    address = f"{scheme}127.0.0.1:{http_port}"
    r = _ensure_ray(address)
    assert r.returncode == 3, r.stdout + r.stderr
    line = r.stdout.strip()
    assert "\n" not in line and address in line and "not Ray" in line, line


def test_silent_port_refused_in_one_line(silent_port):
    r = _ensure_ray(f"127.0.0.1:{silent_port}")
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"127.0.0.1:{silent_port}" in r.stdout and "not Ray" in r.stdout


def test_real_ray_address_passes_the_check(ray_local):
    from pipeline.ray_address import check_ray_address

    check_ray_address(ray.get_runtime_context().gcs_address)  # raises if the check is wrong


def test_cli_address_not_ray_one_line(http_port, tmp_path):
    r = run_cli(
        "-m", "pipeline.mnist", "--address", f"127.0.0.1:{http_port}", "--data", "mnist-5k",
        "--out", str(tmp_path / "o"), timeout=90,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{http_port}" in lines[0] and "not Ray" in lines[0], r.stderr


def test_cli_ray_address_from_the_environment_not_ray_one_line(silent_port, tmp_path):
    """RAY_ADDRESS is Ray's own way to name a cluster (ensure_ray honours it): checked like --address, before
    any work, in one line naming where the address came from (it was a traceback from inside ensure_ray)."""
    r = run_cli(
        "-m", "pipeline.mnist", "--data", "mnist-5k", "--out", str(tmp_path / "o"), timeout=90,
        env={"RAY_ADDRESS": f"127.0.0.1:{silent_port}"},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].count("RAY_ADDRESS") == 1, r.stderr
    assert f"127.0.0.1:{silent_port}" in lines[0] and "not Ray" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()
