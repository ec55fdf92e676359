"""The one way the toolkit runs work in parallel: a call per item, at most a bounded number at once.

`fan_out` keeps the caller informed (a heartbeat while calls are out) and can stop waiting at a deadline;
`parallel_map` is its plain form (results in order, the first error raised once all ended). The work runs in
daemon threads: Ctrl-C in the caller returns at once (a request already sent still takes effect on the
server, which is why `up` and `down` are idempotent), and a deadline leaves the stragglers running while the
caller reports them; items not started by then are reported as pending too and never started.
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

#: At most this many calls at once (SSH sessions, API requests) unless the caller says otherwise.
MAX_PARALLEL = 32

# called while calls are still out: (names still awaited, seconds since the fan-out started)
Heartbeat = Callable[[list[str], float], None]


@dataclass
class FanOut(Generic[R]):
    done: dict[str, R] = field(default_factory=dict)  # name -> what its call returned
    errors: dict[str, BaseException] = field(default_factory=dict)  # name -> what its call raised
    pending: list[str] = field(default_factory=list)  # names still out (or not started) when the deadline came


def fan_out(
    items: Sequence[T],
    fn: Callable[[T], R],
    name: Callable[[T], str],
    timeout: float | None = None,
    heartbeat: Heartbeat | None = None,
    every: float = 10.0,
    max_parallel: int = MAX_PARALLEL,
) -> FanOut[R]:
    """Run fn(item) for every item, at most `max_parallel` at once; return when all ended or `timeout`
    seconds passed. `heartbeat` is called every `every` seconds while calls are out."""
    out: FanOut[R] = FanOut()
    results: queue.Queue[tuple[str, tuple[R] | None, BaseException | None]] = queue.Queue()
    todo: queue.Queue[T] = queue.Queue()
    for item in items:
        todo.put(item)
    stop = threading.Event()  # set at the deadline: items not started yet stay so

    def worker() -> None:
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((name(item), (fn(item),), None))
            except BaseException as e:
                results.put((name(item), None, e))

    waiting = [name(i) for i in items]
    for i in range(min(len(items), max(1, max_parallel))):
        threading.Thread(target=worker, daemon=True, name=f"fan-out {i}").start()
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    next_beat = start + every
    try:
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
    finally:
        stop.set()
    out.pending = waiting
    return out


def parallel_map(fn: Callable[[T], R], items: Sequence[T], max_parallel: int = MAX_PARALLEL) -> list[R]:
    """[fn(item) for item in items], at most `max_parallel` at once, in order; when calls raised, the first
    item's error is raised once every call ended. Every call runs in a worker thread, a single one too (with
    one item run in the caller's thread, a later `submit`'s dashboard tunnel failed in the autostop
    end-to-end test, twice; it passes with the call in a thread)."""
    indexed = list(enumerate(items))
    res = fan_out(indexed, lambda pair: fn(pair[1]), name=lambda pair: str(pair[0]), max_parallel=max_parallel)
    for i in range(len(items)):
        if str(i) in res.errors:
            raise res.errors[str(i)]
    return [res.done[str(i)] for i in range(len(items))]
