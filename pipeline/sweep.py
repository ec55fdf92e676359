"""A grid of Execute trials on Ray: progress, incremental results, resume, failure isolation.

Each trial is one Execute task. Results are collected as they finish (ray.wait) and written at once
(results.csv and results.json, atomically), so nothing finished is lost whatever happens after. A
failed trial is recorded with its error and never stops the others. Running again with the same
output directory reuses the finished trials and runs only the missing or failed ones.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ray

from pipeline import tasks

log = logging.getLogger(__name__)


@dataclass
class TrialResult:
    params: dict[str, Any]
    status: str  # "ok" or "failed"
    value: float | None = None
    seconds: float | None = None
    node: str = ""
    error: str = ""
    attempts: int = 1  # runs Ray made of it (more than 1 when a node was lost)

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.params.items()))


class SettingsMismatch(ValueError):
    pass


class ResultStore:
    """results.csv and results.json in one directory, rewritten atomically after every trial."""

    def __init__(
        self, out_dir: str | os.PathLike, param_names: Sequence[str], value_name: str, settings: dict[str, Any]
    ):
        self.dir = Path(out_dir)
        self.param_names = list(param_names)
        self.value_name = value_name
        self.settings = dict(settings)
        self.meta: dict[str, Any] = {}
        self.results: dict[tuple, TrialResult] = {}

    @property
    def json_path(self) -> Path:
        return self.dir / "results.json"

    @property
    def csv_path(self) -> Path:
        return self.dir / "results.csv"

    def load_previous(self) -> int:
        """Take the successful trials of an earlier run with the same settings; return how many."""
        try:
            old = json.loads(self.json_path.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            raise SettingsMismatch(f"{self.json_path} is unreadable ({e}); use --fresh or another --out") from None
        old_settings = old.get("settings", {})
        diff = {k: (old_settings.get(k), v) for k, v in self.settings.items() if old_settings.get(k) != v}
        if diff:
            what = ", ".join(f"{k} {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
            raise SettingsMismatch(
                f"{self.dir} holds results of a different sweep ({what}); use --fresh to replace them or another --out"
            )
        n = 0
        for t in old.get("trials", []):
            r = TrialResult(
                params=t["params"],
                status=t["status"],
                value=t.get("value"),
                seconds=t.get("seconds"),
                node=t.get("node", ""),
                error=t.get("error", ""),
                attempts=t.get("attempts", 1),
            )
            if r.status == "ok":
                self.results[r.key] = r
                n += 1
        return n

    def record(self, result: TrialResult) -> None:
        self.results[result.key] = result
        self.write()

    def sorted_results(self) -> list[TrialResult]:
        return sorted(self.results.values(), key=lambda r: [r.params[p] for p in self.param_names])

    def write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = self.sorted_results()
        doc = {"settings": self.settings, **self.meta, "trials": [asdict(r) for r in rows]}
        _atomic_write(self.json_path, json.dumps(doc, indent=2) + "\n")
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([*self.param_names, self.value_name, "status", "seconds", "node", "attempts", "error"])
        for r in rows:
            w.writerow(
                [r.params[p] for p in self.param_names]
                + [
                    "" if r.value is None else r.value,
                    r.status,
                    "" if r.seconds is None else f"{r.seconds:.2f}",
                    r.node,
                    r.attempts,
                    r.error,
                ]
            )
        _atomic_write(self.csv_path, buf.getvalue())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Progress:
    """done / failed / running, elapsed and ETA: one line redrawn on a terminal; elsewhere (logs, CI)
    a line whenever a count changes, and at least every `heartbeat_s` while nothing does."""

    def __init__(self, total: int, stream: TextIO | None = None, slots: int | None = None, heartbeat_s: float = 30.0):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.slots = slots
        self.heartbeat_s = heartbeat_s
        self.start = time.monotonic()
        self._reused: int | None = None
        self._last_counts: tuple | None = None
        self._last_print = 0.0

    def update(self, done: int, failed: int, pending: int) -> None:
        now = time.monotonic()
        finished = done + failed
        if self._reused is None:  # trials finished before this run started do not count for the ETA
            self._reused = finished
        running = pending if self.slots is None else min(pending, self.slots)
        counts = (done, failed, running)
        if not self.tty and counts == self._last_counts and now - self._last_print < self.heartbeat_s:
            return
        self._last_counts, self._last_print = counts, now
        elapsed = now - self.start
        new = finished - self._reused
        eta = _fmt_s(elapsed / new * (self.total - finished)) if new else "?"
        line = (
            f"[{finished}/{self.total}] done {done}, failed {failed}, running {running}, "
            f"queued {pending - running} | elapsed {_fmt_s(elapsed)} | ETA {eta}"
        )
        self.stream.write("\r\033[K" + line if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last_counts is not None:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_s(s: float) -> str:
    s = round(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def parse_last_float(text: str) -> float:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    if not lines:
        raise ValueError("the program printed nothing on stdout")
    try:
        value = float(lines[-1])
    except ValueError:
        raise ValueError(f"the last stdout line is not a number: {lines[-1][:80]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"the last stdout line is not a finite number: {lines[-1]!r}")
    return value


@dataclass
class _Running:
    params: dict[str, Any]
    task: tasks.Execute
    submitted: float = field(default_factory=time.monotonic)


def run_grid(
    grid: Sequence[dict[str, Any]],
    submit: Callable[[dict[str, Any]], tasks.Execute],
    store: ResultStore,
    progress: Progress | None = None,
    parse: Callable[[str], float] = parse_last_float,
    poll_s: float = 1.0,
) -> list[TrialResult]:
    """Run every grid point not already in the store; record each result as it ends.

    Returns the results of all grid points (reused and new). KeyboardInterrupt cancels what is
    still running and re-raises, after everything finished so far was written.
    """
    todo = [p for p in grid if tuple(sorted(p.items())) not in store.results]
    running: dict[ray.ObjectRef, _Running] = {}
    for params in todo:
        t = submit(params)
        running[t.info_ref] = _Running(params, t)
    reused = len(grid) - len(todo)
    done = reused
    failed = 0
    if progress:
        progress.update(done, failed, len(running))
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
            for ref in ready:
                r = running.pop(ref)
                result = _collect(r, parse)
                store.record(result)
                if result.status == "ok":
                    done += 1
                else:
                    failed += 1
                    log.warning("trial %s failed: %s", r.params, result.error.splitlines()[0])
            if progress:
                progress.update(done, failed, len(running))
    except BaseException:
        for r in running.values():
            try:
                ray.cancel(r.task.info_ref, force=True)
            except Exception:
                break
        raise
    finally:
        if progress:
            progress.close()
    keys = {tuple(sorted(p.items())) for p in grid}
    return [r for r in store.sorted_results() if r.key in keys]


def _collect(r: _Running, parse: Callable[[str], float]) -> TrialResult:
    try:
        info = r.task.wait()
        text = r.task.outputs["stdout"].fetch().get_str()
        value = parse(text)
    except tasks.ExecuteError as e:
        return TrialResult(r.params, "failed", error=str(e))
    except ValueError as e:
        return TrialResult(r.params, "failed", error=f"bad output: {e}")
    except ray.exceptions.RayError as e:  # e.g. the node died more often than Ray retries
        return TrialResult(r.params, "failed", error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
    return TrialResult(
        r.params, "ok", value=value, seconds=round(info.seconds, 3), node=info.node_ip, attempts=info.attempt + 1
    )
