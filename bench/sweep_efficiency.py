"""Sweep efficiency on the default 4 x 5 grid with mnist-5k, and the same 20 runs through Ray Tune,
in one Ray session.

efficiency = (sum of trial seconds / cores) / makespan, where makespan runs from the first trial's
submission to the last result. Goals: efficiency >= 0.85, and our makespan no longer than Tune's.

    python -m bench.sweep_efficiency [--sizes 32,64,128,256] [--dropouts 0.0,0.2,0.4,0.6,0.8]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from bench.common import report, start_local_ray
from pipeline import mnist as sweep_cli

PROGRAM = Path(__file__).resolve().parent.parent / "pipeline" / "programs" / "mnist.py"


def run_ours(sizes, dropouts, out):
    code = sweep_cli.main(["--data", "mnist-5k", "--sizes", sizes, "--dropouts", dropouts, "--out", out, "--fresh"])
    assert code == 0, f"sweep exited {code}"
    doc = json.loads((Path(out) / "results.json").read_text())
    return doc["grid_seconds"], sum(t["seconds"] for t in doc["trials"]), doc


def run_tune(sizes, dropouts, data_path, storage):
    from ray import tune

    def trainable(config):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.monotonic()
            r = subprocess.run(
                [
                    sys.executable,
                    str(PROGRAM),
                    "--data",
                    data_path,
                    "--size",
                    str(config["size"]),
                    "--dropout",
                    str(config["dropout"]),
                ],
                cwd=d,
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            tune.report({"accuracy": float(r.stdout.strip().splitlines()[-1]), "seconds": time.monotonic() - t0})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={
            "size": tune.grid_search([int(s) for s in sizes.split(",")]),
            "dropout": tune.grid_search([float(d) for d in dropouts.split(",")]),
        },
        run_config=tune.RunConfig(storage_path=storage, verbose=0),
    )
    t0 = time.monotonic()
    results = tuner.fit()
    makespan = time.monotonic() - t0
    return makespan, sum(r.metrics["seconds"] for r in results), results.num_errors


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="32,64,128,256")
    p.add_argument("--dropouts", default="0.0,0.2,0.4,0.6,0.8")
    a = p.parse_args(argv)
    start_local_ray()
    cores = ray.cluster_resources()["CPU"]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "mnist5k.npz")
        subprocess.run(
            [sys.executable, str(PROGRAM.parent / "fetch_data.py"), "--source", "mnist-5k", "--out", data],
            check=True,
            capture_output=True,
        )
        ours_make, ours_sum, _ = run_ours(a.sizes, a.dropouts, os.path.join(tmp, "ours"))
        tune_make, tune_sum, errors = run_tune(a.sizes, a.dropouts, data, os.path.join(tmp, "tune"))
    return report(
        "sweep_efficiency",
        trials=len(a.sizes.split(",")) * len(a.dropouts.split(",")),
        cores=cores,
        ours_makespan_s=ours_make,
        ours_trial_sum_s=ours_sum,
        ours_efficiency=ours_sum / cores / ours_make,
        tune_makespan_s=tune_make,
        tune_trial_sum_s=tune_sum,
        tune_efficiency=tune_sum / cores / tune_make,
        tune_errors=errors,
        makespan_ratio_ours_over_tune=ours_make / tune_make,
        goal="ours_efficiency >= 0.85 and ratio <= 1",
    )


if __name__ == "__main__":
    main()
