"""Ray on the cluster's nodes, over SSH: start, stop, and Ray's own view of its nodes.

- start: the head with its dashboard bound to 127.0.0.1, workers joining over the addresses inside the
  security group, token authentication on (the cluster's token from its state, copied to each node's
  ~/.ray/auth_token); then one process on the head polls Ray's GCS (as `ray status` does, no driver)
  until every node is registered; then the autostop daemon on the head (cloud.autostop).
- Ray's ports are never opened to the outside: the security group lets in only SSH. (Ray's client server
  listens on the node's address, which Ray does not let us change; only members of the group reach it,
  and it requires the cluster's token.)
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import tempfile
from collections.abc import Callable, Sequence

from cloud import access, autostop_control
from cloud.config import ClusterConfig
from cloud.node_install import NODE_ENV
from cloud.ray_auth import AUTH_ENV
from cloud.remote import NodeResult, Remote, env_exports, script
from cloud.state import NodeRecord

log = logging.getLogger(__name__)

GCS_PORT = 6379
CLIENT_PORT = 10001
DASHBOARD_PORT = 8265
Progress = Callable[[str, str], None]


class RayClusterError(Exception):
    pass


def node_command(cmd: str, cfg: ClusterConfig) -> str:
    """A command of the node's environment, run with token auth and its bin first on PATH (so that jobs and
    tasks started by this Ray find `python` and `python3` there)."""
    exports = env_exports({**AUTH_ENV, **cfg.ray.env})
    return f'export PATH="$HOME/{NODE_ENV}/bin:$PATH" && {exports}$HOME/{NODE_ENV}/bin/{cmd}'


def _put_token(remote: Remote, nodes: Sequence[NodeRecord], token: str) -> list[NodeResult]:
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        os.chmod(f.name, 0o600)
        f.write(token)
    try:
        return remote.put(nodes, f.name, ".ray/auth_token", private=True)
    finally:
        os.unlink(f.name)


# One process on the head asks Ray's GCS for its nodes (a GcsClient, as `ray status` uses: no driver, no
# worker), every second until the wanted addresses are alive or the time is up; a line per answer.
NODES_POLL = """
import json, sys, time
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
address, seconds, want = sys.argv[1], float(sys.argv[2]), set(sys.argv[3:])
deadline = time.monotonic() + seconds
client = None
while True:
    try:
        client = client or GcsClient(address=address)
        infos = client.get_all_node_info(timeout=10).values()
        nodes = [{"ip": n.node_manager_address, "alive": n.state == GcsNodeInfo.ALIVE,
                  "cpus": n.resources_total.get("CPU", 0)} for n in infos]
        print("RAYSWEEP_NODES " + json.dumps(nodes), flush=True)
        if want <= {n["ip"] for n in nodes if n["alive"]}:
            break
    except Exception as e:
        print("RAYSWEEP_NO_ANSWER " + (str(e).strip().splitlines() or [type(e).__name__])[0][:200], flush=True)
    if time.monotonic() >= deadline:
        break
    time.sleep(1)
"""


def _poll_nodes(
    cfg: ClusterConfig,
    remote: Remote,
    head: NodeRecord,
    want: Sequence[str] = (),
    seconds: float = 0.0,
    on_answer: Callable[[list[dict] | None, str], None] | None = None,
) -> list[dict]:
    """Ray's nodes as its GCS on the head lists them, polled until `want` are alive or `seconds` passed."""
    args = " ".join(shlex.quote(a) for a in [f"{head.ip}:{GCS_PORT}", str(seconds), *want])
    last: dict[str, list[dict] | None] = {"nodes": None}
    why = {"text": ""}

    def line(_node: NodeRecord, text: str) -> None:
        kind, _, rest = text.partition(" ")
        if kind == "RAYSWEEP_NODES":
            last["nodes"] = json.loads(rest)
        elif kind == "RAYSWEEP_NO_ANSWER":
            last["nodes"], why["text"] = None, rest
        else:
            return
        if on_answer:
            on_answer(last["nodes"], why["text"])

    [r] = remote.run(
        [head],
        script(node_command(f"python -c {shlex.quote(NODES_POLL)} {args}", cfg)),
        timeout=seconds + 60,
        on_line=line,
    )
    if r.exit_code == 127:
        raise RayClusterError(f"Ray is not installed on the head {head.name}; run `exoscale.py install`")
    if last["nodes"] is None:
        cause = why["text"] or r.error or "no answer"
        raise RayClusterError(f"Ray is not answering on the head {head.name}: {cause} {r.stderr.strip()[-300:]}")
    return last["nodes"]


