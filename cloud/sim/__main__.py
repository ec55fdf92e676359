"""python -m cloud.sim api [--port N] [--hosts [--subnet CIDR]]: serve a local Exoscale API v2 until stopped.

Every zone is served: --zone's at the endpoint printed, each zone at ENDPOINT-BASE/ZONE/v2, as its list-zones
gives them. `--capacity gpu3.small@de-fra-1=0` leaves a zone without room for a type (creates refused as out
of capacity), `--quota instance=5` sets a quota of the organization (list-quotas names the resources).

The account's key pair is a fresh one, or with --key the key given and the secret from EXOSCALE_API_SECRET (never a
command line, where `ps` shows it). Credentials merely exported in the shell are not adopted: they may be the
user's real Exoscale pair, which would then be copied into the env file; without --key a
fresh pair is made. Everything a client needs (endpoint, key, secret) goes into a 0600 env file; the line
that sources it is printed, never the secret. With --hosts the endpoint is on the hosts' bridge gateway, so the
same URL works from this machine and from the hosts, which are also offered uv and a package index.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import signal
import sys
import threading
from pathlib import Path

from cloud.sim.local import LocalExoscale, client_env, start
from cloud.sim.model import CAPACITY_ANSWERS, QUOTA_RESOURCES, ZONES, Faults, parse_capacity_key
from cloud.sim.server import HTTPFaults


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cloud.sim")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("api", help="serve the API")
    a.add_argument("--host", default="127.0.0.1", help="address to serve on (with --hosts: also the gateway)")
    a.add_argument("--port", type=int, default=8080)
    a.add_argument("--zone", default="ch-gva-2", choices=ZONES)
    a.add_argument("--key", default=None, help="the account's key (its secret from $EXOSCALE_API_SECRET)")
    a.add_argument("--secret", default=None, help=argparse.SUPPRESS)  # refused: a command line is public
    a.add_argument("--hosts", action="store_true", help="boot each instance as a local host (root)")
    a.add_argument("--subnet", default=None, help="with --hosts: the hosts' network, e.g. 10.77.5.0/24")
    a.add_argument(
        "--no-packages", action="store_true", help="with --hosts: do not offer the hosts uv and a package index"
    )
    a.add_argument("--env-file", default=None, help="where to write the exports (default: a 0600 file in /tmp)")
    a.add_argument("--op-delay", type=float, default=0.5, help="seconds an operation stays pending")
    a.add_argument("--op-failure-rate", type=float, default=0.0, help="share of operations that fail")
    a.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 429/503")
    a.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    a.add_argument("--seed", type=int, default=None)
    a.add_argument(
        "--capacity",
        action="append",
        default=[],
        metavar="TYPE@ZONE=N",
        help="at most N instances of TYPE in ZONE (0: none), e.g. gpu3.small@de-fra-1=0; repeatable",
    )
    a.add_argument(
        "--capacity-answer",
        choices=CAPACITY_ANSWERS,
        default="request",
        help="how a create past --capacity is refused: at once (request, 500) or by its operation failing",
    )
    a.add_argument(
        "--quota",
        action="append",
        default=[],
        metavar="RESOURCE=N",
        help=f"the organization's limit for RESOURCE ({', '.join(QUOTA_RESOURCES)}), -1 unlimited; repeatable",
    )
    a.add_argument("-v", "--verbose", action="store_true")
    c = sub.add_parser("coverage", help="which operations of the spec are served (501 for the others)")
    c.add_argument("--service", default="compute", help="IAM service class, e.g. compute, iam (default compute)")
    return p


def parse_counts(option: str, items: list[str], check_key) -> dict[str, int]:
    """`--option KEY=N` values as {KEY: N}; ValueError in one line naming the bad one and the form expected."""
    out: dict[str, int] = {}
    for item in items:
        key, eq, count = item.rpartition("=")
        try:
            n = int(count)
        except ValueError:
            n = None
        if not eq or not key or n is None:
            raise ValueError(f"--{option} {item!r}: expected KEY=N with N a whole number")
        check_key(key, n)
        out[key] = n
    return out


def _check_capacity(key: str, n: int) -> None:
    parse_capacity_key(key)
    if n < 0:
        raise ValueError(f"--capacity {key}={n}: give a number of instances >= 0")


def _check_quota(key: str, n: int) -> None:
    if key not in QUOTA_RESOURCES:
        raise ValueError(f"--quota {key}={n}: unknown resource {key!r}; valid: {', '.join(QUOTA_RESOURCES)}")
    if n < -1:
        raise ValueError(f"--quota {key}={n}: give a limit >= 0, or -1 for unlimited")


def print_coverage(service: str) -> int:
    from cloud.sim.urls import coverage

    served, declined = coverage(service)
    total = len(served) + sum(len(ops) for ops in declined.values())
    print(f"{service}: {len(served)} of the spec's {total} operations served: {', '.join(served)}")
    for tag, ops in declined.items():
        print(f"  declined ({tag}): {', '.join(ops)}")
    return 0


def write_env_file(path: Path, sim: LocalExoscale, key: str, secret: str) -> None:
    """The exports for a client of this sim, in a file only its owner can read."""
    env = client_env(sim.endpoint, key, secret)
    text = "".join(f"export {name}={shlex.quote(env[name])}\n" for name in sorted(env))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "coverage":
        return print_coverage(args.service)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")

    def fail(message: str) -> int:
        print(f"cloud.sim: error: {message}", file=sys.stderr)
        return 2

    for name in ("op_failure_rate", "error_rate"):
        if not 0 <= getattr(args, name) <= 1:
            return fail(f"--{name.replace('_', '-')} must be within [0, 1]")
    if args.subnet and not args.hosts:
        return fail("--subnet needs --hosts (it is the hosts' network)")
    if args.subnet:
        from cloud.sim.hosts import parse_subnet

        try:
            parse_subnet(args.subnet)
        except ValueError as e:
            return fail(str(e))
    try:
        capacity = parse_counts("capacity", args.capacity, _check_capacity)
        quotas = parse_counts("quota", args.quota, _check_quota)
    except ValueError as e:
        return fail(str(e))
    if args.secret is not None:
        return fail("--secret is not taken on the command line, where ps shows it; set EXOSCALE_API_SECRET instead")
    key = args.key
    secret = os.environ.get("EXOSCALE_API_SECRET")
    if not key:  # a fresh pair, whatever the shell exports (perhaps the user's real one)
        key, secret = "EXO" + secrets.token_hex(12), secrets.token_urlsafe(32)
    elif not secret:
        return fail("give both --key and EXOSCALE_API_SECRET (in the environment), or neither for a fresh pair")
    try:
        sim = start(
            key,
            secret,
            zone=args.zone,
            faults=Faults(
                op_delay_s=args.op_delay,
                op_failure_rate=args.op_failure_rate,
                capacity=capacity,
                capacity_answer=args.capacity_answer,
            ),
            quotas=quotas,
            http_faults=HTTPFaults(error_rate=args.error_rate, latency_s=args.latency, seed=args.seed),
            hosts=args.hosts,
            subnet=args.subnet,
            offer_packages=args.hosts and not args.no_packages,
            host=args.host,
            port=args.port,
            seed=args.seed,
        )
    except (RuntimeError, OSError) as e:
        return fail(f"{'--hosts: ' if args.hosts else ''}{e}")
    env_file = Path(args.env_file or f"/tmp/raysweep-sim-{os.getuid()}-{sim.server.port}.env")
    try:
        write_env_file(env_file, sim, key, secret)
        hosts = f", hosts on {sim.hooks.subnet}" if sim.hooks is not None else ""
        print(
            f"# local Exoscale API on {sim.endpoint} (zone {args.zone}, key {key}{hosts}); Ctrl-C stops it.\n"
            f"# Every zone is served at {sim.endpoint.removesuffix('/v2')}/ZONE/v2 (list-zones gives them).\n"
            f"# In another shell, then use exoscale.py / make cluster-up as with Exoscale:\n"
            f"source {shlex.quote(str(env_file))}",
            flush=True,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *a: stop.set())
        signal.signal(signal.SIGINT, lambda *a: stop.set())
        stop.wait()
    finally:
        sim.close()
        env_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
