"""Ray on the cluster's nodes, over SSH: install, start, stop, status; the tunnel a driver uses.

- install: a Python environment in ~/raysweep-env on every node with exactly this machine's Python
  minor version and Ray version (plus numpy, tensorflow-cpu, mlxtend for the training program),
  through uv, which also installs the Python where the template's differs. Idempotent: a node that
  already has the right versions is left alone.
- start: the head with its dashboard bound to 127.0.0.1, workers joining over the addresses inside
  the security group, token authentication on (a per-cluster token in the local state, 0600, copied to
  each node's ~/.ray/auth_token); waits until every node is registered.
- connect_address: an SSH tunnel to the head's Ray client port, the token in this process's
  environment, and a version check first: what `python -m pipeline.mnist --cluster NAME` uses.

Ray's ports are never opened to the outside: the security group lets in only SSH. (Ray's client server
listens on the node's address, which Ray does not let us change; only members of the group reach it,
and it requires the cluster's token.)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path

from cloud import autostop
from cloud.config import ClusterConfig
from cloud.remote import NodeResult, Remote
from cloud.state import ClusterState, NodeRecord, StateStore

log = logging.getLogger(__name__)

NODE_ENV = "raysweep-env"  # relative to the login user's home
GCS_PORT = 6379
CLIENT_PORT = 10001
DASHBOARD_PORT = 8265
Progress = Callable[[str, str], None]


class RayClusterError(Exception):
    pass


def local_versions() -> tuple[str, str]:
    """(Python minor, Ray version) of this machine: what the cluster must run. (Ray is not imported
    here: it reads its authentication mode once, when first imported.)"""
    return f"{sys.version_info[0]}.{sys.version_info[1]}", metadata.version("ray")


def node_packages() -> list[str]:
    """What `install` puts on the nodes: Ray pinned to ours, the training program's needs and the autostop
    daemon's (libcloud, Exoscale's signer), pinned to the versions here where this machine has them."""
    _py, ray_version = local_versions()
    pkgs = [f"ray[default]=={ray_version}"]
    for name in ("numpy", "tensorflow-cpu", "mlxtend", "apache-libcloud", "requests-exoscale-auth"):
        try:
            pkgs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pkgs.append(name)
    return pkgs


INSTALL_SCRIPT = r"""
set -eu
ENV="$HOME/{env}"
PY_MINOR={py}
RAY_VERSION={ray}
check() {{
  [ -x "$ENV/bin/python" ] && "$ENV/bin/python" - <<'EOF'
import importlib.util, sys
import ray
assert "%d.%d" % sys.version_info[:2] == "{py}", "python"
assert ray.__version__ == "{ray}", "ray"
for m in ("numpy", "tensorflow", "mlxtend", "libcloud", "exoscale_auth"):
    assert importlib.util.find_spec(m), m
EOF
}}
if check 2>/dev/null; then echo "RAYSWEEP already installed: python $PY_MINOR, ray $RAY_VERSION"; exit 0; fi
UV={uv}
if [ -z "$UV" ]; then UV=$(command -v uv || true); fi
if [ -z "$UV" ] && [ -x "$HOME/.local/bin/uv" ]; then UV="$HOME/.local/bin/uv"; fi
if [ -z "$UV" ]; then
  echo "RAYSWEEP installing uv"
  curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh >/dev/null
  UV="$HOME/.local/bin/uv"
fi
PY=$(command -v "python$PY_MINOR" || true)
if [ -z "$PY" ]; then
  echo "RAYSWEEP installing Python $PY_MINOR (the template has $(python3 -V 2>&1))"
  "$UV" python install "$PY_MINOR"
  PY=$("$UV" python find "$PY_MINOR")
