"""What ending a program's leftovers (pipeline.reaper) costs each program a Sandbox runs, without Ray and its
noise. First the reaper's two calls around a program alone (started, ended: the lookup of this process's
children, none left), timed over many calls: `calls_us`, wall and this thread's CPU. Then `true` run N times
in one Sandbox-per-run loop as a Ray worker runs them (this process a subreaper for good), with the reaper's
calls and with them replaced by nothing, in paired batches whose order alternates: the median per-program
difference and the ratio, which on a busy machine is mostly noise next to the first figure. Set against the
bare Ray task of bench.task_overhead (0.9-1.1 ms on the 2-core VM when quiet) they give the share of a task.

    python -m bench.reaper_cost [--runs 500] [--rounds 15]
"""

import argparse
import tempfile
import time

from bench.common import median, report
from pipeline import reaper
from pipeline.sandbox import ProgramRun, Sandbox, TaskDirs


def _batch(n: int, dirs: TaskDirs, with_reaper: bool) -> tuple[float, float]:
    calls = reaper.started, reaper.ended
    if not with_reaper:
        reaper.started = reaper.ended = lambda *a: None  # type: ignore[assignment]
    program = ProgramRun(["true"])
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(n):
            with Sandbox(dirs=dirs) as box:
                box.run(program)
        return time.perf_counter() - wall, time.thread_time() - cpu
    finally:
        reaper.started, reaper.ended = calls


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    reaper.become_subreaper(for_good=True)
    calls = 100_000
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        reaper.started(0)
        reaper.ended(0, 0.0)
    calls_wall_us, calls_cpu_us = [(t * 1e6 / calls) for t in (time.perf_counter() - wall, time.thread_time() - cpu)]
    with tempfile.TemporaryDirectory(prefix="bench-reaper-") as root:
        dirs = TaskDirs(root)
        _batch(50, dirs, True), _batch(50, dirs, False)  # warm up
        on: list[tuple[float, float]] = []
        off: list[tuple[float, float]] = []
        for i in range(a.rounds):
            for with_reaper in (True, False) if i % 2 == 0 else (False, True):
                (on if with_reaper else off).append(_batch(a.runs, dirs, with_reaper))
        dirs.close()
    us = 1e6 / a.runs
    return report(
        "reaper_cost",
        runs=a.runs,
        rounds=a.rounds,
        calls_wall_us=calls_wall_us,
        calls_cpu_us=calls_cpu_us,
        added_wall_us_per_program=median([(x[0] - y[0]) * us for x, y in zip(on, off)]),
        added_cpu_us_per_program=median([(x[1] - y[1]) * us for x, y in zip(on, off)]),
        wall_us_per_program=median([x[0] * us for x in on]),
        ratio=median([x[0] / y[0] for x, y in zip(on, off)]),
    )


if __name__ == "__main__":
    main()
