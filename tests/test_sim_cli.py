"""python -m cloud.sim api: the local Exoscale API as a process of its own."""

import os
import signal
import socket
import subprocess
import sys
import time

from cloud.exoscale_driver import ExoscaleV2NodeDriver
from tests.conftest import ROOT, free_port
from tests.exoscale_sdk import client


def test_serves_until_stopped():
    port = free_port()
    env = {**os.environ, "EXOSCALE_API_KEY": "EXOcli", "EXOSCALE_API_SECRET": "cli-secret"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud.sim", "api", "--port", str(port), "--op-delay", "0.05", "--key", "EXOcli"],
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


def test_without_key_a_fresh_pair_goes_to_a_private_env_file(tmp_path):
    """Credentials the shell exports (perhaps the user's real pair) are not adopted nor copied anywhere."""
    env = {**os.environ, "EXOSCALE_API_KEY": "EXO" + "1" * 24, "EXOSCALE_API_SECRET": "real-looking-secret"}
    env_file = tmp_path / "sim.env"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud.sim", "api", "--port", "0", "--op-delay", "0", "--env-file", str(env_file)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()  # the banner, then the line to run
        assert first.startswith("# local Exoscale API on http://127.0.0.1:"), first
        line = proc.stdout.readline()
        while line.startswith("# "):
            line = proc.stdout.readline()
        assert line.strip() == f"source {env_file}"
        assert env_file.stat().st_mode & 0o777 == 0o600
        exports = dict(line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines() if line)
        assert set(exports) == {"EXOSCALE_API_ENDPOINT", "EXOSCALE_API_KEY", "EXOSCALE_API_SECRET"}
        assert exports["EXOSCALE_API_KEY"] != "EXO" + "1" * 24 and "real-looking-secret" not in env_file.read_text()
        sdk = client(exports["EXOSCALE_API_KEY"], exports["EXOSCALE_API_SECRET"], exports["EXOSCALE_API_ENDPOINT"])
        assert sdk.list_instances() == {"instances": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    out = proc.stdout.read() + proc.stderr.read() + first
    assert exports["EXOSCALE_API_SECRET"] not in out
    assert not env_file.exists()  # removed when the sim stops


def test_bad_options_are_one_line_each():
    for args, text in (
        (["--error-rate", "2"], "--error-rate must be within [0, 1]"),
        (["--subnet", "10.0.0.0/24"], "--subnet needs --hosts"),
        (["--key", "EXOonly"], "give both"),
        (["--secret", "on-the-command-line"], "--secret is not taken on the command line"),  # ps would show it
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXOSCALE_")}
        r = subprocess.run(
            [sys.executable, "-m", "cloud.sim", "api", "--port", str(free_port()), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"cloud.sim: error: {text}"), r.stderr
