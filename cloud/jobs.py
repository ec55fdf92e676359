"""Ray jobs on the cluster's head through a tunnel to its dashboard, and results brought home."""

from __future__ import annotations

import io
import os
import shlex
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from cloud import access
from cloud.config import ClusterConfig
from cloud.ray_runtime import DASHBOARD_PORT, RayClusterError
from cloud.remote import run_script, script
from cloud.tunnel import Tunnel, open_tunnel

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parent.parent
JOB_EXCLUDES = [".venv", ".git", "results", "*.png", "__pycache__", ".pytest_cache", "*.egg-info", ".cluster"]


def dashboard_tunnel(cfg: ClusterConfig) -> tuple[Tunnel, int]:
    """A tunnel to the head's dashboard (bound to 127.0.0.1 there), with the token set for Ray's clients."""
    return open_tunnel(cfg, lambda head: "127.0.0.1", DASHBOARD_PORT)


def job_client(port: int) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(f"http://127.0.0.1:{port}")
    except Exception as e:
        raise RayClusterError(f"Ray's job API on the head refused us: {str(e).strip().splitlines()[0]}") from None


def submit(client: JobSubmissionClient, command: Sequence[str]) -> str:
    """Run `command` as a Ray job on the head, with this project shipped along (on PYTHONPATH). It runs in
    the login user's home, so relative paths it writes are where `fetch` looks."""
    entry = script(f'export PYTHONPATH="$PWD${{PYTHONPATH:+:$PYTHONPATH}}"\ncd\nexec {shlex.join(command)}')
    return client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": JOB_EXCLUDES})


def follow(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout) -> str:
    """Stream a job's logs until it ends; return its final status."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return str(client.get_job_status(job_id).value)


def fetch(cfg: ClusterConfig, path: str, dest: Path) -> Path:
    """Copy a file or directory (relative to the head's home) to `dest` on this machine."""
    acc = access.connect(cfg)
    head = acc.state.require_head()
    with acc.remote.connection(head) as c:
        q = shlex.quote(path)
        probe = f"if [ -d {q} ]; then echo dir; elif [ -f {q} ]; then echo file; else echo none; fi"
        kind = run_script(c, probe).stdout.strip()
        if kind == "none":
            raise RayClusterError(f"{path}: no such file or directory on the head {head.name}")
        if kind == "file":
            target = dest / Path(path).name if dest.is_dir() else dest
            c.get(path, str(target))
            return target
        tmp = f".raysweep-fetch-{os.getpid()}.tgz"
        buf = io.BytesIO()
        try:
            r = run_script(c, f"tar czf {tmp} -C {q} .")
            if r.exited != 0:
                raise RayClusterError(f"cannot pack {path} on the head {head.name}: {r.stderr.strip()[-200:]}")
            c.get(tmp, buf)
        finally:
            run_script(c, f"rm -f {tmp}")
    target = dest / Path(path.rstrip("/")).name if dest.is_dir() else dest
    target.mkdir(parents=True, exist_ok=True)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    return target
