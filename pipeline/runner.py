"""The sweep runner: Execute trials on Ray with progress, incremental results, resume and failure isolation.

Each trial is one Execute task. Results are collected as they finish (ray.wait) and written at once
(results.csv and results.json, atomically), so nothing finished is lost whatever happens after. A
failed trial is recorded with its error and never stops the others; a program failure (non-zero exit,
timeout) is run again up to `retries` times, while a lost node is Ray's to retry (counted in `attempts`).
Running again with the same output directory reuses the finished trials and runs only the missing or
failed ones. Each trial's stdout tail, stderr tail (when it wrote any) and declared outputs are kept
under OUT/trials/<id>/.

Ray is imported lazily: a cluster run sets Ray's authentication mode before Ray is first imported. The
command that runs a sweep file is pipeline.sweep (pipeline.sweep_cli), which imports this module.
"""

from __future__ import annotations

import csv
import errno
import io
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pipeline.search import FINAL, FixedSearch, Search, StopRules
from pipeline.spec import Trial, grid_id, parse_last_float

if TYPE_CHECKING:
    from pipeline import tasks
    from pipeline.cost import CostMeter
    from pipeline.progress import ProgressHub

__all__ = [
    "OutputError",
    "Progress",
    "ResultStore",
    "SettingsMismatch",
    "TrialResult",
    "parse_last_float",
    "read_previous",
    "run_trials",
]

log = logging.getLogger(__name__)

STDOUT_TAIL_BYTES = 64 * 1024


@dataclass
class TrialResult:
    params: dict[str, Any]
    status: str  # "ok", "failed", "pruned" (stopped by the scheduler) or "cancelled" (by a stop rule)
    value: float | None = None
    seconds: float | None = None
    node: str = ""
    error: str = ""
    attempts: int = 1  # runs Ray made of its last try (more than 1 when a node was lost)
    id: str = ""
    retries: int = 0  # times the program was run again after it failed
    step: float | None = None  # the last progress step reported (a sweep with `progress`)
    progress: list[tuple[float, float]] = field(default_factory=list)  # (step, value) as reported
    ignored: int = 0  # progress values ignored: not finite numbers, or a step not after the last
    instance_type: str = ""  # of the node it ran on ("local": a Ray without prices); see pipeline.cost
    node_seconds: float | None = None  # its share of that node, for as long as it ran
    cost: float | None = None  # estimated, in the prices' currency; None: no price

    @property
    def key(self) -> str:
        return self.id or grid_id(self.params)


class SettingsMismatch(ValueError):
    pass


class OutputError(OSError):
    """The output directory cannot be written (e.g. the disk is full): the sweep stops."""


@dataclass
class Previous:
    """Results of an earlier run found in the output directory (read before Ray starts)."""

    settings: dict[str, Any] | None  # None when read from results.csv (results.json was damaged)
    trials: list[TrialResult]
    note: str = ""


def read_previous(
    out_dir: str | os.PathLike, param_names: Sequence[str], value_name: str, steps: bool = False
) -> Previous | None:
    """The earlier run's results in `out_dir`, None if there are none. A damaged results.json falls
    back to results.csv when that is intact; raise SettingsMismatch when neither can be read."""
    d = Path(out_dir)
    json_path, csv_path = d / "results.json", d / "results.csv"
    try:
        doc = json.loads(json_path.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("trials", []), list):
            raise ValueError("not a results document")
        trials = [_from_json(t) for t in doc.get("trials", [])]
        return Previous(doc.get("settings", {}), trials)
    except FileNotFoundError:
        if not csv_path.exists():
            return None
        why = "it is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"it is unreadable: {str(e).splitlines()[0][:100]}"
    try:
        trials = _read_csv(csv_path, param_names, value_name, steps)
    except (OSError, ValueError, KeyError) as e:
        raise SettingsMismatch(
            f"{json_path}: {why}, and {csv_path.name} cannot stand in ({e}); use --fresh or another --out"
        ) from None
    return Previous(
        None, trials, note=f"{json_path.name} {why}; reusing the finished trials of {csv_path} (settings unchecked)"
    )


