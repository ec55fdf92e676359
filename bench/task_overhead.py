"""Per-task overhead: N trivial tasks (`true`) through tasks.Execute vs a bare Ray task calling
subprocess.run, in one run. Rounds are paired (an Execute batch, then a bare batch, alternating which
goes first) and the reported ratio is the median of the per-round ratios, so that the drift of a busy
2-core machine hits both sides alike. Goal: ratio <= 1.10.
Both sides are submitted alike (500 `.remote()` calls with the remote function's default options, then one
`ray.get` of all); the bare task takes no argument and returns None, while an Execute task takes its spec
(one bytes argument) and returns its RunInfo (a list of six fields): costs of Execute, counted against it.
A third side, the bare task given a bytes argument of the spec's size (and ignoring it), is timed in the
same rounds and reported apart (`ratio_vs_bare_with_arg`), to show what Ray's handling of one argument
takes of the gap; the goal's ratio is against the bare task. A fourth side, Execute's own worker code with one
directory reused for every task instead of a fresh one (a diagnostic, not something Execute does), shows
what the fresh directory per task costs on the filesystem under test (`ratio_reused_dir_vs_bare`).

    python -m bench.task_overhead [--tasks 500] [--rounds 9] [--sandbox-dir /dev/shm]

--sandbox-dir sets PIPELINE_SANDBOX_DIR (where task directories are made) for this run's workers.
"""

import argparse
import dataclasses
import os
import pickle
import subprocess
import tempfile
from pathlib import Path

import ray

from bench.common import median, report, start_local_ray, timed
from pipeline import tasks


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
            tempfile.mkdtemp(prefix=f"pipeline-tasks-{os.getpid()}-one-", dir=os.environ.get("PIPELINE_SANDBOX_DIR"))
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


def run_reused_dir(n):
    ray.get([execute_reused_dir.remote(SPEC_LIKE) for _ in range(n)])


def run_bare_with_arg(n):
    ray.get([bare_true_with_arg.remote(SPEC_LIKE) for _ in range(n)])


def run_execute(n):
    ray.get([tasks.Execute(["true"]).info_ref for _ in range(n)])


def run_bare(n):
    ray.get([bare_true.remote() for _ in range(n)])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--sandbox-dir", default=None)
    a = p.parse_args(argv)
    if a.sandbox_dir:
        import os

        os.environ["PIPELINE_SANDBOX_DIR"] = a.sandbox_dir  # inherited by the workers ray.init starts
    start_local_ray()
    run_execute(50), run_bare(50), run_bare_with_arg(50), run_reused_dir(50)  # warm the workers of all
    ours, bare, bare_arg, reused = [], [], [], []
    for i in range(a.rounds):
        sides = [
            lambda: ours.append(timed(lambda: run_execute(a.tasks))),
            lambda: bare.append(timed(lambda: run_bare(a.tasks))),
            lambda: bare_arg.append(timed(lambda: run_bare_with_arg(a.tasks))),
            lambda: reused.append(timed(lambda: run_reused_dir(a.tasks))),
        ]
        order = sides[i % 4 :] + sides[: i % 4]  # each side goes first, second, ... last in turn
        for step in order if i % 2 == 0 else order[::-1]:
            step()
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
        execute_ms_per_task=1000 * o / a.tasks,
        bare_ms_per_task=1000 * b / a.tasks,
        goal="<= 1.10",
    )


if __name__ == "__main__":
    main()
