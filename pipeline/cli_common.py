"""What the sweep CLIs share: Ray options and their checks, reaching Ray (local, an address, or a
cluster through cloud.connect), running the trials with one-line endings, and the closing summary.

Printing happens here and in the CLIs only; Ray is imported once the run is set up (for a cluster run,
`cloud.connect.connect_cluster` sets Ray's authentication mode first, which Ray reads when first imported).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import report
from pipeline.cost import NO_PRICE, BudgetError, CostMeter, NodeRate, SweepPrices, check_budget, money
from pipeline.ray_address import RayAddressError, check_ray_address
from pipeline.runner import (
    OutputError,
    Previous,
    Progress,
    ReadMetric,
    ResultStore,
    SettingsMismatch,
    TrialFiles,
    TrialResult,
    read_last_float,
    read_previous,
    run_trials,
)
from pipeline.search import Search, StopRules
from pipeline.spec import Trial

if TYPE_CHECKING:
    from cloud.connect import ClusterConnection
    from pipeline import tasks
    from pipeline.progress import ProgressHub


class UsageError(ValueError):
    """A bad option: reported as one line before any work starts."""


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="a Ray address (default: a local Ray)")
    p.add_argument("--cluster", default=None, help="run on this Exoscale cluster, through an SSH tunnel")
    p.add_argument("--cluster-config", default=None, help="the cluster's cluster.toml, if it has one")
    p.add_argument(
        "--local-cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray started when neither --address nor --cluster is given (default: all)",
    )
    p.add_argument("--fresh", action="store_true", help="ignore earlier results in --out and run everything")
    p.add_argument(
        "--budget",
        default=None,
        metavar="AMOUNT",
        help="on a cluster: start no new trial once the estimated cost would pass AMOUNT (the prices' currency)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def check_ray_options(args: argparse.Namespace) -> None:
    if args.address and args.cluster:
        raise UsageError("give --address or --cluster, not both")
    if args.cluster_config and not args.cluster:
        raise UsageError("--cluster-config applies only with --cluster NAME (the cluster it describes)")
    if args.local_cpus is not None and (args.local_cpus < 1 or args.address or args.cluster):
        raise UsageError("--local-cpus takes a number >= 1 and applies only to a local Ray")
    try:
        args.budget = check_budget(getattr(args, "budget", None))
    except BudgetError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a directory")
    other = _not_results(out)
    if other is not None:
        raise UsageError(
            f"--out {args.out!r} holds files that are not the results of a sweep (e.g. {other!r}), which it would "
            f"replace; give a new or empty directory"
        )


def _not_results(out: Path) -> str | None:
    """The name of an entry in the existing directory `out` when it is not a sweep's output (a sweep writes
    results.json and results.csv before its first trial starts); None when it is, or is empty or new."""
    try:
        names = sorted(os.listdir(out))
    except OSError:  # missing (made by the sweep), or unreadable (the first write says so)
        return None
    if not names or "results.json" in names or "results.csv" in names:
        return None
    return names[0]


def check_address(address: str, timeout: float = 5.0, source: str = "--address") -> None:
    """Fail fast, in one line, when a Ray address is not Ray (ray.init would wait a long time); `source`
    names where the address came from."""
    try:
        check_ray_address(address, timeout)
    except RayAddressError as e:
        raise UsageError(f"{source} {e}") from None


def read_earlier(
    args: argparse.Namespace, param_names: Sequence[str], value_name: str, steps: bool = False
) -> Previous | None:
    """The earlier results in --out (before Ray starts), unless --fresh; a damaged results.json is a usage error."""
    if args.fresh:
        return None
    try:
        return read_previous(args.out, param_names, value_name, steps)
    except SettingsMismatch as e:
        raise UsageError(str(e)) from None


@dataclass
class Session:
    """One CLI run: its name for messages, where Ray is, and the cluster connection if any."""

    prog: str
    args: argparse.Namespace
    address: str | None = None
    conn: ClusterConnection | None = None
    started: float = field(default_factory=time.monotonic)

    def error(self, text: str) -> None:
        print(f"{self.prog}: error: {text}", file=sys.stderr)

    def say(self, text: str) -> None:
        print(text, file=sys.stderr)

    def where(self) -> str:
        return f"cluster {self.args.cluster!r}" if self.args.cluster else f"Ray at {self.address or 'the local Ray'}"


def main_flow(
    prog: str,
    args: argparse.Namespace,
    validate: Callable[[argparse.Namespace], Any],
    run: Callable[[Session, Any], int],
) -> int:
    """Validate (one line, exit 2, before any work), reach Ray, run, close the connection. Ray is not imported
    before `connect_cluster`, which sets the cluster's token authentication (Ray reads its mode at import)."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    session = Session(prog, args, address=args.address)
    try:
        check_ray_options(args)
        checked = validate(args)
        if args.address:
            check_address(args.address)
        elif not args.cluster and os.environ.get("RAY_ADDRESS"):  # Ray's own variable, which ensure_ray honours
            check_address(os.environ["RAY_ADDRESS"], source="RAY_ADDRESS")
    except UsageError as e:
        session.error(str(e))
        return 2
    if args.cluster:
        from cloud.connect import connect_cluster  # the only place pipeline reaches into cloud

        try:
            session.conn = connect_cluster(args.cluster, args.cluster_config)
        except KeyboardInterrupt:
            session.say("\ninterrupted while connecting to the cluster")
            return 130
        except Exception as e:
            session.error(f"--cluster {args.cluster!r}: {e}")
            return 2
        session.address = session.conn.address
    try:
        return run(session, checked)
    except KeyboardInterrupt:  # before the trials ran (e.g. while Ray starts); run_and_report says its own
        session.say("\ninterrupted before any trial ran")
        return 130
    except RayAddressError as e:  # the tunnel's far end is not (or no longer) Ray's Client server
        why = session.conn.lost_reason() if session.conn is not None else None
        session.error(f"cannot connect to {session.where()}: {why or e}")
        return 1
    except ConnectionError as e:  # ray.init refused, e.g. the head's Ray Client server did not start
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        why = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"
        session.error(f"cannot connect to {session.where()}: {type(e).__name__}: {why[:300]}")
        return 1
    finally:
        if session.conn is not None:
            session.conn.close()


