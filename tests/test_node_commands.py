"""Commands on one sim node over real sshd: environment values reach the node verbatim, a timed-out
command leaves nothing running, scp names the real cause, `install` stops at the first failing step,
and commands find the nodes through the API when the local state is gone."""

import socket
import threading
import time

import pytest

from cloud.remote import Remote
from cloud.state import StateStore
from cloud.tunnel import Tunnel
from tests.conftest import ClusterCLI, hosts_uv_cache, uv_for_hosts

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def one_node(sim_hosts, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    cli = ClusterCLI(sim_hosts, state)
    cli("up", "-n", "1", check=0)
    yield cli
    cli("down", "--yes")


def node_and_remote(cli):
    store = StateStore(cli.state_dir / cli.name)
    [node] = store.load().ordered()
    return node, Remote(store.key_path, store.known_hosts)


def toml(cli, tmp_path, *lines):
    path = tmp_path / "cluster.toml"
    path.write_text("\n".join([f'name = "{cli.name}"', 'ssh_cidr = "0.0.0.0/0"', *lines]) + "\n")
    return str(path)


def test_environment_values_reach_the_node_verbatim(one_node):
    node, remote = node_and_remote(one_node)
    env = {"FOO": "x;touch $HOME/INJECTED", "SPACED": "one two  three", "QUOTE": 'it\'s "q"'}
    [r] = remote.run([node], 'printf "%s|%s|%s" "$FOO" "$SPACED" "$QUOTE"', env=env)
    assert r.ok, r.error
    assert r.stdout == 'x;touch $HOME/INJECTED|one two  three|it\'s "q"'
    [r] = remote.run([node], "test -e INJECTED && echo INJECTED || echo clean")
    assert r.stdout.strip() == "clean"


def test_cmd_timeout_stops_the_remote_process_group(one_node):
    r = one_node("cmd", "--timeout", "2", "sleep 31 & sleep 32; echo never", timeout=60)
    assert r.returncode == 1
    assert "timed out after 2 s" in r.stderr, r.stderr
    node, remote = node_and_remote(one_node)
    deadline = time.monotonic() + 10
    while True:
        [r] = remote.run([node], "pgrep -af 'sleep 3[12]' || true")
        if not r.stdout.strip():
            break
        assert time.monotonic() < deadline, f"still running on the node 10 s after the timeout: {r.stdout}"
        time.sleep(0.5)


@pytest.fixture
def talker(sim_hosts):
    """A server on the hosts' gateway that sends each connection a few bytes every millisecond until it closes
    (as a gRPC server sends frames): data keeps arriving on a tunnel's channel as the local side closes it."""
    server = socket.create_server((sim_hosts.app.model.hooks.gateway, 0))
    stop = threading.Event()

    def talk(conn):
        with conn:
            try:
                while not stop.is_set():
                    conn.sendall(b"x" * 9)
                    time.sleep(0.001)
            except OSError:
                pass

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=talk, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()
    stop.set()
    server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
    server.close()


def test_tunnel_survives_connections_closed_while_the_far_end_is_talking(one_node, talker):
    """Data arriving on a tunnel's channel while the local side closes it (what the tunnel's own port check
    and Ray's address check do to a gRPC server) must never break the tunnel for the connections after it.
    Fabric's forwarder select()s on paramiko channels, whose close() races the transport thread writing to
    the channel's wake-up pipe: the transport died with "Bad file descriptor" or "Broken pipe" within a few
    hundred such connections, and a sweep through the tunnel failed to start about one time in six."""
    node, remote = node_and_remote(one_node)
    tunnel = Tunnel(remote, node)
    try:
        port = tunnel.forward(*talker)
        for i in range(500):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.settimeout(10)
                assert s.recv(1), f"connection {i} through the tunnel got nothing"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.settimeout(10)
            assert s.recv(1), "the tunnel stopped forwarding after 500 short connections"
        assert not tunnel.lost
    finally:
        tunnel.close()


def test_scp_to_an_unwritable_path_names_the_cause(one_node, tmp_path):
    src = tmp_path / "f.txt"
    src.write_text("x\n")
    r = one_node("scp", str(src), "/var/raysweep-denied.txt", timeout=60)
    assert r.returncode == 1
    assert "cannot reach sshd" not in r.stderr, r.stderr
    assert "/var/raysweep-denied.txt" in r.stderr and "Permission denied" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_install_stops_at_the_first_failing_step_naming_the_url(one_node, tmp_path):
    """A node without uv and without internet: one line naming the step, the URL and what to set; and an
    install_env value with shell syntax stays a value."""
    node, remote = node_and_remote(one_node)
    path = "/usr/bin:/bin"  # the template's own PATH, without any uv an image may offer elsewhere
    [r] = remote.run([node], f"PATH={path} command -v uv || echo none")
    if r.stdout.strip() != "none":
        pytest.skip(f"the sim host has uv at {r.stdout.strip()} even on {path}")
    cfg = toml(one_node, tmp_path, f'install_env = {{ PATH = "{path}", FOO = "x;touch $HOME/INJECTED" }}')
    r = one_node("--config", cfg, "install", timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.splitlines() if "stopped at step" in x]
    assert len(lines) == 1, r.stderr
    assert "'installing uv'" in lines[0] and "https://astral.sh/uv/install.sh" in lines[0]
    assert "uv_path" in lines[0] and "install_options" in lines[0]
    assert "exit code 127" not in r.stderr and "Traceback" not in r.stderr
    [r] = remote.run([node], "test -e INJECTED && echo INJECTED || echo clean")
    assert r.stdout.strip() == "clean"


def test_install_names_the_package_index_it_could_not_reach(one_node, tmp_path):
    uv_path = uv_for_hosts()  # the hosts see this machine's files outside /tmp and /home
    cfg = toml(
        one_node,
        tmp_path,
        f'uv_path = "{uv_path}"',
        'install_options = "--index-url http://127.0.0.1:9/simple"',
        f'install_env = {{ UV_CACHE_DIR = "{hosts_uv_cache()}", UV_HTTP_TIMEOUT = "5" }}',
    )
    r = one_node("--config", cfg, "install", timeout=180)
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.splitlines() if "stopped at step" in x]
    assert len(lines) == 1 and "http://127.0.0.1:9/simple" in lines[0], r.stderr


def test_commands_find_the_nodes_through_the_api_without_local_state(one_node):
    StateStore(one_node.state_dir / one_node.name).path.unlink()
    r = one_node("stop", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Ray stopped" in r.stderr


def test_the_ray_token_is_private_on_the_node_even_where_its_directory_was_not(one_node):
    """A node whose ~/.ray exists readable by all (0755, and a stale 0644 token in it): the token copied
    there ends in a 0700 directory, 0600, created so before any byte of it was written."""
    from cloud import ray_runtime

    node, remote = node_and_remote(one_node)
    [r] = remote.run(
        [node], "rm -rf .ray && mkdir -m 755 .ray && echo old > .ray/auth_token && chmod 644 .ray/auth_token"
    )
    assert r.ok, r.error
    [res] = ray_runtime._put_token(remote, [node], "token-" + "x" * 20)
    assert res.ok, res.error
    [r] = remote.run([node], "stat -c %a .ray .ray/auth_token && cat .ray/auth_token")
    assert r.stdout.split() == ["700", "600", "token-" + "x" * 20], r.stdout
