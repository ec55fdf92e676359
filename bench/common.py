"""Shared helpers of the benchmarks: a local Ray started once, timing, printing."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new directory for one benchmark run (cluster state, keys, caches), removed when the process exits:
    repeated runs must not pile up on the disk."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def start_local_ray(num_cpus: int | None = None) -> None:
    import ray

    if "PIPELINE_CACHE_DIR" not in os.environ:
        os.environ["PIPELINE_CACHE_DIR"] = str(scratch_dir("bench-cache-"))
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")


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
