"""Bounded waits, and cloud operations tried again within them.

An Exoscale operation can end in failure for reasons of its own (the local Exoscale's `--op-failure-rate`
makes it do so at will), and the API can answer 5xx or 429 after the driver's own retries. Every step of
`up` and `down` is therefore tried again until its wait ends, and what is reported is the step, its last
error and the time that really passed. The steps retried are idempotent (they look before they make or
delete), so a request that took effect although its operation failed is found the next time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import LibcloudError

from cloud.exoscale_driver import ExoscaleOperationError

Progress = Callable[[str, str], None]  # (node or resource name, what happened)
T = TypeVar("T")
HEARTBEAT_S = 10.0  # how often a wait says what it still waits for


class StepFailed(Exception):
    """A step of `up` or `down` failed every time it was tried within its wait; one line saying which."""

    def __init__(self, what: str, error: str, elapsed_s: float, tries: int):
        super().__init__(f"{what} failed {tries} time(s) in {elapsed_s:.0f} s; the last error: {error}")
        self.what, self.error, self.elapsed_s, self.tries = what, error, elapsed_s, tries


class Wait:
    """A bounded wait that says, at most every `every` seconds, what it still waits for and how long it has."""

    def __init__(self, timeout: float, every: float = HEARTBEAT_S, poll: float = 1.0):
        self.timeout, self.every, self.poll = timeout, every, poll
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self._next_beat = self.start + every

    def over(self) -> bool:
        return time.monotonic() >= self.deadline

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def elapsed(self) -> float:
        """Seconds since the wait began: what a message about it states."""
        return time.monotonic() - self.start

    def beat(self, progress: Progress, name: str, what: str) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            progress(name, f"{what} ({now - self.start:.0f} s of {self.timeout:g} s)")
            self._next_beat = now + self.every

    def sleep(self) -> None:
        time.sleep(min(self.poll, self.left()))


def error_text(e: BaseException) -> str:
    """An API or driver error as one line for a person (libcloud's str() of some errors is a repr)."""
    if isinstance(e, LibcloudError):
        return str(e.value)
    return str(e) or type(e).__name__


def transient(e: BaseException) -> bool:
    """Whether trying again may succeed: an operation that ended in failure, the API overloaded or failing
    (429, 5xx), or the API unreachable. A refusal (4xx: bad request, forbidden, quota, conflict, wrong
    credentials) is not: it would fail the same way."""
    if isinstance(e, ExoscaleOperationError):
        return True
    if isinstance(e, BaseHTTPError):
        code = getattr(e, "code", 0) or 0
        return code == 429 or code >= 500
    return type(e) is LibcloudError  # the driver's "cannot reach the Exoscale API"; its subclasses are refusals


def retry(what: str, step: Callable[[], T], wait: Wait, progress: Progress, name: str | None = None) -> T:
    """`step()`, tried again after a transient failure (`transient`) until `wait` ends; then StepFailed naming
    `what`, the last error and the seconds that passed. Each failure is reported on `progress` as it happens."""
    tries = 0
    while True:
        tries += 1
        try:
            return step()
        except Exception as e:
            if not transient(e):
                raise
            if wait.over():
                raise StepFailed(what, error_text(e), wait.elapsed(), tries) from None
            progress(name or what, f"{what} failed ({error_text(e)}); trying again")
            wait.sleep()
