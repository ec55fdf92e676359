"""A sweep file of 200 trials of a 0.1 s program, run as a user runs it (python -m pipeline.sweep).

makespan (first submission to last result, from results.json) against the bound ceil(200 / cores) x
0.1 s, and the time from the command to the first trial running (the program stamps its start).
Goal: makespan / bound <= 1.25.

    python -m bench.sweep_file [--trials 200] [--seconds 0.1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import report

PROGRAM = """\
[ -e "$STATE/first" ] || date +%s.%N > "$STATE/first"
sleep "$1"
echo 1
"""

SWEEP = """\
program = "work.sh"
interpreter = "sh"
args = "{{seconds}} {{i}}"
env = {{ STATE = "{state}" }}
[params]
seconds = [{seconds}]
i = {{ range = [1, {trials}, 1] }}
"""


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seconds", type=float, default=0.1)
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-sweep-file-") as tmp:
        d = Path(tmp)
        (d / "state").mkdir()
        (d / "work.sh").write_text(PROGRAM)
        (d / "sweep.toml").write_text(SWEEP.format(state=d / "state", seconds=a.seconds, trials=a.trials))
        env = {**os.environ, "PIPELINE_CACHE_DIR": str(d / "cache")}
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "pipeline.sweep", str(d / "sweep.toml"), "--out", str(d / "out")],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=1200,
        )
        wall = time.time() - t0
        if r.returncode != 0:
            sys.exit(f"sweep exited {r.returncode}: {r.stderr[-2000:]}")
        first = float((d / "state" / "first").read_text()) - t0
        doc = json.loads((d / "out" / "results.json").read_text())
    ok = sum(t["status"] == "ok" for t in doc["trials"])
    bound = math.ceil(a.trials / cores) * a.seconds
    makespan = doc["grid_seconds"]
    return report(
        "sweep_file",
        trials=a.trials,
        ok=ok,
        cores=cores,
        makespan_s=makespan,
        bound_s=bound,
        makespan_over_bound=makespan / bound,
        command_to_first_trial_s=first,
        command_wall_s=wall,
        goal="makespan_over_bound <= 1.25",
    )


if __name__ == "__main__":
    main()
