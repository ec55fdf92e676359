"""Per-task overhead: N trivial tasks (`true`) through tasks.Execute vs a bare Ray task calling
subprocess.run, in one run. Rounds are paired (an Execute batch and a bare batch right after each other,
alternating which goes first) and the reported ratio is the median of the per-round ratios, so that the
drift of a busy 2-core machine hits both sides alike. Goal: ratio <= 1.10.
Both sides are submitted alike (500 `.remote()` calls with the remote function's default options, then one
`ray.get` of all); the bare task takes no argument and returns None, while an Execute task takes its spec
(one bytes argument) and returns its RunInfo (a list of six fields): costs of Execute, counted against it.
A third side, the bare task given a bytes argument of the spec's size (and ignoring it), is timed in the
same rounds and reported apart (`ratio_vs_bare_with_arg`), to show what Ray's handling of one argument
takes of the gap; the goal's ratio is against the bare task. A fourth side, Execute's own worker code with one
directory reused for every task instead of a fresh one (a diagnostic, not something Execute does), shows
what the fresh directory per task costs on the filesystem under test (`ratio_reused_dir_vs_bare`). A last pair
of sides runs Execute's worker code on the spec with and without the end of a program's leftovers
(pipeline.reaper: the lookup of the worker's children after each program), right after each other:
`ratio_reaper` is what that costs a task.

Execute removes finished task directories off the tasks' path, once they pause (sandbox.TaskDirs). So that
this work is not paid inside the next side's timing, every side is followed by a wait until no task
directory has been added or removed for a while; and `cpu_ratio_with_removal` compares the CPU seconds the
whole machine spent (from /proc/stat, not idle) from the start of each side until that quiet point, so the
removal Execute put off is counted there. `discards_per_task` is what /proc/diskstats says the disk was asked
to discard per Execute task, over the same span.

    python -m bench.task_overhead [--tasks 500] [--rounds 9] [--sandbox-dir /dev/shm]

--sandbox-dir sets PIPELINE_SANDBOX_DIR (where task directories are made) for this run's workers.
"""

import argparse
import dataclasses
import os
import pickle
import subprocess
import tempfile
import time
from pathlib import Path

import ray

from bench.common import median, report, start_local_ray, timed
from pipeline import reaper, tasks
from pipeline.sandbox import TASK_DIRS_PREFIX, task_dirs_root


@ray.remote
def bare_true():
    subprocess.run(["true"], check=True)


@ray.remote
def bare_true_with_arg(spec):
    subprocess.run(["true"], check=True)


#: as many bytes as Execute(["true"])'s pickled spec
SPEC_LIKE = pickle.dumps(("true", ("true",), False, (), (), None, (), (), False, None, None), protocol=5)


class _OneDir:
    """Task directories that are all the same one: what Execute would cost without a fresh directory."""

    def __init__(self) -> None:
        # named as TaskDirs names its parents, so it is removed like theirs when the worker is gone
        self.parent = Path(
            tempfile.mkdtemp(prefix=f"{TASK_DIRS_PREFIX}{os.getpid()}-one-", dir=os.environ.get("PIPELINE_SANDBOX_DIR"))
        )

    def make(self) -> Path:
        return self.parent

    def remove_later(self, path: Path) -> None:
        pass


_reused: list = []


@ray.remote
def execute_reused_dir(spec):
    """Execute's worker side (tasks._run_spec) with the worker's directories swapped for _OneDir."""
    own = tasks._worker_setup()
    if not _reused:
        _reused.append(dataclasses.replace(own, dirs=_OneDir()))
    tasks._worker = _reused[0]
    try:
        return tasks._run_spec(tasks._Spec(*pickle.loads(spec)), ())[0]
    finally:
        tasks._worker = own


def _execute_spec(spec, with_reaper: bool):
    """Execute's worker side (tasks._run_spec) on a spec, with or without pipeline.reaper's calls."""
    if with_reaper:
        return tasks._run_spec(tasks._Spec(*pickle.loads(spec)), ())[0]
    calls = reaper.started, reaper.ended
    reaper.started = reaper.ended = lambda *a: None  # type: ignore[assignment]
    try:
        return tasks._run_spec(tasks._Spec(*pickle.loads(spec)), ())[0]
    finally:
        reaper.started, reaper.ended = calls


@ray.remote
def execute_spec(spec):
    return _execute_spec(spec, True)


@ray.remote
def execute_spec_without_reaper(spec):
    return _execute_spec(spec, False)


def run_with_reaper(n):
    ray.get([execute_spec.remote(SPEC_LIKE) for _ in range(n)])