fi
echo "RAYSWEEP creating $ENV with $("$PY" -V)"
"$UV" venv --quiet --allow-existing --python "$PY" "$ENV"
echo "RAYSWEEP installing {packages_text}"
"$UV" pip install --quiet --python "$ENV/bin/python" {options} {packages}
check
echo "RAYSWEEP installed: python $PY_MINOR, ray $RAY_VERSION"
"""


def install_script(cfg: ClusterConfig, extra_packages: Sequence[str] = ()) -> str:
    py, ray_version = local_versions()
    pkgs = node_packages() + list(extra_packages)
    script = INSTALL_SCRIPT.format(
        env=NODE_ENV,
        py=shlex.quote(py),
        ray=shlex.quote(ray_version),
        uv=shlex.quote(cfg.uv_path or ""),
        options=cfg.install_options,
        packages=" ".join(shlex.quote(p) for p in pkgs),
        packages_text=" ".join(pkgs),
    )
    if cfg.setup_commands:
        script += "\n# setup_commands from cluster.toml\n" + "\n".join(cfg.setup_commands) + "\n"
    return script


def _remote(cfg: ClusterConfig) -> tuple[Remote, ClusterState, StateStore]:
    store = StateStore(cfg.state_dir)
    st = store.load()
    if st is None or not st.nodes:
        raise RayClusterError(
            f"no nodes known for cluster {cfg.name!r} (state in {store.dir}); run `exoscale.py up` first"
        )
    return Remote(store.private_key(cfg.ssh_key), store.known_hosts), st, store


def install(cfg: ClusterConfig, progress: Progress) -> list[NodeResult]:
    remote, st, _ = _remote(cfg)
    script = install_script(cfg)
    for n in st.ordered():
        progress(n.name, "preparing the Python environment")

    def line(node: NodeRecord, text: str) -> None:
        if text.startswith("RAYSWEEP "):
            progress(node.name, text[len("RAYSWEEP ") :])

    results = remote.run(
        st.ordered(), f"bash -c {shlex.quote(script)}", env=cfg.install_env, timeout=3600, on_line=line
    )
    for r in results:
        progress(r.node.name, "ready" if r.ok else f"FAILED: {r.error}; {r.stderr.strip()[-300:]}")
    return results


def _ray(cmd: str, cfg: ClusterConfig) -> str:
    """A command of the node's environment, run with token auth and its bin first on PATH (so that jobs and
    tasks started by this Ray find `python` and `python3` there)."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in {"RAY_AUTH_MODE": "token", **cfg.ray_env}.items())
    return f"env PATH=$HOME/{NODE_ENV}/bin:$PATH {env} $HOME/{NODE_ENV}/bin/{cmd}"


def cluster_token(store: StateStore) -> str:
    path = store.dir / "ray_token"
    if not path.exists():
        store.ensure_dir()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def _put_token(remote: Remote, nodes: Sequence[NodeRecord], token: str) -> list[NodeResult]:
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write(token)
    try:
        os.chmod(f.name, 0o600)
        remote.run(nodes, "mkdir -p -m 700 .ray")
        res = remote.put(nodes, f.name, ".ray/auth_token")
        remote.run(nodes, "chmod 600 .ray/auth_token")
        return res
    finally:
        os.unlink(f.name)


NODES_SNIPPET = (
    "import json, ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); "
    "print('RAYSWEEP_NODES ' + json.dumps([{'ip': n['NodeManagerAddress'], 'alive': n['Alive'], "
    "'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes()]))"
)


def ray_nodes(cfg: ClusterConfig, remote: Remote | None = None, head: NodeRecord | None = None) -> list[dict]:
    """Ray's own view of the cluster, asked on the head."""
    if remote is None or head is None:
        remote, st, _ = _remote(cfg)
        head = st.head()
    [r] = remote.run([head], _ray(f"python -c {shlex.quote(NODES_SNIPPET)}", cfg), timeout=60)
    if r.exit_code == 127:
        raise RayClusterError(f"Ray is not installed on the head {head.name}; run `exoscale.py install`")
    for line in r.stdout.splitlines():
        if line.startswith("RAYSWEEP_NODES "):
            return json.loads(line.split(" ", 1)[1])
    raise RayClusterError(f"Ray is not answering on the head {head.name}: {r.error} {r.stderr.strip()[-300:]}")


