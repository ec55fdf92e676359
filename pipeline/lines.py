"""A program's stdout read while it runs, in bounded memory: the lines a sweep needs, progress reports, a tail.

    reader = LineReader(Watch(json_key="loss", progress=ProgressSpec(key="val_acc", step="epoch")), on_report)
    reader.feed(chunk) ...; reader.close()
    reader.result()   # Watched: the last line, the last JSON line holding the key, the tail, counts

Whatever the program prints (a gigabyte, one line without a newline), the reader holds at most a tail, one line
of at most MAX_LINE bytes and one read's chunk. No Ray, no processes here: pipeline.sandbox feeds it from the
program's stdout pipe (StdoutMonitor), pipeline.progress sends its reports to the sweep.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

#: lines longer than this are cut to it (for the metric and progress; the tail keeps the bytes as printed)
MAX_LINE = 64 * 1024
#: the end of stdout kept by default (OUT/trials/<id>/stdout.txt)
TAIL_BYTES = 64 * 1024
# seconds from SIGTERM to SIGKILL for a stopped program (a sweep file's `[search] grace`), unless given
GRACE_S = 5.0
READ_BYTES = 1 << 20


@dataclass(frozen=True)
class ProgressSpec:
    """Where a progress report is on a line: the number under `key` of a JSON line (its step under `step`,
    else the count of reports), or a regex whose named groups `value` (and `step`) hold them."""

    key: str = ""
    step: str = ""
    regex: str = ""

    def describe(self) -> str:
        if self.regex:
            return f"lines matching {self.regex!r}"
        return f"{self.key!r} of JSON lines" + (f" at {self.step!r}" if self.step else "")


@dataclass(frozen=True)
class Watch:
    """What to keep of stdout: the last non-empty line always, the last JSON line holding `json_key` (when
    given), progress reports (when `progress` is given), and the last `tail_bytes` bytes."""

    json_key: str = ""
    progress: ProgressSpec | None = None
    tail_bytes: int = TAIL_BYTES


@dataclass
class Watched:
    """What a watched stdout leaves: small whatever the program printed."""

    tail: bytes = b""
    last_line: str = ""
    json_line: str = ""
    lines: int = 0
    bytes: int = 0
    reports: list[tuple[float, float]] = field(default_factory=list)  # (step, value), in order
    ignored: int = 0  # progress values that were not finite numbers, steps that were not numbers
    backwards: int = 0  # reports whose step was not after the last one

    def metric_text(self) -> str:
        """The lines a metric is read from (pipeline.spec.Metric.read): the last JSON line holding the key,
        then the last line."""
        return "\n".join(l for l in (self.json_line, self.last_line) if l)


#: progress reports kept per run at most (the later ones are still sent, the list keeps the first ones)
MAX_REPORTS = 100_000


class LineReader:
    """Feed it stdout's bytes in any chunks; it calls `on_report(step, value)` for each progress report."""

    def __init__(self, watch: Watch, on_report: Callable[[float, float], None] | None = None):
        self.watch = watch
        self.on_report = on_report
        self.out = Watched()
        self._partial = bytearray()  # the line being read, at most MAX_LINE bytes
        self._cut = False  # the line being read is longer than MAX_LINE: the rest of it is skipped
        self._tail = bytearray()
        p = watch.progress
        self._regex = re.compile(p.regex.encode()) if p is not None and p.regex else None
        keys = [k for k in (watch.json_key, p.key if p is not None else "") if k]
        self._json_keys = [json.dumps(k).encode() for k in keys]  # a JSON line holding a key has it quoted

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.out.bytes += len(chunk)
        self._keep_tail(chunk)
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                self._add_partial(chunk[start:])
                return
            self._add_partial(chunk[start:nl])
            self._line(bytes(self._partial))
            self._partial.clear()
            self._cut = False
            start = nl + 1

    def close(self) -> None:
        """The end of stdout: a last line without a newline counts."""
        if self._partial:
            self._line(bytes(self._partial))
            self._partial.clear()

    def result(self) -> Watched:
        self.out.tail = bytes(self._tail[-self.watch.tail_bytes :]) if self.watch.tail_bytes else b""
        return self.out

    def _keep_tail(self, chunk: bytes) -> None:
        keep = self.watch.tail_bytes
        if not keep:
            return
        if len(chunk) >= keep:
            self._tail[:] = chunk[-keep:]
            return
        self._tail += chunk
        if len(self._tail) > 2 * keep:  # trimmed now and then: amortised, at most twice the tail held
            del self._tail[:-keep]

    def _add_partial(self, piece: bytes) -> None:
        room = MAX_LINE - len(self._partial)
        if room <= 0 or self._cut:
            self._cut = self._cut or bool(piece)
            return
        self._partial += piece[:room]
        self._cut = len(piece) > room

    def _line(self, raw: bytes) -> None:
        self.out.lines += 1
        line = raw.strip()
        if not line:
            return
        text = line.decode("utf-8", "replace")
        self.out.last_line = text
        doc: Any = None
        if line.startswith(b"{") and any(k in line for k in self._json_keys):
            try:
                doc = json.loads(text)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and self.watch.json_key and self.watch.json_key in doc:
                self.out.json_line = text
        p = self.watch.progress
        if p is None:
            return
        if self._regex is not None:
            m = self._regex.search(line)
            if m is not None:
                groups = m.groupdict()
                self._report(groups.get("step"), groups.get("value"))
        elif isinstance(doc, dict) and p.key in doc and (not p.step or p.step in doc):  # e.g. not a final summary
            self._report(doc.get(p.step) if p.step else None, doc[p.key])

    def _report(self, step_raw: Any, value_raw: Any) -> None:
        value = _number(value_raw)
        if value is None:
            self.out.ignored += 1
            return
        step = _number(step_raw) if step_raw is not None else self._next_step()
        if step is None:
            self.out.ignored += 1
            return
        if self.out.reports and step <= self.out.reports[-1][0]:
            self.out.backwards += 1
            return
        if len(self.out.reports) < MAX_REPORTS:
            self.out.reports.append((step, value))
        if self.on_report is not None:
            self.on_report(step, value)

    def _next_step(self) -> float:
        return self.out.reports[-1][0] + 1 if self.out.reports else 1.0


