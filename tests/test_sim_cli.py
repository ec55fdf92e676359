"""python -m cloud.sim api: the local Exoscale API as a process of its own."""

import os
import signal
import socket
import subprocess
import sys
import time

from cloud.exoscale_driver import ExoscaleV2NodeDriver
from tests.conftest import ROOT, free_port


def test_serves_until_stopped():
    port = free_port()
    env = {**os.environ, "EXOSCALE_API_KEY": "EXOcli", "EXOSCALE_API_SECRET": "cli-secret"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud.sim", "api", "--port", str(port), "--op-delay", "0.05"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the sim did not start listening"
                time.sleep(0.1)
        d = ExoscaleV2NodeDriver("EXOcli", "cli-secret", host="127.0.0.1", port=port, secure=False)
        node = d.create_node("n", "standard.micro", "Linux Ubuntu 22.04 LTS 64-bit")
        assert [n.id for n in d.list_nodes()] == [node.id]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert "cli-secret" not in proc.stderr.read()


def test_refuses_to_start_without_credentials():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXOSCALE_")}
    r = subprocess.run(
        [sys.executable, "-m", "cloud.sim", "api", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "EXOSCALE_API_KEY and EXOSCALE_API_SECRET" in r.stderr
