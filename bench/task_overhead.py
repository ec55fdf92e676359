"""Per-task overhead: N trivial tasks (`true`) through tasks.Execute vs a bare Ray task calling
subprocess.run, in one run, alternating rounds so that drift hits both alike. Goal: ratio <= 1.10.

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
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sandbox-dir", default=None)
    a = p.parse_args(argv)
    if a.sandbox_dir:
        import os

        os.environ["PIPELINE_SANDBOX_DIR"] = a.sandbox_dir  # inherited by the workers ray.init starts
    start_local_ray()
    run_execute(50), run_bare(50)  # warm the workers of both
    ours, bare = [], []
    for _ in range(a.rounds):
        ours.append(timed(lambda: run_execute(a.tasks)))
        bare.append(timed(lambda: run_bare(a.tasks)))
    o, b = median(ours), median(bare)
    return report("task_overhead", tasks=a.tasks, sandbox_dir=a.sandbox_dir or "$TMPDIR", execute_s=o, bare_ray_s=b, ratio=o / b,
                  execute_ms_per_task=1000 * o / a.tasks, bare_ms_per_task=1000 * b / a.tasks, goal="<= 1.10")


if __name__ == "__main__":
    main()
