"""Shared helpers of the benchmarks: a local Ray started once, the local Exoscale with hosts and
`exoscale.py` run against it, timing, printing."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from cloud.exoscale_driver import ExoscaleV2NodeDriver
    from cloud.sim.local import LocalExoscale

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def scratch_dir(prefix: str) -> Path:
    """A new directory for one benchmark run (cluster state, keys, caches), removed when the process exits:
    repeated runs must not pile up on the disk."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def start_local_ray(num_cpus: int | None = None) -> None:
    """A local Ray as a sweep starts it (tasks.ensure_ray: what its workers leave is removed at exit)."""
    from pipeline import tasks

    if "PIPELINE_CACHE_DIR" not in os.environ:
        os.environ["PIPELINE_CACHE_DIR"] = str(scratch_dir("bench-cache-"))
    tasks.ensure_ray(num_cpus=num_cpus)


def sim_with_hosts(offer_packages: bool = True) -> LocalExoscale:
    """The local Exoscale the cluster benchmarks run on: its instances boot as namespace hosts (needs root;
    SystemExit naming what is missing), operations stay pending 0.5 s, the account's key pair is fresh.
    `offer_packages`: the hosts are offered uv and a package index as the internet would (for `install`)."""
    from cloud.sim.hosts import missing_requirements
    from cloud.sim.local import start
    from cloud.sim.model import Faults

    missing = missing_requirements()
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}")
    secret = "bench-secret-" + uuid.uuid4().hex
    return start("EXObench", secret, faults=Faults(op_delay_s=0.5), hosts=True, offer_packages=offer_packages)


def sim_driver(sim: LocalExoscale) -> ExoscaleV2NodeDriver:
    """The driver, with the account's own key, for the API of `sim`."""
    from cloud.exoscale_driver import ExoscaleV2NodeDriver

    return ExoscaleV2NodeDriver(sim.key, sim.secret, host=sim.server.host, port=sim.server.port, secure=False)


def cli(env: dict[str, str], *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """`python exoscale.py ARGS` as a user runs it; SystemExit with its stderr's tail when it fails."""
    r = subprocess.run(
        [sys.executable, "exoscale.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if r.returncode != 0:
        raise SystemExit(f"exoscale.py {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r


def wait_for(what: str, check: Callable[[], T], timeout: float, every: float = 0.3) -> T:
    """Call `check` every `every` seconds until it returns something true, and return that; after `timeout`
    seconds, SystemExit saying what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def report(name: str, **values) -> dict:
    """Print one benchmark's result as a line a person reads and a JSON line a script reads."""
    print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    print("JSON " + json.dumps({"bench": name, **values}))
    return values


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def median(xs):
    return statistics.median(xs)
