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
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pipeline.spec import Trial, grid_id, parse_last_float

if TYPE_CHECKING:
    from pipeline import tasks

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
    status: str  # "ok" or "failed"
    value: float | None = None
    seconds: float | None = None
    node: str = ""
    error: str = ""
    attempts: int = 1  # runs Ray made of its last try (more than 1 when a node was lost)
    id: str = ""
    retries: int = 0  # times the program was run again after it failed

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


def read_previous(out_dir: str | os.PathLike, param_names: Sequence[str], value_name: str) -> Previous | None:
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
        trials = _read_csv(csv_path, param_names, value_name)
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
    )


def _read_csv(path: Path, param_names: Sequence[str], value_name: str) -> list[TrialResult]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = _csv_header(param_names, value_name)
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


def _csv_header(param_names: Sequence[str], value_name: str) -> list[str]:
    return ["trial", *param_names, value_name, "status", "seconds", "node", "attempts", "retries", "error"]


class ResultStore:
    """results.csv and results.json in one directory, rewritten atomically after every trial."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        param_names: Sequence[str],
        value_name: str,
        settings: dict[str, Any],
        order: Sequence[str] = (),
    ):
        self.dir = Path(out_dir)
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
        """Take the successful trials of an earlier run with the same settings; return how many."""
        if previous is None:
            return 0
        self.check(previous)
        n = 0
        for r in previous.trials:
            if r.status == "ok":
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
        return self.adopt(read_previous(self.dir, self.param_names, self.value_name))

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
        w.writerow(_csv_header(self.param_names, self.value_name))
        for r in rows:
            w.writerow(
                [r.id]
                + [r.params.get(p, "") for p in self.param_names]
                + [
                    "" if r.value is None else r.value,
                    r.status,
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

    def keep(self, trial_id: str, stdout: bytes | None, outputs: Mapping[str, bytes], stderr: str = "") -> Path:
        d = self.dir / trial_id
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(e.errno or errno.EIO, f"cannot write {d} ({e.strerror or e})") from None
        if stdout is not None:
            atomic_write(d / "stdout.txt", stdout[-STDOUT_TAIL_BYTES:])
        if stderr:
            atomic_write(d / "stderr.txt", stderr + "\n")
        for rel, data in outputs.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(d / rel, data)
        # what an earlier attempt of this trial left and this one did not write: the files this class writes
        stale = ([] if stdout is not None else ["stdout.txt"]) + ([] if stderr else ["stderr.txt"])
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
    ):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.slots = slots
        self.heartbeat_s = heartbeat_s
        self.note = note  # e.g. an autoscaling cluster's launches and failed launches, shown after the counts
        self.start = time.monotonic()
        self._reused: int | None = None
        self._last_counts: tuple | None = None
        self._last_print = 0.0

    def update(self, done: int, failed: int, pending: int) -> None:
        now = time.monotonic()
        finished = done + failed
        if self._reused is None:  # trials finished before this run started do not count for the ETA
            self._reused = finished
        slots = self.slots() if callable(self.slots) else self.slots  # a callable follows a cluster that grows
        running = pending if slots is None else min(pending, slots)
        note = self.note() if self.note is not None else None
        counts = (done, failed, running, note)
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


def run_trials(
    trials: Sequence[Trial],
    submit: Callable[[Trial], tasks.Execute],
    store: ResultStore,
    progress: Progress | None = None,
    read: ReadMetric = read_last_float,
    retries: int = 0,
    files: TrialFiles | None = None,
    poll_s: float = 1.0,
) -> list[TrialResult]:
    """Run every trial not already in the store; record each result as it ends.

    Returns the results of all trials (reused and new). KeyboardInterrupt cancels what is still
    running and re-raises, after everything finished so far was written; so does OutputError (the
    output directory cannot be written), after removing its temporary files.
    """
    import ray

    todo = [t for t in trials if t.id not in store.results]
    running: dict[ray.ObjectRef, _Running] = {}
    for trial in todo:
        t = submit(trial)
        running[t.info_ref] = _Running(trial, t, retries)
    done = len(trials) - len(todo)
    failed = 0
    if progress:
        progress.update(done, failed, len(running))
    try:
        while running:
            ready, rest = ray.wait(list(running), num_returns=1, timeout=poll_s)
            if ready and rest:  # take every result already there: one write of the files for all of them
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            finished: list[TrialResult] = []
            for ref in ready:
                r = running.pop(ref)
                result = _collect(r, read, files)
                if result.status == "retry":
                    log.warning("trial %s failed, running it again: %s", r.trial.id, result.error.splitlines()[0])
                    task = submit(r.trial)
                    running[task.info_ref] = _Running(r.trial, task, retries, r.retries + 1)
                    continue
                store.results[result.key] = result
                finished.append(result)
                if result.status == "ok":
                    done += 1
                else:
                    failed += 1
                    log.warning("trial %s failed: %s", r.trial.id, result.error.splitlines()[0])
            if finished:
                store.write()
            if progress:
                progress.update(done, failed, len(running))
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
    keys = {t.id for t in trials}
    return [r for r in store.sorted_results() if r.key in keys]


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
        text = str(e).strip()  # e.g. RuntimeEnvSetupError: its first line, then pip's own words further down
        error = f"{type(e).__name__}: {text if len(text) <= 2000 else text[:400] + ' ... ' + text[-1500:]}"
        return TrialResult(trial.params, "failed", error=error, id=trial.id, retries=r.retries)
    out = r.task.outputs
    stdout = out["stdout"].fetch().get_bytes() if "stdout" in out else None
    declared = {name: d.fetch().get_bytes() for name, d in out.items() if name != "stdout"}
    if files is not None:
        files.keep(trial.id, stdout, declared, stderr=info.stderr_tail)
    result = TrialResult(
        trial.params,
        "ok",
        seconds=round(info.seconds, 3),
        node=info.node_ip,
        attempts=info.attempt + 1,
        id=trial.id,
        retries=r.retries,
    )
    try:
        result.value = read((stdout or b"").decode("utf-8", "replace"), declared)
    except ValueError as e:
        result.status, result.error = "failed", f"bad output: {e}"
    return result