def start(cfg: ClusterConfig, progress: Progress, timeout: float = 300.0) -> list[dict]:
    remote, st, store = _remote(cfg)
    head = st.head()
    if head is None:
        raise RayClusterError(f"cluster {cfg.name!r} has no head node")
    workers = [n for n in st.ordered() if n.role != "head"]
    token = cluster_token(store)
    failed = [r for r in _put_token(remote, st.ordered(), token) if not r.ok]
    if failed:
        raise RayClusterError(
            "could not copy the cluster token to " + ", ".join(f"{r.node.name} ({r.error})" for r in failed)
        )
    cpus = f" --num-cpus={cfg.ray_cpus}" if cfg.ray_cpus else ""
    running = "pgrep -u $(id -u) -f '[g]cs_server' >/dev/null"  # [g]: not matching this very command line
    progress(head.name, "starting the Ray head")
    [r] = remote.run(
        [head],
        f"{running} && echo RAYSWEEP_RUNNING || "
        + _ray(
            f"ray start --head --node-ip-address={head.ip} --port={GCS_PORT} --dashboard-host=127.0.0.1 "
            f"--dashboard-port={DASHBOARD_PORT} --ray-client-server-port={CLIENT_PORT} --disable-usage-stats{cpus}",
            cfg,
        ),
        timeout=180,
    )
    if not r.ok:
        raise RayClusterError(f"ray start on the head {head.name} failed: {r.stderr.strip()[-500:]}")
    progress(head.name, "Ray head was already running" if "RAYSWEEP_RUNNING" in r.stdout else "Ray head started")
    joined = remote.run(
        workers,
        lambda n: (
            "pgrep -u $(id -u) -f '[r]aylet' >/dev/null && echo RAYSWEEP_RUNNING || "
            + _ray(
                f"ray start --address={head.ip}:{GCS_PORT} --node-ip-address={n.ip} --disable-usage-stats{cpus}", cfg
            )
        ),
        timeout=180,
    )
    for r in joined:
        progress(
            r.node.name,
            ("already running" if "RAYSWEEP_RUNNING" in r.stdout else "joined")
            if r.ok
            else f"FAILED: {r.stderr.strip()[-300:] or r.error}",
        )
    deadline = time.monotonic() + timeout
    want = {n.ip for n in st.nodes}
    while True:
        try:
            nodes = ray_nodes(cfg, remote, head)
            alive = {n["ip"] for n in nodes if n["alive"]}
            if want <= alive:
                progress(
                    cfg.name,
                    f"all {len(want)} node(s) registered with Ray "
                    f"({sum(n['cpus'] for n in nodes if n['alive']):g} CPUs)",
                )
                autostop.launch(cfg, remote, head, progress)
                return nodes
            missing = want - alive
        except RayClusterError as e:
            missing = {str(e)}
        if time.monotonic() > deadline:
            raise RayClusterError(f"not registered with Ray after {timeout:g} s: {', '.join(sorted(missing))}")
        progress(cfg.name, f"waiting for {', '.join(sorted(missing))} to register with Ray")
        time.sleep(2)


def stop(cfg: ClusterConfig, progress: Progress) -> list[NodeResult]:
    remote, st, _ = _remote(cfg)
    results = remote.run(
        st.ordered(),
        f"test -x $HOME/{NODE_ENV}/bin/ray && " + _ray("ray stop --force", cfg) + " >/dev/null 2>&1; true",
        timeout=120,
    )
    for r in results:
        progress(r.node.name, "Ray stopped" if r.ok else f"FAILED: {r.error}")
    return results


# ----------------------------------------------------------------------------- driver connection


class Tunnel:
    """Local ports forwarded over SSH to ports on the head (as the head sees them).

    A stalled path (a network partition) would leave Ray's client waiting forever on connections that
    look open, so a watchdog asks the head for an SSH keepalive reply every `interval` seconds; after
    `misses` unanswered ones it declares the head unreachable (`lost`) and closes the SSH transport,
    which makes Ray's client fail instead of hang.
    """

    def __init__(self, remote: Remote, head: NodeRecord, interval: float = 5.0, misses: int = 3):
        import threading

        self._stack = ExitStack()
        self._conn = remote.connection(head)
        self._stack.enter_context(self._conn)
        self._conn.open()
        self.head = head
        self.lost = False
        self._closed = threading.Event()
        threading.Thread(target=self._watch, args=(interval, misses), name="tunnel-watchdog", daemon=True).start()

    def _answers(self, timeout: float) -> bool:
        import threading

        transport = self._conn.transport
        if transport is None or not transport.is_active():
            return False
        replied = threading.Event()

        def ask():
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

    def close(self) -> None:
        self._closed.set()
        try:
            self._stack.close()
        except Exception:
            pass


def check_versions(remote: Remote, head: NodeRecord) -> None:
    """Refuse, with both versions, when the cluster's Python minor or Ray differ from this machine's."""
    py, ray_version = local_versions()
    [r] = remote.run(
        [head],
        f"$HOME/{NODE_ENV}/bin/python -c "
        + shlex.quote("import sys, ray; print('%d.%d' % sys.version_info[:2], ray.__version__)"),
        timeout=60,
    )
    if not r.ok:
        if r.exit_code is None:
            raise RayClusterError(f"cannot reach the head {head.name} ({head.ip}): {r.error}")
        raise RayClusterError(
            f"no Ray environment on the head {head.name}: run `exoscale.py install` (or `make cluster-up`) first"
        )
    their_py, their_ray = r.stdout.split()
    if (their_py, their_ray) != (py, ray_version):
        raise RayClusterError(
            f"version mismatch: this machine has Python {py} and Ray {ray_version}, the cluster "
            f"has Python {their_py} and Ray {their_ray}; run `exoscale.py install` to match"
        )


