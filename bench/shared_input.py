"""Shared input: K tasks on one node each mapping the same large input vs one task; time and bytes
written to map it. Goal: the mapping cost does not grow with the number of tasks (bytes written stay
one input's size; time per extra task stays at the per-task overhead).

    python -m bench.shared_input [--mb 200] [--tasks 40]
"""

import argparse
import os

import ray

from bench.common import report, start_local_ray, timed
from pipeline import tasks


@ray.remote
def plain_task(array):
    """What a plain implementation does: write the input into a fresh temp dir for every task."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "input")
        with open(path, "wb") as f:
            f.write(memoryview(array))
        subprocess.run(["wc", "-c", path], check=True, capture_output=True)
    return array.size


def run_plain(n, data):
    return sum(ray.get([plain_task.remote(data.ref) for _ in range(n)]))


def run(n, data):
    ts = [tasks.Execute(["wc", "-c", data], stdout=True) for _ in range(n)]
    ray.get([t.info_ref for t in ts])
    return sum(t.wait().input_bytes_written for t in ts)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--tasks", type=int, default=40)
    a = p.parse_args(argv)
    start_local_ray()
    size = a.mb * 1024 * 1024
    payload = os.urandom(size)
    run(1, tasks.blob(b"warm-up"))
    one = tasks.blob(payload, "big.bin")
    many = tasks.blob(payload, "big.bin")  # a separate data object: nothing cached from the first run
    written = {}
    t1 = timed(lambda: written.__setitem__(1, run(1, one)))
    tn = timed(lambda: written.__setitem__(a.tasks, run(a.tasks, many)))
    tp = timed(lambda: written.__setitem__("plain", run_plain(a.tasks, many)))
    return report(
        "shared_input",
        plain_n_tasks_s=tp,
        bytes_written_plain_n=written["plain"],
        input_mb=a.mb,
        tasks=a.tasks,
        one_task_s=t1,
        n_tasks_s=tn,
        extra_s_per_added_task=(tn - t1) / (a.tasks - 1),
        bytes_written_1=written[1],
        bytes_written_n=written[a.tasks],
        bytes_ratio=written[a.tasks] / written[1],
        goal="bytes_ratio == 1",
    )


if __name__ == "__main__":
    main()