def run_without_reaper(n):
    ray.get([execute_spec_without_reaper.remote(SPEC_LIKE) for _ in range(n)])


def run_reused_dir(n):
    ray.get([execute_reused_dir.remote(SPEC_LIKE) for _ in range(n)])


def run_bare_with_arg(n):
    ray.get([bare_true_with_arg.remote(SPEC_LIKE) for _ in range(n)])


def run_execute(n):
    ray.get([tasks.Execute(["true"]).info_ref for _ in range(n)])


def run_bare(n):
    ray.get([bare_true.remote() for _ in range(n)])


def _busy_cpu_s() -> float:
    """CPU seconds this machine has spent not idle, all cores (from /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _discards() -> int:
    """Discard requests completed by the disks so far (/proc/diskstats field 15; 0 where not reported)."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 18 and not fields[2].startswith(("loop", "ram", "dm-")) and not fields[2][-1].isdigit():
                total += int(fields[14])
    return total


def _task_dir_entries(root: Path) -> int:
    n = 0
    for parent in root.glob(f"{TASK_DIRS_PREFIX}*"):
        try:
            n += sum(1 for _ in os.scandir(parent))
        except OSError:
            pass
    return n


def wait_task_dirs_quiet(root: Path, quiet_s: float = 1.0, timeout: float = 60.0) -> None:
    """Wait until the number of task directories under `root` has not changed for `quiet_s` (Execute's
    workers have finished removing what their tasks left), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last, since = _task_dir_entries(root), time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            raise SystemExit(f"task directories under {root} still changing after {timeout:.0f} s")
        time.sleep(0.1)
        now = _task_dir_entries(root)
        if now != last:
            last, since = now, time.monotonic()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--sandbox-dir", default=None)
    a = p.parse_args(argv)
    if a.sandbox_dir:
        os.environ["PIPELINE_SANDBOX_DIR"] = a.sandbox_dir  # inherited by the workers ray.init starts
    root = task_dirs_root(a.sandbox_dir or None)
    start_local_ray()
    run_execute(50), run_bare(50), run_bare_with_arg(50), run_reused_dir(50)  # warm the workers of all
    run_with_reaper(50), run_without_reaper(50)
    wait_task_dirs_quiet(root)
    ours, bare, bare_arg, reused, with_reaper, without_reaper = [], [], [], [], [], []
    cpu: dict[str, list[float]] = {"execute": [], "bare": []}
    discards: list[int] = []

    def side(name, run, times):
        c, d = _busy_cpu_s(), _discards()
        times.append(timed(lambda: run(a.tasks)))
        wait_task_dirs_quiet(root)
        if name in cpu:
            cpu[name].append(_busy_cpu_s() - c)
        if name == "execute":
            discards.append(_discards() - d)

    for i in range(a.rounds):
        pair = [lambda: side("execute", run_execute, ours), lambda: side("bare", run_bare, bare)]
        diagnostics = [
            lambda: side("bare_with_arg", run_bare_with_arg, bare_arg),
            lambda: side("reused", run_reused_dir, reused),
        ]
        reaper_pair = [
            lambda: side("with_reaper", run_with_reaper, with_reaper),
            lambda: side("without_reaper", run_without_reaper, without_reaper),
        ]
        # a round's Execute and bare batches run one right after the other, each first in every other round
        for step in [*(p if i % 2 == 0 else p[::-1] for p in (pair, diagnostics, reaper_pair))]:
            for one in step:
                one()
    o, b = median(ours), median(bare)
    ratios = sorted(x / y for x, y in zip(ours, bare))
    arg_ratios = sorted(x / y for x, y in zip(bare_arg, bare))
    return report(
        "task_overhead",
        tasks=a.tasks,
        sandbox_dir=a.sandbox_dir or "$TMPDIR",
        execute_s=o,
        bare_ray_s=b,
        ratio=median(ratios),
        ratio_range=f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
        bare_with_arg_s=median(bare_arg),
        ratio_bare_with_arg_vs_bare=median(arg_ratios),
        ratio_vs_bare_with_arg=median(sorted(x / y for x, y in zip(ours, bare_arg))),
        ratio_reused_dir_vs_bare=median(sorted(x / y for x, y in zip(reused, bare))),
        ratio_reaper=median(sorted(x / y for x, y in zip(with_reaper, without_reaper))),
        cpu_ratio_with_removal=median(sorted(x / y for x, y in zip(cpu["execute"], cpu["bare"]))),
        discards_per_task=median(discards) / a.tasks,
        execute_ms_per_task=1000 * o / a.tasks,
        bare_ms_per_task=1000 * b / a.tasks,
        goal="<= 1.10",
    )


if __name__ == "__main__":
    main()