def start_ray(session: Session, note: str, runtime_env: dict[str, Any] | None = None) -> None:
    """Reach Ray (`tasks.ensure_ray`) and say what it offers."""
    import ray

    from pipeline import tasks

    tasks.ensure_ray(session.address, num_cpus=session.args.local_cpus, runtime_env=runtime_env)
    session.say(
        f"Ray {ray.__version__}: {int(ray.cluster_resources().get('CPU', 0))} CPUs on "
        f"{len([n for n in ray.nodes() if n['Alive']])} node(s); {note}"
    )


def failed_task_line(e: tasks.ExecuteError) -> str:
    """One line for the user about a task that failed: the last line of its stderr, else the error."""
    tail = e.stderr_tail.strip().splitlines()
    return tail[-1] if tail else str(e)


def adopt_earlier(session: Session, store: ResultStore, previous: Previous | None) -> bool:
    """Take the earlier run's finished trials; False (after one line) when they belong to another sweep."""
    if previous is not None and previous.note:
        session.say(previous.note)
    try:
        reused = store.adopt(previous)
    except SettingsMismatch as e:
        session.error(str(e))
        return False
    if reused:
        session.say(f"reusing {reused} finished trial(s) from {store.dir}")
    return True


def run_and_report(
    session: Session,
    store: ResultStore,
    trials: Sequence[Trial],
    submit: Callable[[Trial], tasks.Execute],
    cpus: float,
    draw: Callable[[list[TrialResult]], Path],
    best_line: Callable[[TrialResult], str],
    *,
    read: ReadMetric = read_last_float,
    retries: int = 0,
    files: TrialFiles | None = None,
    goal: str = "max",
    search: Search | None = None,
    rules: StopRules = StopRules(),
    hub: ProgressHub | None = None,
    total: int | None = None,
    budget: float | None = None,
) -> int:
    """Run the trials with a progress line, then `finish` with the picture `draw` makes of their results; the
    exit code (after one line saying why, when the sweep stopped early). `search`, `rules`, `hub`: see
    runner.run_trials; `total`: the trials the progress line counts to (default: len(trials)); `budget`: the
    sweep file's (--budget replaces it)."""
    import ray

    given = getattr(session.args, "budget", None)
    meter = cost_meter(session, cpus, given if given is not None else budget)

    def count_slots() -> int | None:
        return int(ray.cluster_resources().get("CPU", 0) // cpus) or None

    last_slots, asked_at = count_slots(), time.monotonic()

    def slots() -> int | None:  # asked again every 10 s: an autoscaling cluster grows and shrinks
        nonlocal last_slots, asked_at
        if time.monotonic() - asked_at > 10:
            asked_at = time.monotonic()
            try:
                last_slots = count_slots()
            except Exception:  # a lost connection is reported by the sweep itself; keep the last count
                pass
        return last_slots

    meter.wave = slots
    note = session.conn.note if session.conn is not None else None
    progress = Progress(len(trials) if total is None else total, slots=slots, note=note, show_pruned=hub is not None)
    start = time.monotonic()
    try:
        store.write()  # the results files first: --out is a sweep's from now on (see check_ray_options)
        results = run_trials(
            trials,
            submit,
            store,
            progress,
            read=read,
            retries=retries,
            files=files,
            poll_s=0.2 if hub is not None else 1.0,  # reports are taken at each turn: within about a second
            search=search,
            rules=rules,
            hub=hub,
            goal=goal,
            meter=meter,
        )
    except KeyboardInterrupt:
        session.say(f"\ninterrupted; finished trials are in {store.csv_path}")
        return 130
    except OutputError as e:
        session.error(
            f"{e.strerror}; stopped the sweep; the trials finished before are in {store.csv_path}; "
            f"make room and run the same command again to resume"
        )
        return 1
    except (ConnectionError, ray.exceptions.RaySystemError) as e:
        why = (session.conn.lost_reason() if session.conn is not None else None) or (
            f"the head is unreachable: {str(e).splitlines()[0][:200]}"
        )
        session.error(
            f"lost the connection to {session.where()} ({why}); the {len(store.results)} "
            f"finished trial(s) are in {store.csv_path}; run the same command again to resume"
        )
        return 1
    store.meta["wall_seconds"] = round(time.monotonic() - session.started, 2)
    store.meta["grid_seconds"] = round(time.monotonic() - start, 2)  # first submission to last result
    unrun = (len(trials) if total is None else total) - len(store.results)
    return finish(session, store, results, lambda: draw(results), best_line, goal, meter, unrun)


def cost_meter(session: Session, cpus: float, budget: float | None) -> CostMeter:
    """The sweep's meter: on a cluster whose API can be asked, its nodes' rates (asked again for a node not
    seen yet); else no price, and a budget is said not to apply."""
    import ray

    def ray_cpus() -> dict[str, float]:
        return {n["NodeManagerAddress"]: float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]}

    if session.conn is None:
        if budget is not None:
            session.say(f"budget {budget:g}: not applied, {NO_PRICE} (a budget applies to a sweep on a --cluster)")
        return CostMeter(SweepPrices(), cpus)
    conn = session.conn

    def look_up() -> dict[str, NodeRate]:
        listed, node_cpus = conn.node_prices(), ray_cpus()
        return {ip: NodeRate(t, rate, node_cpus.get(ip, 0.0)) for ip, (t, rate) in listed.nodes.items()}

    try:
        first = conn.node_prices()
    except Exception as e:  # the API unreachable: the sweep runs, unpriced
        first = None
        session.say(f"cost: the cluster's prices could not be read ({str(e).splitlines()[0][:200]})")
    if first is None or first.currency is None:
        if first is not None:
            session.say(f"cost: unknown, {first.source}")
        if budget is not None:
            session.say(f"budget {budget:g}: not applied without the cluster's prices")
        return CostMeter(SweepPrices(), cpus)
    node_cpus = ray_cpus()
    nodes = {ip: NodeRate(t, rate, node_cpus.get(ip, 0.0)) for ip, (t, rate) in first.nodes.items()}
    return CostMeter(SweepPrices(first.currency, nodes, look_up, first.source), cpus, budget)


