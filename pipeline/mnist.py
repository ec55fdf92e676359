"""python -m pipeline.mnist: the MNIST hyperparameter sweep on Ray.

One download task, then one training task per (hidden size, dropout) grid point, each an external
`python3 mnist.py --data FILE --size S --dropout D` run in its own directory; results are written as
they arrive (results.csv, results.json) and drawn as a heatmap (heatmap.png).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline import datasets

# Ray is imported only once the run is set up: it reads its authentication mode (RAY_AUTH_MODE) when
# first imported, and a cluster run sets it first.

DEFAULT_SIZES = "32,64,128,256"
DEFAULT_DROPOUTS = "0.0,0.2,0.4,0.6,0.8"

log = logging.getLogger("pipeline.mnist")


class UsageError(ValueError):
    """A bad option: reported as one line before any work starts."""


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


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a Ray address is not Ray (ray.init would wait a long time)."""
    from pipeline.ray_address import RayAddressError, check_ray_address

    try:
        check_ray_address(address, timeout)
    except RayAddressError as e:
        raise UsageError(f"--address {e}") from None


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
    p.add_argument("--address", default=None, help="a Ray address (default: a local Ray)")
    p.add_argument("--cluster", default=None, help="run on this Exoscale cluster, through an SSH tunnel")
    p.add_argument("--cluster-config", default=None, help="the cluster's cluster.toml, if it has one")
    p.add_argument(
        "--program",
        default=None,
        help="run the training program already present at this absolute path on every node "
        "(default: ship pipeline/programs/mnist.py with each task)",
    )
    p.add_argument(
        "--local-cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray started when neither --address nor --cluster is given (default: all)",
    )
    p.add_argument("--cpus", type=float, default=1, help="CPUs per trial (default 1)")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which a trial is killed")
    p.add_argument("--seed", type=int, default=None, help="seed passed to every trial")
    p.add_argument("--fresh", action="store_true", help="ignore earlier results in --out and run everything")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def validate(args: argparse.Namespace) -> tuple[list[int], list[float], datasets.DataPlan]:
    sizes = parse_sizes(args.sizes)
    drops = parse_dropouts(args.dropouts)
    if args.epochs <= 0:
        raise UsageError(f"--epochs {args.epochs}: must be >= 1")
    if args.cpus <= 0:
        raise UsageError(f"--cpus {args.cpus}: must be > 0")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be > 0 seconds")
    if args.address and args.cluster:
        raise UsageError("give --address or --cluster, not both")
    if args.program is not None and not os.path.isabs(args.program):
        raise UsageError(
            f"--program {args.program!r}: give an absolute path (tasks run in their own "
            f"directories), e.g. /home/ubuntu/mnist.py"
        )
    if args.local_cpus is not None and (args.local_cpus < 1 or args.address or args.cluster):
        raise UsageError("--local-cpus takes a number >= 1 and applies only to a local Ray")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a directory")
    from pipeline import datasets

    try:
        plan = datasets.plan(args.data)
    except ValueError as e:
        raise UsageError(f"--data: {e}") from None
    if args.address:
        check_address(args.address)
    return sizes, drops, plan


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cluster:
        os.environ["RAY_AUTH_MODE"] = "token"  # the cluster requires its token; read by Ray at import
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        sizes, drops, plan = validate(args)
    except UsageError as e:
        print(f"pipeline.mnist: error: {e}", file=sys.stderr)
        return 2
    conn = None
    address = args.address
    if args.cluster:
        from cloud.connect import connect_cluster  # the only place pipeline reaches into cloud

        try:
            conn = connect_cluster(args.cluster, args.cluster_config)
        except Exception as e:
            print(f"pipeline.mnist: error: --cluster {args.cluster!r}: {e}", file=sys.stderr)
            return 2
        address = conn.address
    try:
        return _run(args, sizes, drops, plan, address, conn)
    finally:
        if conn is not None:
            conn.close()


