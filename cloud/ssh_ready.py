"""The last step of `up`: wait until every node answers a real SSH command (pinning its host key on
first contact), saying every few seconds which nodes are still awaited and for how long."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cloud.fanout import fan_out
from cloud.remote import Remote
from cloud.state import NodeRecord

Progress = Callable[[str, str], None]


def wait_ssh(
    key_path: Path,
    known_hosts: Path,
    nodes: Sequence[NodeRecord],
    progress: Progress,
    timeout: float = 600.0,
    every: float = 10.0,
) -> dict[str, str]:
    """Wait for each node's sshd; returns {node that did not answer: why} (empty when all did)."""
    every = min(every, max(1.0, timeout / 4))  # a short wait still says who it waits for
    remote = Remote(key_path, known_hosts)
    start = time.monotonic()
    with_ip = [r for r in nodes if r.ip]
    failed = {r.name: "it has no public IP address" for r in nodes if not r.ip}

    def one(rec: NodeRecord) -> str | None:
        res = remote.wait_ssh_one(rec, timeout=timeout)
        if res.ok:
            progress(rec.name, f"answers on SSH ({rec.user}@{rec.ip}) after {time.monotonic() - start:.0f} s")
            return None
        return res.error or "no answer"

    def heartbeat(names: list[str], elapsed: float) -> None:
        by_name = {r.name: r for r in with_ip}
        awaited = ", ".join(f"{n} ({by_name[n].ip})" for n in sorted(names))
        progress("ssh", f"still waiting for {awaited} to answer on SSH, since {elapsed:.0f} s (timeout {timeout:g} s)")

    # remote.wait_ssh ends each wait at `timeout`; the fan-out's own deadline is a margin above it
    result = fan_out(with_ip, one, name=lambda r: r.name, timeout=timeout + 60, heartbeat=heartbeat, every=every)
    failed.update({nm: err for nm, err in result.done.items() if err is not None})
    failed.update({nm: f"{type(e).__name__}: {e}" for nm, e in result.errors.items()})
    failed.update({nm: f"SSH did not answer within {timeout:g} s" for nm in result.pending})
    for nm, why in sorted(failed.items()):
        progress(nm, f"FAILED: {why}")
    return failed