def finish(
    session: Session,
    store: ResultStore,
    results: list[TrialResult],
    draw: Callable[[], Path],
    best_line: Callable[[TrialResult], str],
    goal: str = "max",
    meter: CostMeter | None = None,
    unrun: int = 0,
) -> int:
    """Write the final results and the picture, print the table and the best, and the cost; exit 1 if a trial
    failed."""
    try:
        store.write()
        picture = draw()
    except OutputError as e:
        session.error(f"{e.strerror}; the trials' results are in {store.csv_path} as last written")
        return 1
    print(report.table(results, store.param_names, store.value_name))
    b = report.best(results, goal)
    if b:
        print(best_line(b))
    wall = time.monotonic() - session.started
    print(f"wrote {store.csv_path}, {store.json_path}, {picture} in {wall:.1f} s")
    if meter is not None:
        print(meter.line(store.results.values()))
    stopped_by = store.meta.get("stopped_by")
    if stopped_by == "cost" and meter is not None:
        session.say(
            f"the budget of {money(meter.budget, meter.prices.currency)} would have been passed: {max(unrun, 0)} "
            f"trial(s) left unrun; run the same command with a higher --budget to go on"
        )
    if stopped_by == "target":
        session.say("the target was reached: the sweep stopped, the trials still running were cancelled")
    elif stopped_by == "budget":
        session.say("the node-hour budget was spent: the sweep stopped, the trials still running were cancelled")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        session.say(
            f"{len(failed)} of {len(results)} trial(s) failed; their errors are in {store.csv_path}; "
            f"run again with the same --out to retry only those"
        )
        return 1
    return 0
