"""Progress reports from running trials to the sweep, and its stop decisions back, through one small Ray actor.

    hub = ProgressHub.start()                      # the sweep (driver), once per sweep with a `progress` field
    Execute(..., watch=..., report_to=hub.address("trial-0003#1"))
    for key, attempt, reports in hub.drain(): ...  # every poll of the sweep's loop
    hub.stop(key)                                  # the worker stops that program (SIGTERM, SIGKILL after grace)

On the worker, a Reporter thread sends the reports its program's stdout gave (pipeline.lines) as they come, and
asks every POLL_S whether to stop. A sweep without `progress` starts no actor and no thread: it costs nothing.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.lines import GRACE_S, StdoutMonitor

log = logging.getLogger(__name__)

NAMESPACE = "raysweep"
#: how often a worker sends what its program printed and asks whether to stop (seconds)
POLL_S = 0.25


@dataclass(frozen=True)
class ReportTo:
    """Where a trial's reports go: the hub actor's name, the trial's key there, the grace before SIGKILL."""

    hub: str
    key: str
    grace_s: float = GRACE_S


@ray.remote(num_cpus=0)
class _Hub:
    def __init__(self) -> None:
        self._reports: list[tuple[str, int, list[tuple[float, float]]]] = []
        self._stop: set[str] = set()

    def report(self, key: str, attempt: int, items: list[tuple[float, float]]) -> bool:
        if items:
            self._reports.append((key, attempt, items))
        return key in self._stop

    def drain(self) -> list[tuple[str, int, list[tuple[float, float]]]]:
        out, self._reports = self._reports, []
        return out

    def stop(self, key: str) -> None:
        self._stop.add(key)


class ProgressHub:
    """The sweep's end: reports in, stop decisions out."""

    def __init__(self, name: str, actor: Any, grace_s: float = GRACE_S):
        self.name = name
        self.grace_s = grace_s  # SIGTERM to SIGKILL for the programs it stops
        self._actor = actor
        self._unread: Any = None  # a drain call that timed out

    @classmethod
    def start(cls, timeout: float = 120.0, grace_s: float = GRACE_S) -> ProgressHub:
        """Start the hub and wait until it answers (a new actor is a new worker process: seconds on a busy
        node), so the first trials' reports do not wait for it. `grace_s`: what a program it stops has between
        SIGTERM and SIGKILL."""
        name = f"progress-{uuid.uuid4().hex[:12]}"
        actor = _Hub.options(name=name, namespace=NAMESPACE).remote()  # type: ignore[attr-defined]
        try:
            ray.get(actor.drain.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            raise TimeoutError(f"the sweep's progress hub (a Ray actor) did not start within {timeout:g} s") from None
        return cls(name, actor, grace_s)

    def address(self, key: str) -> ReportTo:
        return ReportTo(self.name, key, self.grace_s)

    def drain(self, timeout: float = 30.0) -> list[tuple[str, int, list[tuple[float, float]]]]:
        """The reports that arrived since the last call; none when the hub does not answer within `timeout`
        (they stay there for the next call)."""
        ref = self._unread if self._unread is not None else self._actor.drain.remote()
        try:
            reports = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            log.warning("the progress hub did not answer within %g s; its reports are taken at the next turn", timeout)
            self._unread = ref  # its answer holds reports: read at the next turn, not asked again
            return []
        self._unread = None
        return reports

    def stop(self, key: str) -> None:
        self._actor.stop.remote(key)

    def close(self) -> None:
        try:
            ray.kill(self._actor)
        except Exception:  # not connected any more: the actor goes with the job
            pass


def watched_run(watch: Any, to: ReportTo | None, attempt: int) -> tuple[StdoutMonitor, Reporter | None]:
    """The monitor of a program's stdout on a worker, and the reporter sending its progress when `to` is given."""
    if to is None:
        return StdoutMonitor(watch), None
    reporter = Reporter(to, attempt)
    monitor = StdoutMonitor(watch, reporter.on_report, grace_s=to.grace_s)
    if reporter.asked_to_stop():  # a trial that waited for a slot while the sweep stopped it: not started
        monitor.stop()
    reporter.watch(monitor)
    return monitor, reporter


_handles: dict[str, Any] = {}  # a worker process runs many trials of one sweep: the hub is looked up once


def _hub_handle(name: str) -> Any:
    handle = _handles.get(name)
    if handle is None:
        if len(_handles) > 16:
            _handles.clear()
        handle = _handles[name] = ray.get_actor(name, namespace=NAMESPACE)
    return handle


class Reporter:
    """Worker side: sends a program's progress reports to the hub as they come, stops the program when told."""

    def __init__(self, to: ReportTo, attempt: int):
        self.to = to
        self.attempt = attempt
        self.monitor: StdoutMonitor | None = None
        self._pending: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._hub: Any = None
        self._thread = threading.Thread(target=self._run, name="progress-reporter", daemon=True)

    def watch(self, monitor: StdoutMonitor) -> None:
        self.monitor = monitor
        self._thread.start()

    def asked_to_stop(self) -> bool:
        """Whether the sweep has already stopped this trial (asked once, before its program starts). Asked from
        a thread of its own: a task blocked in ray.get lends its CPUs to the next task while it waits, which
        would then run beside it."""
        answer: list[bool] = []

        def ask() -> None:
            try:
                self._hub = self._hub or _hub_handle(self.to.hub)
                answer.append(bool(ray.get(self._hub.report.remote(self.to.key, self.attempt, []), timeout=30)))
            except Exception as e:  # unreachable: the program runs, as when the hub goes later
                log.warning("cannot reach the sweep's progress hub %s: %s", self.to.hub, e)

        asking = threading.Thread(target=ask, name="progress-check", daemon=True)
        asking.start()
        asking.join(35)
        return bool(answer and answer[0])

    def on_report(self, step: float, value: float) -> None:
        with self._lock:
            self._pending.append((step, value))
        self._wake.set()

    def _run(self) -> None:
        while not self._done.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, []
            try:
                if self._hub is None:
                    self._hub = _hub_handle(self.to.hub)
                stop = ray.get(self._hub.report.remote(self.to.key, self.attempt, batch), timeout=30)
            except Exception as e:  # the sweep is gone or unreachable: the program runs on, its reports kept
                log.warning("cannot reach the sweep's progress hub %s: %s", self.to.hub, e)
                with self._lock:
                    self._pending = batch + self._pending
                self._done.wait(5)
                continue
            if stop and self.monitor is not None:
                self.monitor.stop()

    def close(self) -> None:
        self._done.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=35)
