"""python -m pipeline.mnist: the MNIST hyperparameter sweep on Ray.

One download task, then one training task per (hidden size, dropout) grid point, each an external
`python3 mnist.py --data FILE --size S --dropout D` run in its own directory; results are written as
they arrive (results.csv, results.json) and drawn as a heatmap (heatmap.png).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import report
from pipeline.cli_common import (
    Session,
    UsageError,
    add_ray_options,
    adopt_earlier,
    failed_task_line,
    main_flow,
    read_earlier,
    run_and_report,
    start_ray,
)
from pipeline.runner import Previous, ResultStore, TrialFiles, TrialResult
from pipeline.spec import Trial, grid_id

if TYPE_CHECKING:
    from pipeline import datasets, tasks

__all__ = ["UsageError", "build_parser", "main", "parse_dropouts", "parse_sizes", "validate"]

# Ray is imported only once the run is set up: it reads its authentication mode (RAY_AUTH_MODE) when
# first imported, and for a cluster run cloud.connect sets it first.

DEFAULT_SIZES = "32,64,128,256"
DEFAULT_DROPOUTS = "0.0,0.2,0.4,0.6,0.8"


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--sizes {text!r}: give comma-separated whole numbers > 0, e.g. 32,64") from None
    if not sizes:
        raise UsageError("--sizes is empty: give at least one hidden size, e.g. 32,64")
    bad = [s for s in sizes if s <= 0]
    if bad:
        raise UsageError(f"--sizes: {bad} must be > 0")
    if len(set(sizes)) != len(sizes):
        raise UsageError(f"--sizes {text!r} repeats a value")
    return sorted(sizes)


def parse_dropouts(text: str) -> list[float]:
    try:
        drops = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--dropouts {text!r}: give comma-separated numbers in [0, 1), e.g. 0.0,0.5") from None
    if not drops:
        raise UsageError("--dropouts is empty: give at least one rate in [0, 1), e.g. 0.0,0.5")
    bad = [d for d in drops if not 0.0 <= d < 1.0]
    if bad:
        raise UsageError(f"--dropouts: {bad} outside [0, 1)")
    if len(set(drops)) != len(drops):
        raise UsageError(f"--dropouts {text!r} repeats a value")
    return sorted(drops)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.mnist", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"hidden sizes (default {DEFAULT_SIZES})")
    p.add_argument("--dropouts", default=DEFAULT_DROPOUTS, help=f"dropout rates (default {DEFAULT_DROPOUTS})")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per trial (default 1)")
    p.add_argument(
        "--data",
        default="mnist",
        help="mnist (download, checked, cached; falls back to mnist-5k offline), mnist-5k "
        "(offline subset), or a path/URL of an npz with x_train, y_train, x_test, y_test",
    )
    p.add_argument("--out", default="results", help="output directory (default results)")
    p.add_argument(
        "--program",
        default=None,
        help="run the training program already present at this absolute path on every node "
        "(default: ship pipeline/programs/mnist.py with each task)",
    )
    p.add_argument("--cpus", type=float, default=1, help="CPUs per trial (default 1)")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which a trial is killed")
    p.add_argument("--seed", type=int, default=None, help="seed passed to every trial")
    add_ray_options(p)
    return p


PARAMS = ["size", "dropout"]
METRIC = "accuracy"


@dataclass
class Checked:
    sizes: list[int]
    dropouts: list[float]
    plan: datasets.DataPlan
    previous: Previous | None


def validate(args: argparse.Namespace) -> Checked:
    sizes = parse_sizes(args.sizes)
    drops = parse_dropouts(args.dropouts)
    if args.epochs <= 0:
        raise UsageError(f"--epochs {args.epochs}: must be >= 1")
    if args.cpus <= 0:
        raise UsageError(f"--cpus {args.cpus}: must be > 0")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be > 0 seconds")
    if args.program is not None and not args.program.startswith("/"):
        raise UsageError(
            f"--program {args.program!r}: give an absolute path (tasks run in their own "
            f"directories), e.g. /home/ubuntu/mnist.py"
        )
    from pipeline import datasets

    try:
        plan = datasets.plan(args.data)
    except ValueError as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith("--data") else f"--data {args.data!r}: {msg}") from None
    return Checked(sizes, drops, plan, read_earlier(args, PARAMS, METRIC))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return main_flow("pipeline.mnist", args, validate, _run)


def _program(args: argparse.Namespace) -> tuple[Any, str]:
    """The training program for argv (shipped with each task, or a path on the nodes) and its identity."""
    from pipeline import datasets, tasks

    if args.program:
        return args.program, f"path:{args.program}"
    code = datasets.program_bytes("mnist.py")
    return tasks.blob(code, "mnist.py"), "sha256:" + hashlib.sha256(code).hexdigest()[:16]


def _dataset(session: Session, plan: datasets.DataPlan) -> datasets.Dataset | None:
    """The dataset in Ray; None after one line when it cannot be had."""
    from pipeline import datasets, tasks

    try:
        ds = datasets.produce(plan)
    except tasks.ExecuteError as e:
        session.error(f"--data {plan.source!r}: {failed_task_line(e)}")
        return None
    if ds.note:
        session.say(ds.note)
    return ds


def _submitter(args: argparse.Namespace, program: Any, data: tasks.DataObject):
    """One training task per trial: python3 mnist.py --data FILE --size S --dropout D --epochs E [--seed N]."""
    from pipeline import tasks

    def submit(trial: Trial) -> tasks.Execute:
        p = trial.params
        argv = ["python3", program, "--data", data, "--size", str(p["size"]), "--dropout", str(p["dropout"])]
        argv += ["--epochs", str(args.epochs)]
        if args.seed is not None:
            argv += ["--seed", str(args.seed)]
        return tasks.Execute(
            argv,
            watch=tasks.Watch(),
            cpus=args.cpus,
            timeout=args.timeout,
            name=f"mnist size={p['size']} dropout={p['dropout']}",
            env={"OMP_NUM_THREADS": str(max(1, int(args.cpus)))},
        )

    return submit


def _run(session: Session, checked: Checked) -> int:
    import ray

    args = session.args
    start_ray(session, f"preparing data ({checked.plan.source})")
    program, program_id = _program(args)
    ds = _dataset(session, checked.plan)
    if ds is None:
        return 2
    settings = {"dataset": ds.name, "epochs": args.epochs, "program": program_id, "seed": args.seed}
    grid = [{"size": s, "dropout": d} for s in checked.sizes for d in checked.dropouts]
    trials = [Trial(grid_id(p), p) for p in grid]
    store = ResultStore(args.out, PARAMS, METRIC, settings, [t.id for t in trials])
    if not adopt_earlier(session, store, checked.previous):
        return 2
    store.meta = {
        "dataset": ds.name,
        "train_images": ds.train,
        "test_images": ds.test,
        "ray_version": ray.__version__,
        "sizes": checked.sizes,
        "dropouts": checked.dropouts,
    }
    submit = _submitter(args, program, ds.data)

    def draw(results: list[TrialResult]) -> Path:
        title = f"MNIST test accuracy ({ds.name}, {args.epochs} epoch{'s' if args.epochs > 1 else ''})"
        path = Path(args.out) / "heatmap.png"
        labels = ("hidden size", "dropout")
        return report.heatmap(
            results, "size", checked.sizes, "dropout", checked.dropouts, path, title, "test accuracy", labels
        )

    def best_line(b) -> str:
        return f"best: size={b.params['size']} dropout={b.params['dropout']:g} accuracy={b.value:.4f}"

    return run_and_report(session, store, trials, submit, args.cpus, draw, best_line, files=TrialFiles(args.out))


if __name__ == "__main__":
    sys.exit(main())