def open_tunnel(cfg: ClusterConfig, remote_host: Callable[[NodeRecord], str], remote_port: int) -> tuple[Tunnel, int]:
    """Check versions, open a tunnel to remote_host(head):remote_port on the head, and put the cluster's
    token in this process's environment for Ray's clients; return (tunnel, local port)."""
    remote, st, store = _remote(cfg)
    head = st.head()
    check_versions(remote, head)
    token_path = store.dir / "ray_token"
    if not token_path.exists():
        raise RayClusterError(f"no Ray token for cluster {cfg.name!r}: run `exoscale.py start` first")
    tunnel = Tunnel(remote, head)
    try:
        port = tunnel.forward(remote_host(head), remote_port)
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = token_path.read_text().strip()
        if "ray._raylet" in sys.modules:  # Ray was imported already: reload the token, check the mode
            from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode

            AuthenticationTokenLoader.instance().reset_cache()
            if get_authentication_mode() != AuthenticationMode.TOKEN:
                raise RayClusterError(
                    "Ray was imported before RAY_AUTH_MODE=token was set, and it reads that "
                    "once; run with RAY_AUTH_MODE=token in the environment"
                )
    except Exception:
        tunnel.close()
        raise
    return tunnel, port


def connect_address(cluster: str, config_path: str | None = None) -> tuple[Tunnel, str]:
    """A tunnel to the cluster's Ray client port (as the head serves it on its own address) and the
    ray:// address that reaches it, with the token set: what `pipeline.mnist --cluster` uses."""
    from cloud import config as config_mod

    cfg = config_mod.load(config_path, require_credentials=False, name=cluster)
    tunnel, port = open_tunnel(cfg, lambda head: head.ip, CLIENT_PORT)
    return tunnel, f"ray://127.0.0.1:{port}"


# ----------------------------------------------------------------------------------------- jobs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
JOB_EXCLUDES = [".venv", ".git", "results", "*.png", "__pycache__", ".pytest_cache", "*.egg-info", ".cluster"]


def dashboard_tunnel(cfg: ClusterConfig) -> tuple[Tunnel, int]:
    """A tunnel to the head's dashboard (bound to 127.0.0.1 there), with the token set for Ray's clients."""
    return open_tunnel(cfg, lambda head: "127.0.0.1", DASHBOARD_PORT)


def job_client(port: int):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(f"http://127.0.0.1:{port}")
    except Exception as e:
        raise RayClusterError(f"Ray's job API on the head refused us: {str(e).strip().splitlines()[0]}") from None


def submit(client, command: Sequence[str]) -> str:
    """Run `command` as a Ray job on the head, with this project shipped along (on PYTHONPATH). It runs in
    the login user's home, so relative paths it writes are where `fetch` looks."""
    entry = f'export PYTHONPATH="$PWD${{PYTHONPATH:+:$PYTHONPATH}}" && cd && exec {shlex.join(command)}'
    return client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": JOB_EXCLUDES})


def follow(client, job_id: str, out=sys.stdout) -> str:
    """Stream a job's logs until it ends; return its final status."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return str(client.get_job_status(job_id).value)


def fetch(cfg: ClusterConfig, path: str, dest: Path) -> Path:
    """Copy a file or directory (relative to the head's home) to `dest` on this machine."""
    import io
    import tarfile

    remote, st, _ = _remote(cfg)
    head = st.head()
    with remote.connection(head) as c:
        q = shlex.quote(path)
        kind = c.run(
            f"if [ -d {q} ]; then echo dir; elif [ -f {q} ]; then echo file; else echo none; fi",
            hide=True,
            warn=True,
            in_stream=False,
        ).stdout.strip()
        if kind == "none":
            raise RayClusterError(f"{path}: no such file or directory on the head {head.name}")
        if kind == "file":
            target = dest / Path(path).name if dest.is_dir() else dest
            c.get(path, str(target))
            return target
        tmp = f".raysweep-fetch-{os.getpid()}.tgz"
        c.run(f"tar czf {tmp} -C {q} .", hide=True, in_stream=False)
        buf = io.BytesIO()
        try:
            c.get(tmp, buf)
        finally:
            c.run(f"rm -f {tmp}", hide=True, warn=True, in_stream=False)
    target = dest / Path(path.rstrip("/")).name if dest.is_dir() else dest
    target.mkdir(parents=True, exist_ok=True)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    return target
