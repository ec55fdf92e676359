"""Per-task overhead: N trivial tasks (`true`) through tasks.Execute vs a bare Ray task calling
subprocess.run, in one run. Rounds are paired (an Execute batch, then a bare batch, alternating which
goes first) and the reported ratio is the median of the per-round ratios, so that the drift of a busy
2-core machine hits both sides alike. Goal: ratio <= 1.10.

    python -m bench.task_overhead [--tasks 500] [--rounds 7] [--sandbox-dir /dev/shm]

--sandbox-dir sets PIPELINE_SANDBOX_DIR (where task directories are made) for this run's workers.
"""

import argparse
import subprocess

import ray

from bench.common import median, report, start_local_ray, timed
from pipeline import tasks


@ray.remote
def bare_true():
    subprocess.run(["true"], check=True)


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
    run_execute(50), run_bare(50)  # warm the workers of both
    ours, bare = [], []
    for i in range(a.rounds):
        pair = [
            lambda: ours.append(timed(lambda: run_execute(a.tasks))),
            lambda: bare.append(timed(lambda: run_bare(a.tasks))),
        ]
        for step in pair if i % 2 == 0 else pair[::-1]:
            step()
    o, b = median(ours), median(bare)
    ratios = sorted(x / y for x, y in zip(ours, bare))
    return report(
        "task_overhead",
        tasks=a.tasks,
        sandbox_dir=a.sandbox_dir or "$TMPDIR",
        execute_s=o,
        bare_ray_s=b,
        ratio=median(ratios),
        ratio_range=f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
        execute_ms_per_task=1000 * o / a.tasks,
        bare_ms_per_task=1000 * b / a.tasks,
        goal="<= 1.10",
    )


if __name__ == "__main__":
    main()
