"""Adaptive search vs running everything: the best validation accuracy reached and the node-seconds spent.

    python -m bench.adaptive [--seeds 3] [--quick]

On examples/mnist-asha.toml's space with mnist-5k: an exhaustive grid at full epochs (lr on three values of
its log-uniform range) is the reference; then random + ASHA and TPE + ASHA, each with as many trials as the
grid, over `--seeds` seeds. Each search runs as a user runs it (`python -m pipeline.sweep`, a local Ray of
this machine's CPUs); node-seconds are the trials' run times summed (results.json), one CPU per trial.
Goal (issue 19): each adaptive search within 0.5 points of the reference using at most 0.35x its node-seconds
(median over the seeds). `--quick`: 2 sizes x 2 dropouts x 3 rates, 3 epochs, one seed (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LRS = [3e-4, 1e-3, 3e-3]


def sweep_file(data: Path, kind: str, trials: int, seed: int, sizes: list[int], drops: list[float], epochs: int) -> str:
    text = (ROOT / "examples" / "mnist-asha.toml").read_text()
    text = text.replace('"../pipeline/programs/mnist.py"', json.dumps(str(ROOT / "pipeline/programs/mnist.py")))
    text = text.replace('"mnist-5k.npz"', json.dumps(str(data)))
    text = text.replace("--epochs 9", f"--epochs {epochs}").replace("max_step = 9", f"max_step = {epochs}")
    text = text.replace("size = [32, 64, 128, 256]", f"size = {sizes}")
    text = text.replace("dropout = [0.0, 0.2, 0.4, 0.6]", f"dropout = {drops}")
    head, _, _ = text.partition("[search]")
    if kind == "grid":
        head = head.replace("lr = { log-uniform = [1e-4, 3e-2] }", f"lr = {LRS}")
        return head + '[search]\nkind = "grid"\n[resources]\ncpus = 1\n'
    search = f'[search]\nkind = "{kind}"\ntrials = {trials}\nseed = {seed}\nscheduler = "asha"\nmin_step = 1\n'
    search += f"max_step = {epochs}\nreduction = 3\n"
    return head + search + "[resources]\ncpus = 1\n"


def run(d: Path, name: str, text: str) -> dict:
    (d / f"{name}.toml").write_text(text)
    out = d / name
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
    ok = [t for t in doc["trials"] if t["status"] == "ok"]
    return {
        "best": max(t["value"] for t in ok),
        "node_seconds": round(sum(t["seconds"] or 0 for t in doc["trials"]), 1),
        "trials": len(doc["trials"]),
        "pruned": sum(t["status"] == "pruned" for t in doc["trials"]),
        "wall_seconds": doc.get("grid_seconds"),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    sizes, drops, epochs = ([32, 128], [0.0, 0.4], 3) if a.quick else ([32, 64, 128, 256], [0.0, 0.2, 0.4, 0.6], 9)
    seeds = 1 if a.quick else a.seeds
    n = len(sizes) * len(drops) * len(LRS)
    with tempfile.TemporaryDirectory(prefix="bench-adaptive-") as tmp:
        d = Path(tmp)
        data = d / "mnist-5k.npz"
        fetch = [sys.executable, str(ROOT / "pipeline/programs/fetch_data.py"), "--source", "mnist-5k"]
        subprocess.run([*fetch, "--out", str(data)], check=True, capture_output=True)
        ref = run(d, "exhaustive", sweep_file(data, "grid", 0, 0, sizes, drops, epochs))
        out: dict = {"bench": "adaptive", "epochs": epochs, "space_trials": n, "exhaustive": ref}
        for kind in ("random", "tpe"):
            runs = [run(d, f"{kind}-{s}", sweep_file(data, kind, n, s, sizes, drops, epochs)) for s in range(seeds)]
            out[kind] = {
                "runs": runs,
                "best_median": statistics.median(r["best"] for r in runs),
                "node_seconds_ratio_median": round(
                    statistics.median(r["node_seconds"] / ref["node_seconds"] for r in runs), 3
                ),
            }
    for kind in ("random", "tpe"):
        k = out[kind]
        gap = 100 * (ref["best"] - k["best_median"])
        print(
            f"adaptive: {kind} + ASHA: best val_accuracy {k['best_median']:.4f} vs exhaustive {ref['best']:.4f} "
            f"({-gap:+.2f} points vs it), node-seconds {k['node_seconds_ratio_median']:.2f}x of "
            f"{ref['node_seconds']:.0f} (median of {seeds}; goal <= 0.5 points, <= 0.35x)"
        )
    print("JSON", json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