def _run(args, sizes, drops, plan, address, conn=None) -> int:
    import ray

    from pipeline import datasets, report, tasks
    from pipeline.sweep import Progress, ResultStore, SettingsMismatch, run_grid

    started = time.monotonic()
    tasks.ensure_ray(address, num_cpus=args.local_cpus)
    program_arg: object
    if args.program:
        program_arg = args.program
        program_id = f"path:{args.program}"
    else:
        code = datasets.program_bytes("mnist.py")
        program_arg = tasks.blob(code, "mnist.py")
        program_id = "sha256:" + hashlib.sha256(code).hexdigest()[:16]

    print(
        f"Ray {ray.__version__}: {int(ray.cluster_resources().get('CPU', 0))} CPUs on "
        f"{len([n for n in ray.nodes() if n['Alive']])} node(s); preparing data ({plan.source})",
        file=sys.stderr,
    )
    try:
        ds = datasets.produce(plan)
    except tasks.ExecuteError as e:
        print(
            f"pipeline.mnist: error: --data {plan.source!r}: {e.stderr_tail.strip().splitlines()[-1] if e.stderr_tail.strip() else e}",
            file=sys.stderr,
        )
        return 2
    if ds.note:
        print(ds.note, file=sys.stderr)
    settings = {"dataset": ds.name, "epochs": args.epochs, "program": program_id, "seed": args.seed}
    store = ResultStore(args.out, ["size", "dropout"], "accuracy", settings)
    if not args.fresh:
        try:
            reused = store.load_previous()
        except SettingsMismatch as e:
            print(f"pipeline.mnist: error: {e}", file=sys.stderr)
            return 2
        if reused:
            print(f"reusing {reused} finished trial(s) from {store.json_path}", file=sys.stderr)
    store.meta = {
        "dataset": ds.name,
        "train_images": ds.train,
        "test_images": ds.test,
        "ray_version": ray.__version__,
        "sizes": sizes,
        "dropouts": drops,
    }

    def submit(p):
        argv = [
            "python3",
            program_arg,
            "--data",
            ds.data,
            "--size",
            str(p["size"]),
            "--dropout",
            str(p["dropout"]),
            "--epochs",
            str(args.epochs),
        ]
        if args.seed is not None:
            argv += ["--seed", str(args.seed)]
        return tasks.Execute(
            argv,
            stdout=True,
            cpus=args.cpus,
            timeout=args.timeout,
            name=f"mnist size={p['size']} dropout={p['dropout']}",
            env={"OMP_NUM_THREADS": str(max(1, int(args.cpus)))},
        )

    grid = [{"size": s, "dropout": d} for s in sizes for d in drops]
    slots = int(ray.cluster_resources().get("CPU", 0) // args.cpus) or None
    progress = Progress(len(grid), slots=slots)
    grid_start = time.monotonic()
    try:
        results = run_grid(grid, submit, store, progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished trials are in {store.csv_path}", file=sys.stderr)
        return 130
    except (ConnectionError, ray.exceptions.RaySystemError) as e:
        where = f"cluster {args.cluster!r}" if args.cluster else f"Ray at {address or 'the local Ray'}"
        why = (conn.lost_reason() if conn is not None else None) or (
            f"the head is unreachable: {str(e).splitlines()[0][:200]}"
        )
        print(
            f"pipeline.mnist: error: lost the connection to {where} ({why}); the {len(store.results)} "
            f"finished trial(s) are in {store.csv_path}; run the same command again to resume",
            file=sys.stderr,
        )
        return 1
    wall = time.monotonic() - started
    store.meta["wall_seconds"] = round(wall, 2)
    store.meta["grid_seconds"] = round(time.monotonic() - grid_start, 2)  # first submission to last result
    store.write()
    title = f"MNIST test accuracy ({ds.name}, {args.epochs} epoch{'s' if args.epochs > 1 else ''})"
    png = report.heatmap(results, sizes, drops, Path(args.out) / "heatmap.png", title)
    print(report.table(results))
    failed = [r for r in results if r.status != "ok"]
    b = report.best(results)
    if b:
        print(f"best: size={b.params['size']} dropout={b.params['dropout']:g} accuracy={b.value:.4f}")
    print(f"wrote {store.csv_path}, {store.json_path}, {png} in {wall:.1f} s")
    if failed:
        print(
            f"{len(failed)} of {len(results)} trial(s) failed; their errors are in {store.csv_path}; "
            f"run again with the same --out to retry only those",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