def _from_json(t: Mapping[str, Any]) -> TrialResult:
    return TrialResult(
        params=dict(t["params"]),
        status=t["status"],
        value=t.get("value"),
        seconds=t.get("seconds"),
        node=t.get("node", ""),
        error=t.get("error", ""),
        attempts=t.get("attempts", 1),
        id=t.get("id") or grid_id(t["params"]),
        retries=t.get("retries", 0),
        step=t.get("step"),
        progress=[(float(s), float(v)) for s, v in t.get("progress", [])],
        ignored=t.get("ignored", 0),
        instance_type=t.get("instance_type", ""),
        node_seconds=t.get("node_seconds"),
        cost=t.get("cost"),
    )


def _read_csv(path: Path, param_names: Sequence[str], value_name: str, steps: bool = False) -> list[TrialResult]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = _csv_header(param_names, value_name, steps)
    if not rows or rows[0] != header:
        raise ValueError(f"its header is not {','.join(header)}")
    out = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise ValueError(f"line {n} is cut short")
        rec = dict(zip(header, row))
        params = {p: _csv_value(rec[p]) for p in param_names}
        out.append(
            TrialResult(
                params=params,
                status=rec["status"],
                value=float(rec[value_name]) if rec[value_name] else None,
                seconds=float(rec["seconds"]) if rec["seconds"] else None,
                node=rec["node"],
                error=rec["error"],
                attempts=int(rec["attempts"]),
                id=rec["trial"],
                retries=int(rec["retries"]),
                step=float(rec["step"]) if rec.get("step") else None,
            )
        )
    return out


def _csv_value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def _csv_header(param_names: Sequence[str], value_name: str, steps: bool = False) -> list[str]:
    step = ["step"] if steps else []
    return ["trial", *param_names, value_name, "status", *step, "seconds", "node", "attempts", "retries", "error"]