def _number(raw: Any) -> float | None:
    """A finite number from a JSON value or a regex group's bytes; None otherwise (NaN, text, a boolean)."""
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        value = float(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError, OverflowError, UnicodeDecodeError):
        return None
    return value if math.isfinite(value) else None


class StdoutMonitor:
    """A program's stdout read by a thread as it runs (a LineReader), and a stop on request: SIGTERM to the
    program's process group, SIGKILL after `grace_s`. pipeline.sandbox gives it the pipe and the process."""

    def __init__(self, watch: Watch, on_report: Callable[[float, float], None] | None = None, grace_s: float = GRACE_S):
        self.reader = LineReader(watch, on_report)
        self.grace_s = grace_s
        self.stopped = False  # stop() was called while the program ran, or before it started
        self._started = False
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._read_fd = -1
        self._kill_timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def start(self, read_fd: int, pid: int, copy_to: BinaryIO | None = None) -> None:
        """Read `read_fd` (the program's stdout; closed when done) in a thread; `copy_to` gets every byte too. A
        stop asked for before (`stopped` was set then, and the program should not have been started) is done now."""
        with self._lock:
            self._pid, self._read_fd, self._started = pid, read_fd, True
            if self.stopped:
                self.stopped = False
                self._stop_locked()
        self._thread = threading.Thread(target=self._pump, args=(copy_to,), name="stdout-reader", daemon=True)
        self._thread.start()

    def _pump(self, copy_to: BinaryIO | None) -> None:
        poll = select.poll()
        poll.register(self._read_fd, select.POLLIN | select.POLLHUP)
        while not self._closing.is_set():
            if not poll.poll(200):  # checks now and then whether finish() gave up on the pipe
                continue
            chunk = os.read(self._read_fd, READ_BYTES)
            if not chunk:
                break
            if copy_to is not None:
                copy_to.write(chunk)
            self.reader.feed(chunk)
        self.reader.close()

    def stop(self) -> None:
        """Stop the program: SIGTERM to its process group now, SIGKILL after the grace period. Before the program
        started: `stopped` is set, and pipeline.sandbox does not start it."""
        with self._lock:
            if not self._started:
                self.stopped = True
                return
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self.stopped or self._pid is None:
            return
        self.stopped = True
        _signal_group(self._pid, signal.SIGTERM)
        self._kill_timer = threading.Timer(self.grace_s, _signal_group, (self._pid, signal.SIGKILL))
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def finish(self, timeout: float = 5.0) -> Watched:
        """After the program ended: the rest of its stdout read (for at most `timeout` s when something it
        started still holds the pipe), the pipe closed; what was read."""
        with self._lock:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            self._pid, self._started = None, True  # a stop from now on has nothing to stop
        if self._thread is not None:
            self._thread.join(timeout)
            self._closing.set()  # something the program started still holds the pipe: stop reading
            self._thread.join()
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1
        return self.reader.result()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
