"""Adaptive search vs running everything, and vs Ray Tune: the best validation accuracy reached, the node-seconds
spent, the node-seconds to a target, and the scheduling overhead per trial.

    python -m bench.adaptive [--seeds 3] [--budget 0.3] [--trials N] [--no-tune] [--quick]

On examples/mnist-asha.toml's space with mnist-5k: an exhaustive grid at full epochs (lr on three values of
its log-uniform range) is the reference; then, over `--seeds` seeds, each adaptive search with a budget of
`--budget` times the grid's node-seconds (as the goal is put: our sweep's own `budget_node_hours`, which
cancels the running trials when spent; `--trials` caps the trials, 3x the grid's by default) or, with
`--budget 0`, a budget of `--trials` trials (16 by default; the grid's size with `--trials 0`):
- ours: random + ASHA and TPE + ASHA, each run as a user runs it (`python -m pipeline.sweep`, a local Ray of
  this machine's CPUs, one CPU a trial);
- Ray Tune: the same space with its ASHAScheduler (grace 1 epoch, reduction 3, max_t the epochs) and its
  OptunaSearch (Optuna's TPE, seeded), at most as many trials at once as ours; its trainable (a
  tune.Trainable: the program started in setup, one epoch's JSON line a step, the program stopped in cleanup)
  runs the same program through subprocess (ray.tune is imported only for this); a budget of node-seconds is
  given to it as `time_budget_s` over the slots (Tune has no budget of node-seconds; its time between
  programs counts against it).
Every trial of every search runs the program under one small wrapper (WRAPPER) that notes when the program
started and ended, its last epoch and validation accuracy, in a log per search, so that all searches are
measured alike:
- node-seconds: the programs' run times summed (one CPU a trial);
- node-seconds to target: what the search had spent, summed over its trials up to the moment a trial first
  ended all its epochs at a validation accuracy within 0.5 points of the reference (the target);
- slot-seconds to target: the slots' whole time from the first program's start to that moment (what nodes
  are billed, the time between programs included);
- scheduling overhead per trial: the slots' time not running a program between the first program's start
  and the last one's end, per trial ((makespan x slots - node-seconds) / trials).
Goals (issue 19): each adaptive search within 0.5 points of the reference with at most 0.35x its
node-seconds (median over the seeds); ours no worse than Tune in node-seconds to target; the overhead reported.
`--quick`: 2 sizes x 2 dropouts x 3 rates, 3 epochs, one seed (a smoke run; 6 trials a search with --budget 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "pipeline" / "programs" / "mnist.py"
LRS = [3e-4, 1e-3, 3e-3]
LR_RANGE = (1e-4, 3e-2)  # examples/mnist-asha.toml's log-uniform range
SLOTS = 2  # trials at once: the local Ray's CPUs (this 2-core machine), one a trial

# runs `python3 PROGRAM ARGS` passing its stdout through as it comes; appends one JSON line to $BENCH_LOG when
# it ends: start and end (wall clock), the last epoch and validation accuracy it printed. A SIGTERM (the
# sweep's, to the whole process group; Tune's trainable's, to this process) is passed on and waited for.
WRAPPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
if os.environ.get("BENCH_PARENT_DEATH"):  # Tune: a trainable's actor that dies takes the program along
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
start = time.time()
p = subprocess.Popen([sys.executable, *sys.argv[1:]], stdout=subprocess.PIPE)
signal.signal(signal.SIGTERM, lambda *_: p.poll() is None and p.send_signal(signal.SIGTERM))
epoch, val, passing = 0, None, True
for raw in p.stdout:
    if passing:
        try:
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
        except OSError:  # the reader is gone (a Tune trial stopped): read on, to note the end
            passing = False
    try:
        doc = json.loads(raw)
    except ValueError:
        continue
    if isinstance(doc, dict) and "epoch" in doc:
        epoch, val = doc["epoch"], doc["val_accuracy"]
rc = p.wait()
with open(os.environ["BENCH_LOG"], "a") as f:
    f.write(json.dumps({"start": start, "end": time.time(), "epochs": epoch, "val": val, "rc": rc}) + "\n")
os._exit(rc if rc >= 0 else 128 - rc)  # (no flush of a stdout whose reader may be gone)
"""


