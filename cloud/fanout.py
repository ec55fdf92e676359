"""One call per item in parallel, with a heartbeat while some are still out and a deadline.

The work runs in daemon threads: Ctrl-C in the caller returns at once (a request already sent still
takes effect on the server, which is why `up` and `down` are idempotent), and a deadline leaves the
stragglers running while the caller reports them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# called while calls are still out: (names still awaited, seconds since the fan-out started)
Heartbeat = Callable[[list[str], float], None]


@dataclass
class FanOut(Generic[R]):
    done: dict[str, R] = field(default_factory=dict)  # name -> what its call returned
    errors: dict[str, BaseException] = field(default_factory=dict)  # name -> what its call raised
    pending: list[str] = field(default_factory=list)  # names still out when the deadline came


def fan_out(
    items: Sequence[T],
    fn: Callable[[T], R],
    name: Callable[[T], str],
    timeout: float | None = None,
    heartbeat: Heartbeat | None = None,
    every: float = 10.0,
) -> FanOut[R]:
    """Run fn(item) for every item at once; return when all ended or `timeout` seconds passed.
    `heartbeat` is called every `every` seconds while calls are out."""
    out: FanOut[R] = FanOut()
    results: queue.Queue[tuple[str, tuple[R] | None, BaseException | None]] = queue.Queue()

    def one(item: T) -> None:
        try:
            results.put((name(item), (fn(item),), None))
        except BaseException as e:
            results.put((name(item), None, e))

    waiting = [name(i) for i in items]
    for item in items:
        threading.Thread(target=one, args=(item,), daemon=True, name=f"fan-out {name(item)}").start()
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    next_beat = start + every
    while waiting:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        wake = next_beat if deadline is None else min(next_beat, deadline)
        try:
            key, value, error = results.get(timeout=max(0.0, wake - now))
        except queue.Empty:
            if heartbeat is not None and time.monotonic() >= next_beat:
                heartbeat(list(waiting), time.monotonic() - start)
                next_beat += every
            continue
        waiting.remove(key)
        if value is not None:
            out.done[key] = value[0]
        elif error is not None:
            out.errors[key] = error
    out.pending = waiting
    return out