class ResultStore:
    """results.csv and results.json in one directory, rewritten atomically after every trial."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        param_names: Sequence[str],
        value_name: str,
        settings: dict[str, Any],
        order: Sequence[str] = (),
        steps: bool = False,
    ):
        """`steps`: results.csv has a `step` column (the last progress step of each trial)."""
        self.dir = Path(out_dir)
        self.steps = steps
        self.param_names = list(param_names)
        self.value_name = value_name
        self.settings = dict(settings)
        self.meta: dict[str, Any] = {}
        self.results: dict[str, TrialResult] = {}
        self.order = {tid: i for i, tid in enumerate(order)}

    @property
    def json_path(self) -> Path:
        return self.dir / "results.json"

    @property
    def csv_path(self) -> Path:
        return self.dir / "results.csv"

    def adopt(self, previous: Previous | None) -> int:
        """Take the trials of an earlier run with the same settings that ended for good (ok, or pruned by the
        scheduler: a decision, not a failure); return how many."""
        if previous is None:
            return 0
        self.check(previous)
        n = 0
        for r in previous.trials:
            if r.status in FINAL:
                self.results[r.key] = r
                n += 1
        return n

    def check(self, previous: Previous) -> None:
        """Raise SettingsMismatch when `previous` was run with other settings (a field there and not here, or
        here and not there, is a difference too)."""
        if previous.settings is None:
            return
        old, new = previous.settings, self.settings
        diff = {
            k: (old.get(k), new.get(k)) for k in [*new, *(k for k in old if k not in new)] if old.get(k) != new.get(k)
        }
        if diff:
            what = ", ".join(f"{k} {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
            raise SettingsMismatch(
                f"{self.dir} holds results of a different sweep ({what}); use --fresh to replace them or another --out"
            )

    def load_previous(self) -> int:
        """read_previous + adopt, for callers that read and check in one step."""
        return self.adopt(read_previous(self.dir, self.param_names, self.value_name, self.steps))

    def record(self, result: TrialResult) -> None:
        self.results[result.key] = result
        self.write()

    def sorted_results(self) -> list[TrialResult]:
        last = len(self.order)
        return sorted(self.results.values(), key=lambda r: (self.order.get(r.key, last), r.key))

    def write(self) -> None:
        """Write both files; raise OutputError (temporary files removed) when the directory cannot take them."""
        rows = self.sorted_results()
        head = {"settings": self.settings, **self.meta}
        # one trial per line: readable, and json's C encoder (indent= would take its slow Python path)
        doc = "{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items())
        trials = ",\n".join("    " + json.dumps({**r.__dict__, "params": dict(r.params)}) for r in rows)
        doc += f'  "trials": [\n{trials}\n  ]\n}}\n' if rows else '  "trials": []\n}\n'
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(_csv_header(self.param_names, self.value_name, self.steps))
        for r in rows:
            step = ["" if r.step is None else f"{r.step:g}"] if self.steps else []
            w.writerow(
                [r.id]
                + [r.params.get(p, "") for p in self.param_names]
                + [
                    "" if r.value is None else r.value,
                    r.status,
                    *step,
                    "" if r.seconds is None else f"{r.seconds:.2f}",
                    r.node,
                    r.attempts,
                    r.retries,
                    r.error,
                ]
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.json_path, doc)
        atomic_write(self.csv_path, buf.getvalue())


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace `path` whole or not at all; on failure no temporary file is left and OutputError says why."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OutputError(e.errno or errno.EIO, f"cannot write {path} ({e.strerror or e})") from None


class TrialFiles:
    """OUT/trials/<id>/: the stdout tail, the stderr tail (when the program wrote any), and the declared outputs,
    of the trial's last attempt."""

    def __init__(self, out_dir: str | os.PathLike, outputs: Sequence[str] = ()):
        self.dir = Path(out_dir) / "trials"
        self.outputs = list(outputs)

    def keep(
        self,
        trial_id: str,
        stdout: bytes | None,
        outputs: Mapping[str, bytes],
        stderr: str = "",
        progress: Sequence[tuple[float, float]] | None = None,
    ) -> Path:
        """Write the files of a trial's last attempt; `progress`: its reports, as progress.csv (step,value)."""
        d = self.dir / trial_id
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(e.errno or errno.EIO, f"cannot write {d} ({e.strerror or e})") from None
        if stdout is not None:
            atomic_write(d / "stdout.txt", stdout[-STDOUT_TAIL_BYTES:])
        if stderr:
            atomic_write(d / "stderr.txt", stderr + "\n")
        if progress:
            atomic_write(d / "progress.csv", "step,value\n" + "".join(f"{s:g},{v!r}\n" for s, v in progress))
        for rel, data in outputs.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(d / rel, data)
        # what an earlier attempt of this trial left and this one did not write: the files this class writes
        stale = ([] if stdout is not None else ["stdout.txt"]) + ([] if stderr else ["stderr.txt"])
        stale += [] if progress else ["progress.csv"]
        for rel in stale + [o for o in self.outputs if o not in outputs]:
            try:
                (d / rel).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise OutputError(e.errno or errno.EIO, f"cannot remove {d / rel} ({e.strerror or e})") from None
        return d