def sweep_file(
    d: Path,
    data: Path,
    log: Path,
    kind: str,
    trials: int,
    seed: int,
    sizes: list,
    drops: list,
    epochs: int,
    budget_s: float | None = None,
) -> str:
    text = (ROOT / "examples" / "mnist-asha.toml").read_text()
    text = text.replace('"../pipeline/programs/mnist.py"', json.dumps(str(d / "wrap.py")))
    text = text.replace('args = "--data', f'args = "{PROGRAM} --data')
    text = text.replace('"mnist-5k.npz"', json.dumps(str(data)))
    text = text.replace("--epochs 9", f"--epochs {epochs}").replace("max_step = 9", f"max_step = {epochs}")
    text = text.replace("size = [32, 64, 128, 256]", f"size = {sizes}")
    text = text.replace("dropout = [0.0, 0.2, 0.4, 0.6]", f"dropout = {drops}")
    text = text.replace('goal = "max"', f'goal = "max"\nenv = {{ BENCH_LOG = {json.dumps(str(log))} }}')
    head, _, _ = text.partition("[search]")
    if kind == "grid":
        head = head.replace("lr = { log-uniform = [1e-4, 3e-2] }", f"lr = {LRS}")
        return head + '[search]\nkind = "grid"\n[resources]\ncpus = 1\n'
    search = f'[search]\nkind = "{kind}"\ntrials = {trials}\nseed = {seed}\nscheduler = "asha"\nmin_step = 1\n'
    search += f"max_step = {epochs}\nreduction = 3\n"
    if budget_s is not None:  # the sweep's own stop rule: the trials' run time summed
        search += f"budget_node_hours = {budget_s / 3600!r}\n"
    return head + search + "[resources]\ncpus = 1\n"


def run_ours(d: Path, name: str, text: str) -> dict:
    (d / f"{name}.toml").write_text(text)
    out = d / name
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", str(d / f"{name}.toml"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    doc = json.loads((out / "results.json").read_text())
    statuses = [t["status"] for t in doc["trials"]]
    return {
        "command_s": round(time.time() - t0, 1),
        "pruned": statuses.count("pruned"),
        "failed": statuses.count("failed"),
    }


