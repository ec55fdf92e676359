"""python -m cloud.sim api --port N [--hosts]: serve a local Exoscale API v2 until stopped.

The one valid credential pair comes from EXOSCALE_API_KEY / EXOSCALE_API_SECRET (or --key/--secret).
Point the toolkit at it with EXOSCALE_API_ENDPOINT=http://HOST:PORT/v2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from cloud.sim.api import App, HTTPFaults, SimServer
from cloud.sim.model import ZONES, Faults, Model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cloud.sim")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("api", help="serve the API")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8080)
    a.add_argument("--zone", default="ch-gva-2", choices=ZONES)
    a.add_argument("--key", default=os.environ.get("EXOSCALE_API_KEY"))
    a.add_argument("--secret", default=None, help="default: $EXOSCALE_API_SECRET")
    a.add_argument("--hosts", action="store_true", help="boot each instance as a local host (root)")
    a.add_argument("--op-delay", type=float, default=0.5, help="seconds an operation stays pending")
    a.add_argument("--op-failure-rate", type=float, default=0.0, help="share of operations that fail")
    a.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 429/503")
    a.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    secret = args.secret or os.environ.get("EXOSCALE_API_SECRET")
    if not args.key or not secret:
        print(
            "cloud.sim: error: set EXOSCALE_API_KEY and EXOSCALE_API_SECRET (or --key/--secret): "
            "the one credential pair the sim accepts",
            file=sys.stderr,
        )
        return 2
    for name in ("op_failure_rate", "error_rate"):
        if not 0 <= getattr(args, name) <= 1:
            print(f"cloud.sim: error: --{name.replace('_', '-')} must be within [0, 1]", file=sys.stderr)
            return 2
    hooks = None
    if args.hosts:
        from cloud.sim.hosts import HostHooks

        try:
            hooks = HostHooks.create()
        except RuntimeError as e:
            print(f"cloud.sim: error: --hosts: {e}", file=sys.stderr)
            return 2
    model = Model(
        args.zone, Faults(op_delay_s=args.op_delay, op_failure_rate=args.op_failure_rate), hooks=hooks, seed=args.seed
    )
    if hooks is not None:
        hooks.attach(model)
    app = App(model, args.key, secret, HTTPFaults(error_rate=args.error_rate, latency_s=args.latency, seed=args.seed))
    server = SimServer(app, args.host, args.port).start()
    print(
        f"Exoscale API sim on {server.endpoint} (zone {args.zone}, key {args.key}); Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait()
    server.stop()
    if hooks is not None:
        hooks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
