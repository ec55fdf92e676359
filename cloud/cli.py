"""python exoscale.py <command>: a Ray cluster on Exoscale VMs, and files and commands on its nodes.

up -n N (create)      SSH key, security group, N instances in parallel; waits for SSH
up --max-workers N    an autoscaling cluster: the head (and --min-workers), Ray's autoscaler adds the rest
ray-config            a Ray cluster YAML for Ray's own CLI (ray up / exec / submit / attach / down)
down (destroy)        everything of the cluster, found through the API; asks unless --yes
list-nodes (status)   name, role, public IP, state; each node's type, rate, uptime and cost, and the total
ssh N                 an interactive login on node N (0 = head, or a node name)
scp SRC DST           a file or directory to every node (or --node N), DST relative to home
cmd "COMMAND"         on every node (or --node N) in parallel, output prefixed by node name
forget-host N         drop node N's pinned host key (after a node was really replaced)
import-terraform      use a cluster made with terraform/ (reads `terraform output -json`)
install               this machine's Python minor and Ray version (and cluster.toml's `packages`,
                      by default the training program's) in ~/raysweep-env on every node; idempotent
start / stop          Ray on the nodes: the head (dashboard on 127.0.0.1), workers joining it
submit -- CMD...      run a driver command as a Ray job on the head, streaming its logs
logs JOB              re-attach to a job's logs
fetch PATH [DEST]     bring a file or directory from the head's home to this machine
dashboard             tunnel to Ray's dashboard and print its local URL
autostop              the head's idle teardown: --minutes M, --off, --log (no option: its state)
types [--zone Z]      instance types: CPUs, memory, GPUs, price per hour, the zones offering each
cost-report           every cluster made from this machine, ended ones included: duration and cost
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError, LibcloudError

from cloud import access, autostop, clusters, jobs, node_install, ray_config, ray_runtime
from cloud import config as config_mod
from cloud.config import ClusterConfig, ConfigError
from cloud.cost import ClusterCost, duration_text, rate_text
from cloud.exoscale_driver import ZONES
from cloud.node_install import InstallError
from cloud.pricing import money
from cloud.ray_auth import RayAuthError, use_token_auth
from cloud.ray_runtime import RayClusterError
from cloud.remote import interactive_ssh_argv
from cloud.state import ClusterState, NodeRecord, NoHeadError, StateStore
from cloud.types_table import render_types

PROG = clusters.PROG


class CLIError(Exception):
    """A one-line error for the user; exit code 2."""


def _printer(stream=None):
    """Progress lines, one per event per node; whole lines even when threads report at once."""
    import threading

    start = time.monotonic()
    lock = threading.Lock()

    def progress(name: str, what: str) -> None:
        line = f"[{time.monotonic() - start:6.1f}s] {name}: {what}\n"
        with lock:
            (stream or sys.stderr).write(line)
            (stream or sys.stderr).flush()

    return progress


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="A Ray cluster on Exoscale (API v2).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--config", help="cluster.toml (name, zone, instance_type, template, nodes, ...)")
    p.add_argument("--name", help="cluster name (default: from --config, else 'default')")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("up", aliases=["create"], help="create the cluster (or complete a partial one)")
    a.add_argument("-n", "--nodes", type=int, help="number of nodes (default: from config, else 3)")
    a.add_argument(
        "--timeout", type=_seconds, default=600.0, help="seconds to wait for the nodes to run and answer SSH"
    )
    _autostop_option(a)
    _autoscaling_options(a, max_default=None)
    a = sub.add_parser("down", aliases=["destroy"], help="remove everything of the cluster")
    a.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    a.add_argument(
        "--timeout",
        type=_seconds,
        default=300.0,
        help="seconds to keep retrying before stopping with a list of what is left (default 300)",
    )
    sub.add_parser("list-nodes", aliases=["status"], help="the cluster's nodes as the API sees them")
    a = sub.add_parser("ssh", help="log in to node N (0 = head, or a node name)")
    a.add_argument("node", nargs="?", default="0")
    a.add_argument("remote_command", nargs=argparse.REMAINDER)
    a = sub.add_parser("scp", help="copy a file or directory to every node")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--node", help="only node N (index or name)")
    a = sub.add_parser("cmd", help="run a shell command on every node")
    a.add_argument("remote_command")
    a.add_argument("--node", help="only node N (index or name)")
    a.add_argument("--sudo", action="store_true", help="run it as root")
    a.add_argument("--timeout", type=float, default=None)
    a = sub.add_parser("forget-host", help="drop a node's pinned host key")
    a.add_argument("node")
    sub.add_parser("install", help="prepare the Python environment with Ray on every node")
    sub.add_parser("start", help="start Ray on the nodes and wait until all are registered")
    sub.add_parser("stop", help="stop Ray on every node")
    a = sub.add_parser("submit", help="run a driver command as a Ray job on the head: submit -- CMD...")
    a.add_argument("job_command", nargs=argparse.REMAINDER)
    a.add_argument("--no-follow", action="store_true", help="print the job id and return")
    a = sub.add_parser("logs", help="follow a job's logs")
    a.add_argument("job_id")
    a = sub.add_parser("fetch", help="bring a file or directory from the head's home here")
    a.add_argument("path")
    a.add_argument("dest", nargs="?", default=".")
    sub.add_parser("dashboard", help="tunnel to Ray's dashboard and print its local URL")
    a = sub.add_parser("autostop", help="the head's idle teardown: show it, change it (--minutes M, --off), --log")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, help="tear down after this many idle minutes (restarts the count)")
    g.add_argument("--off", action="store_true", help="never tear down by itself")
    g.add_argument("--log", action="store_true", help="the daemon's decisions, as logged on the head")
    a = sub.add_parser("import-terraform", help="use a cluster made by terraform/")
    a.add_argument("--dir", default="terraform", help="the Terraform directory (runs `terraform output -json`)")
    a.add_argument("--output-json", help="or: a file holding the output of `terraform output -json`")
    a.add_argument("--ssh-key", required=True, help="the private key whose public half Terraform registered")
    a = sub.add_parser("types", help="instance types: CPUs, memory, GPUs, price per hour, the zones offering each")
    a.add_argument("--zone", help="only the types this zone offers")
    sub.add_parser("cost-report", help="every cluster made from this machine, ended ones included: duration, cost")
    a = sub.add_parser("ray-config", help="print a Ray cluster YAML for `ray up` (an autoscaling cluster)")
    _autoscaling_options(a, max_default=2)
    _autostop_option(a)
    a.add_argument(
        "--worker-type",
        action="append",
        default=[],
        metavar="NAME=TYPE[,min=N][,max=N][,RES=N]",
        help="another worker node type, e.g. gpu=gpua5000.small,max=2 (repeatable)",
    )
    a.add_argument("--head-type", help="the head's instance type (default: instance_type from the config)")
    return p


def _autostop_option(a: argparse.ArgumentParser) -> None:
    a.add_argument(
        "--autostop",
        type=float,
        metavar="MINUTES",
        help="tear the cluster down after MINUTES idle (0 = never; default: autostop_minutes from config, else 120)",
    )


def _autoscaling_options(a: argparse.ArgumentParser, max_default: int | None) -> None:
    a.add_argument("--min-workers", type=int, default=0, help="workers kept at all times (default 0)")
    a.add_argument("--max-workers", type=int, default=max_default, help="workers the autoscaler may add")
    a.add_argument(
        "--idle-minutes", type=float, default=5.0, help="a worker idle this long is removed (default 5; fractions work)"
    )


def _load(args, require_credentials: bool = True, **overrides) -> ClusterConfig:
    cfg = config_mod.load(args.config, require_credentials=require_credentials, name=args.name, **overrides)
    for warning in cfg.cost.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return cfg


def _select(st: ClusterState, which: str | None) -> list[NodeRecord]:
    nodes = st.ordered()
    if which is None:
        return nodes
    if which.isdigit() and int(which) < len(nodes):
        return [nodes[int(which)]]
    for n in nodes:
        if n.name == which:
            return [n]
    raise CLIError(
        f"no node {which!r} in cluster {st.name!r}; valid: 0-{len(nodes) - 1} or {', '.join(n.name for n in nodes)}"
    )


def cmd_up(args) -> int:
    if args.max_workers is not None:
        return cmd_up_autoscaling(args)
    cfg = _load(args, nodes=args.nodes, autostop_minutes=args.autostop)
    if not cfg.ssh_cidr_given:
        print(
            "warning: SSH (port 22) will be open to 0.0.0.0/0; set ssh_cidr in cluster.toml "
            "(e.g. your address/32) to narrow it",
            file=sys.stderr,
        )
    out = clusters.up(cfg, _printer(), timeout=args.timeout, autostop_minutes=args.autostop)
    _print_nodes(out.state)
    if out.failed:
        print(
            f"{len(out.failed)} node(s) not ready: "
            + "; ".join(f"{k}: {v}" for k, v in sorted(out.failed.items()))
            + f". Run `{PROG} up` again to complete the cluster, or `{PROG} down` to remove it.",
            file=sys.stderr,
        )
        return 1
    if out.autostop is not None:
        print(f"autostop of cluster {cfg.name!r}: {out.autostop.describe()}", file=sys.stderr)
    print(f"cluster {cfg.name!r} ready: {len(out.state.nodes)} node(s)", file=sys.stderr)
    return 0


def cmd_down(args) -> int:
    cfg = _load(args)

    def confirm(removal: clusters.Removal) -> bool:
        for note in removal.notes:
            print(note, file=sys.stderr)
        if removal.empty or args.yes:
            return True
        what = ", ".join(removal.what)
        if sys.stdin is None or not sys.stdin.isatty():  # no terminal to ask on (CI, cron, a pipe)
            raise CLIError(f"would remove {what}; refusing without --yes (stdin is not a terminal)")
        return input(f"Remove {what} of cluster {cfg.name!r}? [y/N] ").strip().lower() in ("y", "yes")

    out = clusters.down(cfg, _printer(), timeout=args.timeout, confirm=confirm)
    if out.removal.empty:
        for note in out.removal.notes:
            print(note, file=sys.stderr)
        print(f"cluster {cfg.name!r}: nothing to remove", file=sys.stderr)
        return 0
    if not out.confirmed:
        print("nothing removed", file=sys.stderr)
        return 1
    if out.failed:
        print(
            f"after {int(out.elapsed_s)} s, left: "
            + "; ".join(f"{k} ({v})" for k, v in sorted(out.failed.items()))
            + f". Run `{PROG} down` again to finish.",
            file=sys.stderr,
        )
        return 1
    print(f"cluster {cfg.name!r} removed: {', '.join(out.removed) or 'nothing left'}", file=sys.stderr)
    return 0


def _print_nodes(st: ClusterState, costs: ClusterCost | None = None) -> None:
    """The nodes as a table; given their costs, each node's type, hourly rate, uptime and cost too."""
    rows: list[tuple[str, ...]] = [("#", "NAME", "ROLE", "PUBLIC IP", "STATE")]
    rows += [(str(i), n.name, n.role, n.ip or "-", n.state or "-") for i, n in enumerate(st.ordered())]
    if costs is not None:
        by_name = {c.name: c for c in costs.nodes}
        rows[0] += ("TYPE", "RATE", "UPTIME", "COST")
        for i, n in enumerate(st.ordered(), start=1):
            c = by_name.get(n.name)
            rows[i] += (
                (
                    c.instance_type,
                    rate_text(c.rate, costs.currency),
                    duration_text(c.uptime_s),
                    money(c.cost, costs.currency),
                )
                if c is not None
                else ("-", "-", "-", "-")
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if costs is not None:
        print(costs.summary())


def cmd_install(args) -> int:
    cfg = _load(args, require_credentials=False)
    results = node_install.install(cfg, _printer(), extra_packages=args.default_packages)
    return _report(results, "install")


def cmd_start(args) -> int:
    cfg = _load(args, require_credentials=False)
    nodes = ray_runtime.start(cfg, _printer())
    _print_ray(nodes)
    return 0


def cmd_stop(args) -> int:
    cfg = _load(args, require_credentials=False)
    return _report(ray_runtime.stop(cfg, _printer()), "stop")


def cmd_submit(args) -> int:
    command = [c for c in args.job_command if c != "--"] if args.job_command[:1] == ["--"] else args.job_command
    if not command:
        raise CLIError("give the command after --, e.g. submit -- python -m pipeline.mnist --address auto")
    cfg = _load(args, require_credentials=False)
    tunnel, port = jobs.dashboard_tunnel(cfg)
    try:
        client = jobs.job_client(port)
        job_id = jobs.submit(client, command)
        print(
            f"submitted job {job_id}; it keeps running if this machine disconnects (re-attach: {PROG} logs {job_id})",
            file=sys.stderr,
        )
        if args.no_follow:
            print(job_id)
            return 0
        return _follow(client, job_id)
    finally:
        tunnel.close()


def _follow(client, job_id: str) -> int:
    """Stream a job's logs to the end; 0 when it succeeded. Ctrl-C detaches (the job goes on)."""
    try:
        status = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\ndetached; the job keeps running. Re-attach: {PROG} logs {job_id}", file=sys.stderr)
        return 130
    except RuntimeError as e:  # e.g. no such job
        raise CLIError(f"job {job_id}: {str(e).splitlines()[0][:300]}") from None
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_logs(args) -> int:
    cfg = _load(args, require_credentials=False)
    tunnel, port = jobs.dashboard_tunnel(cfg)
    try:
        return _follow(jobs.job_client(port), args.job_id)
    finally:
        tunnel.close()


def cmd_fetch(args) -> int:
    cfg = _load(args, require_credentials=False)
    target = jobs.fetch(cfg, args.path, Path(args.dest))
    print(f"{args.path} -> {target}", file=sys.stderr)
    return 0


def cmd_dashboard(args) -> int:
    cfg = _load(args, require_credentials=False)
    tunnel, port = jobs.dashboard_tunnel(cfg)
    token = StateStore(cfg.state_dir).ray_token_path
    print(
        f"Ray dashboard of cluster {cfg.name!r}: http://127.0.0.1:{port}  (token in {token}); Ctrl-C closes it",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        tunnel.close()


def _print_ray(nodes: list[dict]) -> None:
    alive = [n for n in nodes if n["alive"]]
    print(f"Ray: {len(alive)} node(s) alive, {sum(n['cpus'] for n in alive):g} CPUs")
    for n in sorted(nodes, key=lambda n: n["ip"]):
        print(f"  {n['ip']:<16} {'alive' if n['alive'] else 'dead':<6} {n['cpus']:g} CPUs")


def cmd_list(args) -> int:
    cfg = _load(args, require_credentials=False)
    st = clusters.status(cfg)
    if not st.state.nodes:
        if st.gone is not None:  # the group, key or restricted key are left: the line says why and what
            print(st.gone)
        else:
            print(f"cluster {cfg.name!r} has no nodes", file=sys.stderr)
        return 0
    _print_nodes(st.state, st.cost)
    if st.cost is None:
        print("cost: unknown without the API (set EXOSCALE_API_KEY and EXOSCALE_API_SECRET)")
    if st.ray_nodes is not None:
        _print_ray(st.ray_nodes)
    else:
        print(f"Ray: not running ({st.ray_error})")
    if st.autoscaler is not None:
        print(st.autoscaler)
    print(st.autostop)
    return 0


def cmd_autostop(args) -> int:
    cfg = _load(args, require_credentials=False)
    if args.minutes is not None:
        try:
            autostop.check_minutes(args.minutes, "--minutes")
        except ValueError as e:
            raise CLIError(str(e)) from None
    if args.minutes is not None or args.off:
        s = clusters.set_autostop(cfg, 0 if args.off else args.minutes)
        print(f"autostop of cluster {cfg.name!r}: {s.describe()}", file=sys.stderr)
        return 0
    try:
        print(clusters.autostop_state(cfg, args.log))
    except access.Gone as e:  # a question, answered: the instances are gone
        print(e)
    return 0


def _report(results, verb: str) -> int:
    failed = [r for r in results if not r.ok]
    for r in results:
        print(f"{r.node.name}: {verb} {r.summary()}", file=sys.stderr)
    if failed:
        print(
            f"{len(failed)} of {len(results)} node(s) failed: {', '.join(r.node.name for r in failed)}", file=sys.stderr
        )
        return 1
    return 0


def cmd_scp(args) -> int:
    cfg = _load(args, require_credentials=False)
    if not Path(args.src).exists():
        raise CLIError(f"{args.src}: no such file or directory")
    acc = access.connect(cfg)
    return _report(acc.remote.put(_select(acc.state, args.node), args.src, args.dst), f"{args.src} -> {args.dst}:")


def cmd_cmd(args) -> int:
    cfg = _load(args, require_credentials=False)
    acc = access.connect(cfg)
    results = acc.remote.run(
        _select(acc.state, args.node), args.remote_command, sudo=args.sudo, timeout=args.timeout, stream=sys.stdout
    )
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"{r.node.name}: FAILED: {r.summary()}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(results)} node(s) failed", file=sys.stderr)
        return 1
    return 0


def cmd_ssh(args) -> int:
    cfg = _load(args, require_credentials=False)
    acc = access.connect(cfg)
    [node] = _select(acc.state, args.node)
    pin = acc.remote.wait_ssh_one(node, timeout=30)  # pins the host key on first contact, refuses a changed one
    if not pin.ok:
        raise CLIError(pin.error)
    argv = interactive_ssh_argv(node, acc.remote.key_path, acc.remote.known_hosts, args.remote_command)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def cmd_forget_host(args) -> int:
    cfg = _load(args, require_credentials=False)
    st = access.cluster_state(cfg)
    [node] = _select(st, args.node)
    StateStore(cfg.state_dir).forget_host(node.ip)
    print(
        f"{node.name} ({node.ip}): pinned host key dropped; the next connection pins the key it sees", file=sys.stderr
    )
    return 0


def cmd_import_terraform(args) -> int:
    cfg = _load(args, require_credentials=False)
    if args.output_json:
        text = Path(args.output_json).read_text()
    else:
        try:
            text = subprocess.run(
                ["terraform", f"-chdir={args.dir}", "output", "-json"], check=True, capture_output=True, text=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise CLIError(f"terraform output -json in {args.dir} failed: {getattr(e, 'stderr', '') or e}") from None
    st = state_from_terraform(json.loads(text), cfg.name)
    key = Path(args.ssh_key).expanduser()
    if not key.is_file():
        raise CLIError(f"--ssh-key {key}: no such file")
    store = StateStore(cfg.state_dir)
    store.save(st)
    store.record_imported_key(key)
    _print_nodes(st)
    print(f"cluster {cfg.name!r} imported from Terraform; scp, cmd and ssh now work on it", file=sys.stderr)
    return 0


def state_from_terraform(outputs: dict, name: str) -> ClusterState:
    """ClusterState from `terraform output -json` of terraform/ (output `nodes`: a list of objects)."""
    try:
        nodes = outputs["nodes"]["value"]
        user = outputs.get("ssh_user", {}).get("value", "ubuntu")
        records = [
            NodeRecord(name=n["name"], role=n["role"], ip=n["public_ip"], id=n.get("id", ""), user=user) for n in nodes
        ]
    except (KeyError, TypeError) as e:
        raise CLIError(
            f"terraform output lacks {e}; expected an output `nodes` = [{{name, role, public_ip}}]"
        ) from None
    return ClusterState(name, records)


def cmd_up_autoscaling(args) -> int:
    """The head (and --min-workers workers) through `ray up`; Ray's autoscaler on the head adds the rest."""
    if args.nodes is not None:
        raise CLIError(
            "-n and --max-workers exclude each other: -n N makes N nodes, --max-workers an autoscaling cluster"
        )
    if args.max_workers < 0 or not 0 <= args.min_workers <= args.max_workers:
        raise CLIError(f"--min-workers {args.min_workers} / --max-workers {args.max_workers}: need 0 <= min <= max")
    cfg = _load(args, autostop_minutes=args.autostop)
    args.max_workers = clusters.capped_max_workers(cfg, args.min_workers, args.max_workers, _printer())
    out = clusters.up_autoscaling(
        cfg,
        args.min_workers,
        args.max_workers,
        args.idle_minutes,
        _printer(),
        packages=args.default_packages,
        autostop_minutes=args.autostop,
        timeout=args.timeout,
    )
    _print_nodes(out.state)
    if out.ray_up_exit != 0:
        print(
            f"ray up failed (exit {out.ray_up_exit}); see its output above. Run `{PROG} up --max-workers "
            f"{args.max_workers}` again, or `{PROG} down` to remove it.",
            file=sys.stderr,
        )
        return 1
    if out.autostop is not None:
        print(f"autostop of cluster {cfg.name!r}: {out.autostop.describe()}", file=sys.stderr)
    print(
        f"autoscaling cluster {cfg.name!r} ready: head + {args.min_workers} worker(s), up to "
        f"{args.max_workers} added on demand, removed after {args.idle_minutes:g} idle minute(s)",
        file=sys.stderr,
    )
    return 0


def cmd_ray_config(args) -> int:
    """The Ray cluster YAML on stdout (only it: messages go to stderr)."""
    cfg = _load(args, require_credentials=False, autostop_minutes=args.autostop)
    worker_types = tuple(ray_config.parse_worker_type(t) for t in args.worker_type)
    others: dict[str, int] = {}
    for w in worker_types:
        others[w.instance_type] = others.get(w.instance_type, 0) + w.max_workers
    args.max_workers = clusters.capped_max_workers(
        cfg, args.min_workers, args.max_workers, _printer(), head_type=args.head_type, others=others
    )
    config = ray_config.build(
        cfg,
        args.min_workers,
        args.max_workers,
        args.idle_minutes,
        worker_types,
        args.head_type,
        packages=args.default_packages,
    )
    sys.stdout.write(ray_config.render(config))
    sys.stdout.flush()
    print(
        f"cluster {cfg.name!r}: {args.min_workers}-{args.max_workers} worker(s) of {cfg.spec.instance_type}"
        + "".join(f", {w.min_workers}-{w.max_workers} {w.name} ({w.instance_type})" for w in worker_types)
        + f", idle after {args.idle_minutes:g} min. Next: ray up FILE.yaml -y (EXOSCALE_API_KEY/SECRET set)",
        file=sys.stderr,
    )
    return 0


def cmd_types(args) -> int:
    if args.zone is not None and args.zone not in ZONES:
        raise CLIError(f"--zone {args.zone!r} is not a zone of Exoscale; valid: {', '.join(ZONES)}")
    cfg = _load(args)
    print(render_types(cfg.driver().ex_list_instance_types(), zone=args.zone))
    return 0


def cmd_cost_report(args) -> int:
    cfg = _load(args, require_credentials=False)
    print(clusters.cost_report(cfg.state_dir.parent))
    return 0


COMMANDS = {
    "cost-report": cmd_cost_report,
    "ray-config": cmd_ray_config,
    "up": cmd_up,
    "create": cmd_up,
    "down": cmd_down,
    "destroy": cmd_down,
    "list-nodes": cmd_list,
    "types": cmd_types,
    "status": cmd_list,
    "ssh": cmd_ssh,
    "scp": cmd_scp,
    "cmd": cmd_cmd,
    "forget-host": cmd_forget_host,
    "import-terraform": cmd_import_terraform,
    "install": cmd_install,
    "start": cmd_start,
    "stop": cmd_stop,
    "submit": cmd_submit,
    "logs": cmd_logs,
    "fetch": cmd_fetch,
    "dashboard": cmd_dashboard,
    "autostop": cmd_autostop,
}


def main(argv: list[str] | None = None, default_packages: Sequence[str] = ()) -> int:
    """Run one command; `default_packages` is the nodes' extra packages when cluster.toml names none
    (`exoscale.py` passes the training program's)."""
    args = build_parser().parse_args(argv)
    args.default_packages = tuple(default_packages)
    use_token_auth()  # Ray reads the mode once, when first imported (by submit, logs, ...)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
        logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except (CLIError, ConfigError, access.AccessError, NoHeadError, clusters.ClusterError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except clusters.Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, (LibcloudError, BaseHTTPError, RayClusterError, InstallError, RayAuthError)):
            text = e.value if isinstance(e, LibcloudError) else str(e)  # libcloud's str() wraps it in a repr
            if isinstance(e, InvalidCredsError) and "signature" in str(text):
                text = f"{text}; {config_mod.wrong_credentials_hint(os.environ.get('EXOSCALE_API_KEY', ''))}"
            print(f"{PROG}: error: {text}", file=sys.stderr)
            return 1
        raise