def run_tune(
    d: Path,
    name: str,
    data: Path,
    log: Path,
    trials: int,
    seed: int,
    sizes,
    drops,
    epochs: int,
    budget_s: float | None = None,
) -> dict:
    """Tune's ASHAScheduler + OptunaSearch (TPE) on the same space, the same program and wrapper. `budget_s`:
    node-seconds, given to Tune as its wall-clock budget over the slots (`time_budget_s`: Tune has no budget of
    node-seconds)."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    wrap = d / "wrap.py"

    class Mnist(tune.Trainable):
        """One trial: the program started in setup, each step its next epoch's line, stopped in cleanup (Tune
        calls it when the scheduler stops the trial, before the actor goes)."""

        def setup(self, config: dict) -> None:
            seed = zlib.crc32(json.dumps(config, sort_keys=True).encode()) % (2**31)
            argv = [sys.executable, str(wrap), str(PROGRAM), "--data", str(data), "--size", str(config["size"])]
            argv += ["--dropout", str(config["dropout"]), "--lr", str(config["lr"]), "--epochs", str(epochs)]
            argv += ["--seed", str(seed)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_LOG": str(log), "BENCH_PARENT_DEATH": "1"}
            self.cwd = tempfile.TemporaryDirectory()
            self.p = subprocess.Popen(
                argv, cwd=self.cwd.name, stdout=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL
            )

        def step(self) -> dict:
            assert self.p.stdout is not None
            for raw in self.p.stdout:
                try:
                    doc = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(doc, dict) and "epoch" in doc:
                    if doc["epoch"] >= epochs:  # the last: the program runs to its end, as a sweep's does
                        self.p.stdout.read()
                        self.p.wait()
                    return {"val_accuracy": doc["val_accuracy"], "epoch": doc["epoch"], "done": doc["epoch"] >= epochs}
            raise RuntimeError(f"the program ended (exit {self.p.wait()}) before its last epoch")

        def save_checkpoint(self, checkpoint_dir: str) -> None:  # nothing to save: a stopped trial is not resumed
            return None

        def load_checkpoint(self, checkpoint: Any) -> None:
            pass

        def cleanup(self) -> None:
            if self.p.poll() is None:  # stopped by the scheduler: SIGTERM, which the wrapper passes on
                self.p.terminate()
                self.p.wait(timeout=60)
            self.cwd.cleanup()

    space = {
        "size": optuna.distributions.CategoricalDistribution(sizes),
        "dropout": optuna.distributions.CategoricalDistribution(drops),
        "lr": optuna.distributions.FloatDistribution(*LR_RANGE, log=True),
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_cpus=SLOTS, include_dashboard=False, logging_level="WARNING")
    try:
        tuner = tune.Tuner(
            tune.with_resources(Mnist, {"cpu": 1}),
            tune_config=tune.TuneConfig(
                metric="val_accuracy",
                mode="max",
                search_alg=OptunaSearch(space, metric="val_accuracy", mode="max", seed=seed),
                scheduler=ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=3),
                num_samples=trials,
                max_concurrent_trials=SLOTS,
                time_budget_s=None if budget_s is None else budget_s / SLOTS,
            ),
            run_config=tune.RunConfig(storage_path=str(d / name), verbose=0),
        )
        t0 = time.time()
        results = tuner.fit()
        took = time.time() - t0
    finally:
        ray.shutdown()
    return {"command_s": round(took, 1), "failed": results.num_errors}


def measure(log: Path, epochs: int, target: float | None) -> dict:
    """What the wrapper's log says of one search (see the module's docstring)."""
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    node_s = sum(r["end"] - r["start"] for r in runs)
    first, last = min(r["start"] for r in runs), max(r["end"] for r in runs)
    # all its epochs printed (Tune stops a trial at its last report, max_t, during the test set's evaluation)
    full = [r for r in runs if r["epochs"] == epochs and r["val"] is not None]
    out = {
        "trials": len(runs),
        "stopped_early": len(runs) - len(full),
        "best": max((r["val"] for r in full), default=None),
        "node_seconds": round(node_s, 1),
        "overhead_s_per_trial": round(((last - first) * SLOTS - node_s) / len(runs), 3),
    }
    if target is not None:
        reached = sorted(r["end"] for r in full if r["val"] >= target - 1e-9)
        if reached:
            t = reached[0]
            out["node_seconds_to_target"] = round(sum(max(0.0, min(r["end"], t) - r["start"]) for r in runs), 1)
            out["slot_seconds_to_target"] = round((t - first) * SLOTS, 1)  # the slots' time, idle included
        else:
            out["node_seconds_to_target"] = out["slot_seconds_to_target"] = None  # not reached
    return out


def _seconds(x: float) -> str:
    return "not reached" if x == float("inf") else f"{x:.0f} node-s"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--budget",
        type=float,
        default=0.3,
        help="each adaptive search's budget, a fraction of the grid's node-seconds (the sweep's budget_node_hours; "
        "0: a budget of --trials trials instead)",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials of each adaptive search: with --budget a cap (default 3x the grid's), without it the budget "
        "(default 16; 0: the grid's size)",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs of a full trial (default 9; --quick 3)")
    p.add_argument("--no-tune", action="store_true", help="leave Ray Tune out")
    p.add_argument("--first-seed", type=int, default=0, help="the seeds are FIRST .. FIRST + seeds - 1 (default 0)")
    p.add_argument(
        "--searches", default="random,tpe,tune", help="which adaptive searches, comma-separated (random, tpe, tune)"
    )
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.budget < 0 or a.budget >= 1:
        p.error(f"--budget {a.budget:g}: give a fraction of the grid's node-seconds, 0 < x < 1 (or 0: --trials)")
    sizes, drops, epochs = ([32, 128], [0.0, 0.4], 3) if a.quick else ([32, 64, 128, 256], [0.0, 0.2, 0.4, 0.6], 9)
    epochs = a.epochs or epochs
    seeds = 1 if a.quick else a.seeds
    n = len(sizes) * len(drops) * len(LRS)
    if a.budget:
        trials = a.trials or 3 * n
    elif a.trials is None:
        trials = 6 if a.quick else 16
    else:
        trials = a.trials or n
    kinds = [k.strip() for k in a.searches.split(",") if k.strip() and not (a.no_tune and k.strip() == "tune")]
    if not kinds or set(kinds) - {"random", "tpe", "tune"}:
        p.error(f"--searches {a.searches!r}: give some of random, tpe, tune, comma-separated")
    out: dict[str, Any] = {"bench": "adaptive", "epochs": epochs, "grid_trials": n, "trials": trials, "seeds": seeds}
    out["budget_ratio"] = a.budget or None
    with tempfile.TemporaryDirectory(prefix="bench-adaptive-") as tmp:
        d = Path(tmp)
        (d / "wrap.py").write_text(WRAPPER)
        data = d / "mnist-5k.npz"
        fetch = [sys.executable, str(ROOT / "pipeline/programs/fetch_data.py"), "--source", "mnist-5k"]
        subprocess.run([*fetch, "--out", str(data)], check=True, capture_output=True)
        ref_log = d / "exhaustive.log"
        info = run_ours(d, "exhaustive", sweep_file(d, data, ref_log, "grid", 0, 0, sizes, drops, epochs))
        ref = {**measure(ref_log, epochs, None), **info}
        target = ref["best"] - 0.005
        ref_to = measure(ref_log, epochs, target)["node_seconds_to_target"]
        out["exhaustive"] = {**ref, "node_seconds_to_target": ref_to}
        out["target"] = target
        budget_s = a.budget * ref["node_seconds"] if a.budget else None
        out["budget_node_seconds"] = budget_s
        for kind in kinds:
            runs = []
            for s in range(a.first_seed, a.first_seed + seeds):
                name, log = f"{kind}-{s}", d / f"{kind}-{s}.log"
                if kind == "tune":
                    info = run_tune(d, name, data, log, trials, s, sizes, drops, epochs, budget_s)
                else:
                    text = sweep_file(d, data, log, kind, trials, s, sizes, drops, epochs, budget_s)
                    info = run_ours(d, name, text)
                runs.append({**measure(log, epochs, target), **info})
                print(f"adaptive: {name}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
            to_target = [r["node_seconds_to_target"] for r in runs]
            out[kind] = {
                "runs": runs,
                "best_median": statistics.median(r["best"] for r in runs if r["best"] is not None),
                "node_seconds_ratio_median": round(
                    statistics.median(r["node_seconds"] / ref["node_seconds"] for r in runs), 3
                ),
                "reached_target": sum(x is not None for x in to_target),
                # a run that never reached it counts as infinitely far: the median is honest about it
                "node_seconds_to_target_median": statistics.median(
                    x if x is not None else float("inf") for x in to_target
                ),
                "slot_seconds_to_target_median": statistics.median(
                    r["slot_seconds_to_target"] if r["slot_seconds_to_target"] is not None else float("inf")
                    for r in runs
                ),
                "overhead_s_per_trial_median": statistics.median(r["overhead_s_per_trial"] for r in runs),
            }
    print(
        f"adaptive: exhaustive grid of {n}: best val_accuracy {ref['best']:.4f}, {ref['node_seconds']:.0f} node-s "
        f"(to the target {target:.4f}: {ref_to:.0f}), overhead {ref['overhead_s_per_trial']:.2f} s/trial"
    )
    for kind in kinds:
        k = out[kind]
        label = "Ray Tune ASHA + OptunaSearch (TPE)" if kind == "tune" else f"ours {kind} + ASHA"
        spend = f"a budget of {a.budget:g}x the grid's node-seconds" if a.budget else f"{trials} trials"
        ran = "/".join(str(r["trials"]) for r in k["runs"])
        print(
            f"adaptive: {label}, {spend} ({ran} trials run): best {k['best_median']:.4f} "
            f"({100 * (k['best_median'] - ref['best']):+.2f} points vs the grid), node-seconds "
            f"{k['node_seconds_ratio_median']:.2f}x; to the target {_seconds(k['node_seconds_to_target_median'])} "
            f"(slot-seconds {_seconds(k['slot_seconds_to_target_median'])}) "
            f"({k['reached_target']} of {seeds} reached it); overhead {k['overhead_s_per_trial_median']:.2f} s/trial "
            f"(medians of {seeds}; goal within 0.5 points at <= 0.35x)"
        )
    print("JSON", json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