def ray_nodes(cfg: ClusterConfig) -> list[dict]:
    """Ray's own view of the cluster, asked on the head."""
    acc = access.connect(cfg)
    return _poll_nodes(cfg, acc.remote, acc.state.require_head())


def start(cfg: ClusterConfig, progress: Progress, timeout: float = 300.0) -> list[dict]:
    acc = access.connect(cfg)
    remote, st = acc.remote, acc.state
    head = st.require_head()
    workers = [n for n in st.ordered() if n.role != "head"]
    failed = [r for r in _put_token(remote, st.ordered(), acc.store.ensure_ray_token()) if not r.ok]
    if failed:
        raise RayClusterError(
            "could not copy the cluster token to " + ", ".join(f"{r.node.name} ({r.error})" for r in failed)
        )
    cpus = f" --num-cpus={cfg.ray.cpus}" if cfg.ray.cpus else ""
    running = "pgrep -u $(id -u) -f '[g]cs_server' >/dev/null"  # [g]: not matching this very command line
    progress(head.name, "starting the Ray head")
    [r] = remote.run(
        [head],
        script(
            f"if {running}; then echo RAYSWEEP_RUNNING; exit 0; fi\n"
            + node_command(
                f"ray start --head --node-ip-address={head.ip} --port={GCS_PORT} --dashboard-host=127.0.0.1 "
                f"--dashboard-port={DASHBOARD_PORT} --ray-client-server-port={CLIENT_PORT} "
                f"--disable-usage-stats{cpus}",
                cfg,
            )
        ),
        timeout=180,
    )
    if not r.ok:
        raise RayClusterError(f"ray start on the head {head.name} failed: {(r.stderr.strip() or r.error)[-500:]}")
    progress(head.name, "Ray head was already running" if "RAYSWEEP_RUNNING" in r.stdout else "Ray head started")
    joined = remote.run(
        workers,
        lambda n: script(
            "if pgrep -u $(id -u) -f '[r]aylet' >/dev/null; then echo RAYSWEEP_RUNNING; exit 0; fi\n"
            + node_command(
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
    want = sorted(n.ip for n in st.nodes)
    shown = {"missing": ""}

    def answer(nodes: list[dict] | None, why: str) -> None:
        alive = {n["ip"] for n in nodes or [] if n["alive"]}
        missing = ", ".join(ip for ip in want if ip not in alive) if nodes is not None else f"Ray's GCS ({why})"
        if missing and missing != shown["missing"]:
            progress(cfg.name, f"waiting for {missing} to register with Ray")
        shown["missing"] = missing

    nodes = _poll_nodes(cfg, remote, head, want, timeout, answer)
    alive = [n for n in nodes if n["alive"]]
    missing = sorted(set(want) - {n["ip"] for n in alive})
    if missing:
        raise RayClusterError(f"not registered with Ray after {timeout:g} s: {', '.join(missing)}")
    progress(cfg.name, f"all {len(want)} node(s) registered with Ray ({sum(n['cpus'] for n in alive):g} CPUs)")
    autostop_control.launch(cfg, remote, head, progress)
    return nodes


def stop(cfg: ClusterConfig, progress: Progress) -> list[NodeResult]:
    acc = access.connect(cfg)
    results = acc.remote.run(
        acc.state.ordered(),
        script(
            f"if [ -x $HOME/{NODE_ENV}/bin/ray ]; then\n"
            + node_command("ray stop --force", cfg)
            + " >/dev/null 2>&1 || true\nfi"
        ),
        timeout=120,
    )
    for r in results:
        progress(r.node.name, "Ray stopped" if r.ok else f"FAILED: {r.error}")
    return results
