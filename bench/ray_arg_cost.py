"""What Ray itself charges for telling a task what to do: the bare task of bench.task_overhead (a Ray task
calling subprocess.run on `true`, no argument) against the same task given one bytes argument of Execute's
spec size, and against the same task given those bytes as its task name instead (an argument-free channel,
measured to show where the cost is; Execute does not use it: see bench/README.md, bench.task_overhead). No Execute in it.

Rounds as in bench.task_overhead (N tasks per side, one side after the other, the order rotated each
round); each side's ratio to the bare side of the same round; reported as the median of the rounds and
as the mean with its standard error, since one run's median moves by several hundredths on this VM.

    python -m bench.ray_arg_cost [--tasks 500] [--rounds 24]
"""

import argparse
import statistics
import subprocess
import time

import ray

from bench.common import median, report, start_local_ray, timed
from bench.task_overhead import SPEC_LIKE, run_bare, run_bare_with_arg

NAME_LIKE = "x" * len(SPEC_LIKE)


@ray.remote
def bare_true_named():
    ray.get_runtime_context().get_task_name()  # what a task told its spec through its name would read
    subprocess.run(["true"], check=True)


_named = bare_true_named.options(name=NAME_LIKE)  # options merged once, as a task submitted alike each time


def run_bare_named(n):
    ray.get([_named.remote() for _ in range(n)])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--rounds", type=int, default=24)
    a = p.parse_args(argv)
    if a.tasks < 1 or a.rounds < 2:
        raise SystemExit(f"--tasks must be >= 1 and --rounds >= 2, got {a.tasks} and {a.rounds}")
    start_local_ray()
    sides = {"bare": run_bare, "with_arg": run_bare_with_arg, "named": run_bare_named}
    for run in sides.values():
        run(50)  # warm the workers
    times: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(a.rounds):
        order = list(sides.items())
        for name, run in order[i % 3 :] + order[: i % 3]:
            times[name].append(timed(lambda run=run: run(a.tasks)))
            time.sleep(0.5)
    fields = {}
    for name in ("with_arg", "named"):
        ratios = sorted(x / y for x, y in zip(times[name], times["bare"]))
        fields[f"{name}_vs_bare"] = median(ratios)
        fields[f"{name}_vs_bare_mean"] = statistics.mean(ratios)
        fields[f"{name}_vs_bare_sem"] = statistics.stdev(ratios) / len(ratios) ** 0.5
    return report(
        "ray_arg_cost",
        tasks=a.tasks,
        rounds=a.rounds,
        bare_ms_per_task=1000 * median(times["bare"]) / a.tasks,
        **fields,
    )


if __name__ == "__main__":
    main()