class Progress:
    """done / failed / running, elapsed and ETA: one line redrawn on a terminal; elsewhere (logs, CI)
    a line whenever a count changes, and at least every `heartbeat_s` while nothing does."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        slots: int | Callable[[], int | None] | None = None,
        heartbeat_s: float = 30.0,
        note: Callable[[], str | None] | None = None,
        show_pruned: bool = False,
    ):
        """`show_pruned`: the line counts pruned trials (a sweep with a scheduler) even while there are none."""
        self.total = total
        self.show_pruned = show_pruned
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.slots = slots
        self.heartbeat_s = heartbeat_s
        self.note = note  # e.g. an autoscaling cluster's launches and failed launches, shown after the counts
        self.start = time.monotonic()
        self._reused: int | None = None
        self._last_counts: tuple | None = None
        self._last_print = 0.0

    def update(self, done: int, failed: int, pending: int, pruned: int = 0, cancelled: int = 0) -> None:
        now = time.monotonic()
        finished = done + failed + pruned + cancelled
        if self._reused is None:  # trials finished before this run started do not count for the ETA
            self._reused = finished
        slots = self.slots() if callable(self.slots) else self.slots  # a callable follows a cluster that grows
        running = pending if slots is None else min(pending, slots)
        note = self.note() if self.note is not None else None
        counts = (done, failed, running, note, pruned, cancelled)
        if not self.tty and counts == self._last_counts and now - self._last_print < self.heartbeat_s:
            return
        self._last_counts, self._last_print = counts, now
        elapsed = now - self.start
        new = finished - self._reused
        eta = _fmt_s(elapsed / new * (self.total - finished)) if new else "?"
        stopped = f"pruned {pruned}, " if pruned or self.show_pruned else ""
        stopped += f"cancelled {cancelled}, " if cancelled else ""
        line = (
            f"[{finished}/{self.total}] done {done}, {stopped}failed {failed}, running {running}, "
            f"queued {pending - running} | elapsed {_fmt_s(elapsed)} | ETA {eta}"
        )
        if note:
            line += f" | {note}"
        self.stream.write("\r\033[K" + line if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last_counts is not None:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_s(s: float) -> str:
    s = round(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


#: reads a finished trial's metric from its stdout and declared outputs; ValueError when it cannot
ReadMetric = Callable[[str, Mapping[str, bytes]], float]


def read_last_float(stdout: str, outputs: Mapping[str, bytes]) -> float:
    return parse_last_float(stdout)


@dataclass
class _Running:
    trial: Trial
    task: tasks.Execute
    max_retries: int = 0
    retries: int = 0
    submitted: float = field(default_factory=time.monotonic)
    key: str = ""  # its name at the progress hub: the trial's id and a submission number
    reports: list[tuple[float, float]] = field(default_factory=list)  # as they arrived, of the current attempt
    attempt: int = 0
    stop_reason: str = ""  # "pruned" or "cancelled" once the sweep asked the program to stop


@dataclass
class _Counts:
    done: int = 0
    failed: int = 0
    pruned: int = 0
    cancelled: int = 0

    def add(self, status: str) -> None:
        name = {"ok": "done"}.get(status, status)
        setattr(self, name, getattr(self, name) + 1)


def run_trials(
    trials: Sequence[Trial],
    submit: Callable[..., tasks.Execute],
    store: ResultStore,
    progress: Progress | None = None,
    read: ReadMetric = read_last_float,
    retries: int = 0,
    files: TrialFiles | None = None,
    poll_s: float = 1.0,
    *,
    search: Search | None = None,
    rules: StopRules = StopRules(),
    hub: ProgressHub | None = None,
    goal: str = "max",
    meter: CostMeter | None = None,
) -> list[TrialResult]:
    """Run every trial not already in the store; record each result as it ends.

    `search` decides which trial starts next and whether a running one is pruned (default: `trials` in order,
    none pruned); `rules` stop the sweep early (a target reached cancels the running trials) and bound how
    many run at once. With a `hub` (pipeline.progress), `submit(trial, report_to)` gets where the trial's
    progress reports go, which reach the search as they come. A `meter` (pipeline.cost) prices each result, and
    with a budget starts no trial once the estimate would pass it (the running ones finish: stopped_by "cost").

    Returns the results of all trials (reused and new). KeyboardInterrupt cancels what is still
    running and re-raises, after everything finished so far was written; so does OutputError (the
    output directory cannot be written), after removing its temporary files.
    """
    import ray

    source: Search = search if search is not None else FixedSearch(t for t in trials if t.id not in store.results)
    running: dict[ray.ObjectRef, _Running] = {}
    by_key: dict[str, _Running] = {}
    counts = _Counts()
    for old in store.results.values():
        counts.add(old.status if old.status in ("ok", "pruned") else "failed")
    started = len(store.results)
    spent_s = sum(r.seconds or 0.0 for r in store.results.values())
    stopping = "target" if any(rules.reached(r.value, goal) for r in store.results.values() if r.status == "ok") else ""
    numbers = itertools.count()
    warned: set[str] = set()

    def start(trial: Trial, retries_done: int = 0) -> None:
        key = f"{trial.id}#{next(numbers)}"
        task = submit(trial, hub.address(key)) if hub is not None else submit(trial)
        r = _Running(trial, task, retries, retries_done, key=key)
        running[task.info_ref] = r
        by_key[key] = r

    def fill() -> None:
        nonlocal started, stopping
        while not stopping and (rules.concurrency is None or len(running) < rules.concurrency):
            if rules.max_trials is not None and started >= rules.max_trials:
                return
            decision = meter.decide(store.results.values(), elapsed()) if meter is not None else "start"
            if decision == "wait":
                return
            if decision == "stop":
                stopping = "cost"
                log.info("the budget would be passed with the next trial: no new trial starts")
                return
            trial = source.next()
            if trial is None:
                return
            started += 1
            start(trial)

    def stop_all(reason: str) -> None:
        for r in running.values():
            if r.stop_reason:
                continue
            r.stop_reason = reason
            if hub is not None:
                hub.stop(r.key)  # SIGTERM to its process group on the node, SIGKILL after the grace period
            else:
                ray.cancel(r.task.info_ref, force=True)

    def elapsed() -> list[float]:
        now = time.monotonic()
        return [now - r.submitted for r in running.values()]

    if meter is not None and progress is not None:
        cost_note, other = (lambda: meter.so_far(store.results.values())), progress.note
        progress.note = lambda: " | ".join(t for t in ((other() if other else None), cost_note()) if t) or None

    def update() -> None:
        if progress:
            progress.update(counts.done, counts.failed, len(running), counts.pruned, counts.cancelled)

    fill()
    update()
    try:
        while running:
            ready, rest = ray.wait(list(running), num_returns=1, timeout=poll_s)
            if ready and rest:  # take every result already there: one write of the files for all of them
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            if hub is not None:
                _take_reports(hub, by_key, source)
            finished: list[TrialResult] = []
            for ref in ready:
                r = running.pop(ref)
                by_key.pop(r.key, None)
                result = _collect(r, read, files)
                if result.status == "retry":
                    log.warning("trial %s failed, running it again: %s", r.trial.id, result.error.splitlines()[0])
                    start(r.trial, r.retries + 1)
                    continue
                if meter is not None:
                    meter.price(result)
                store.results[result.key] = result
                finished.append(result)
                source.tell(result.id, result.status, result.value)
                counts.add(result.status)
                spent_s += result.seconds or 0.0
                if result.status == "failed":
                    log.warning("trial %s failed: %s", r.trial.id, result.error.splitlines()[0])
                _warn_once(result, hub is not None, warned)
                if not stopping and result.status == "ok" and rules.reached(result.value, goal):
                    stopping = "target"
                    log.warning(
                        "trial %s reached the target %g: cancelling the running trials", result.id, rules.target
                    )
                    stop_all("cancelled")
            if not stopping and rules.budget_node_hours is not None and spent_s >= rules.budget_node_hours * 3600:
                stopping = "budget"
                log.warning(
                    "the budget of %g node-hours is spent: cancelling the running trials", rules.budget_node_hours
                )
                stop_all("cancelled")
            if finished:
                if meter is not None:
                    store.meta["cost"] = meter.summary(store.results.values())
                store.write()
            fill()
            update()
    except BaseException as e:
        for r in running.values() if ray.is_initialized() else ():  # not connected: a cancel would start a Ray
            try:
                ray.cancel(r.task.info_ref, force=True)
            except Exception:
                break
        if not isinstance(e, OutputError):  # results collected before the interruption are kept
            try:
                store.write()
            except OutputError:
                pass
        raise
    finally:
        if progress:
            progress.close()
        source.close()
    store.meta["stopped_by"] = stopping or None
    if meter is not None:
        store.meta["cost"] = meter.summary(store.results.values())
    if not trials:  # proposed one by one (tpe): all the sweep's trials
        return store.sorted_results()
    keys = {t.id for t in trials}
    return [r for r in store.sorted_results() if r.key in keys]


def _take_reports(hub: ProgressHub, by_key: Mapping[str, _Running], source: Search) -> None:
    """The progress reports that arrived: to their trials, and to the search, which may prune."""
    for key, attempt, items in hub.drain():
        r = by_key.get(key)
        if r is None or r.stop_reason:
            continue
        if attempt < r.attempt:  # a late report of a run Ray has replaced
            continue
        if attempt > r.attempt:  # Ray ran it again (a lost node or worker): its progress starts again
            r.attempt, r.reports = attempt, []
        for step, value in items:
            r.reports.append((step, value))
            if source.report(r.trial.id, step, value):
                r.stop_reason = "pruned"
                hub.stop(key)
                log.info("trial %s pruned at step %g (value %g)", r.trial.id, step, value)
                break


def _warn_once(result: TrialResult, has_progress: bool, warned: set[str]) -> None:
    """One warning per sweep for a trial that printed no progress, and one for ignored progress values."""
    if has_progress and result.status == "ok" and not result.progress and "silent" not in warned:
        warned.add("silent")
        log.warning(
            "trial %s printed no progress line: it ran to its end, unpruned (does the progress field match "
            "what the program prints?); said once per sweep",
            result.id,
        )
    if result.ignored and "ignored" not in warned:
        warned.add("ignored")
        log.warning(
            "trial %s: %d progress value(s) ignored (not a finite number, or a step not after the last); "
            "counted per trial in results.json; said once per sweep",
            result.id,
            result.ignored,
        )


def _collect(r: _Running, read: ReadMetric, files: TrialFiles | None) -> TrialResult:
    import ray

    from pipeline.tasks import ExecuteError

    trial = r.trial
    try:
        info = r.task.wait()
    except ExecuteError as e:
        if files is not None:
            files.keep(trial.id, None, {}, stderr=e.stderr_tail)
        status = "retry" if r.retries < r.max_retries else "failed"
        return TrialResult(trial.params, status, error=str(e), id=trial.id, retries=r.retries)
    except ray.exceptions.RayError as e:  # e.g. the node died more often than Ray retries
        if r.stop_reason:  # cancelled by the sweep (ray.cancel: a sweep without progress reports)
            return TrialResult(trial.params, r.stop_reason, id=trial.id, retries=r.retries)
        text = str(e).strip()  # e.g. RuntimeEnvSetupError: its first line, then pip's own words further down
        error = f"{type(e).__name__}: {text if len(text) <= 2000 else text[:400] + ' ... ' + text[-1500:]}"
        return TrialResult(trial.params, "failed", error=error, id=trial.id, retries=r.retries)
    out = r.task.outputs
    watched = info.watched
    if "stdout" in out:  # asked for whole (the Execute API's stdout=True)
        stdout: bytes | None = out["stdout"].fetch().get_bytes()
        text = (stdout or b"").decode("utf-8", "replace")
    elif watched is not None:  # read on the node: its last lines and tail only
        stdout, text = watched.tail, watched.metric_text()
    else:
        stdout, text = None, ""
    reports = list(watched.reports) if watched is not None else []
    declared = {} if info.stopped else {name: d.fetch().get_bytes() for name, d in out.items() if name != "stdout"}
    if files is not None:
        files.keep(trial.id, stdout, declared, stderr=info.stderr_tail, progress=reports)
    result = TrialResult(
        trial.params,
        "ok",
        seconds=round(info.seconds, 3),
        node=info.node_ip,
        attempts=info.attempt + 1,
        id=trial.id,
        retries=r.retries,
        step=reports[-1][0] if reports else None,
        progress=reports,
        ignored=(watched.ignored + watched.backwards) if watched is not None else 0,
    )
    if info.stopped:  # pruned or cancelled: its last reported value stands
        result.status = r.stop_reason or "pruned"
        result.value = reports[-1][1] if reports else None
        return result
    try:
        result.value = read(text, declared)
    except ValueError as e:
        result.status, result.error = "failed", f"bad output: {e}"
    return result
