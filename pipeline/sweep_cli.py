"""python -m pipeline.sweep SWEEP.toml (or `raysweep SWEEP.toml`): sweep any program described in a sweep file.

The file names the program, its arguments with placeholders, the metric, data files, parameters and
the search (grid or random); see examples/ and the README. Everything is checked before any work;
results go to --out (results.csv, results.json, plot.png, trials/<id>/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import report
from pipeline import spec as specmod
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
from pipeline.runner import Previous, ReadMetric, ResultStore, SettingsMismatch, TrialFiles, TrialResult
from pipeline.search import STUDY_FILE, StopRules, make_search

if TYPE_CHECKING:
    from pipeline import progress, tasks

PROG = "raysweep"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("sweep_file", help="the sweep file (TOML), e.g. examples/descent.toml")
    p.add_argument("--out", default=None, help="output directory (default results/<sweep file name>)")
    add_ray_options(p)
    return p


@dataclass
class Checked:
    spec: specmod.SweepSpec
    trials: list[specmod.Trial]
    previous: Previous | None


def validate(args: argparse.Namespace) -> Checked:
    try:
        spec = specmod.load(args.sweep_file)
    except specmod.SpecError as e:
        raise UsageError(str(e) if str(e).startswith(str(args.sweep_file)) else f"{args.sweep_file}: {e}") from None
    trials = spec.trials()
    previous = read_earlier(args, spec.param_names, spec.metric.name, steps=spec.progress is not None)
    if previous is not None:  # all but the fetched data's digests can be compared before Ray starts
        digests = {"data_sha256": previous.settings.get("data_sha256")} if previous.settings else {}  # later
        try:
            ResultStore(args.out, spec.param_names, spec.metric.name, {**spec.settings(), **digests}).check(previous)
        except SettingsMismatch as e:
            raise UsageError(str(e)) from None
    return Checked(spec, trials, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = str(Path("results") / Path(args.sweep_file).stem)
    return main_flow(PROG, args, validate, _run)


def _runtime_env(spec: specmod.SweepSpec) -> dict[str, Any] | None:
    """The program's extra packages, installed by Ray on every node that runs a trial (autoscaled ones too)."""
    return {"pip": {"packages": list(spec.packages)}} if spec.packages else None


def produce_data(spec: specmod.SweepSpec) -> tuple[dict[str, tasks.DataObject], dict[str, str]]:
    """Each data item as a data object in Ray (URLs fetched by one task each, in parallel) and its sha256."""
    from pipeline import datasets, tasks

    objects: dict[str, tasks.DataObject] = {}
    digests: dict[str, str] = {}
    fetches = {}
    for d in spec.data:
        if d.path is not None:
            objects[d.name] = tasks.file(d.path)
            digests[d.name] = d.sha256 or hashlib.sha256(d.path.read_bytes()).hexdigest()
            continue
        argv: list[Any] = ["python3", tasks.blob(datasets.program_bytes("fetch_data.py"), "fetch_data.py")]
        argv += ["--any-file", "--source", d.url, "--out", "file"]
        if d.sha256:
            argv += ["--sha256", d.sha256]
        fetches[d.name] = tasks.Execute(argv, output_paths=["file"], stdout=True, name=f"fetch {d.name}", cpus=0.5)
    for name, t in fetches.items():
        try:
            t.wait()
        except tasks.ExecuteError as e:
            raise UsageError(f"data.{name}: {failed_task_line(e)}") from None
        objects[name] = t.outputs["file"]
        digests[name] = json.loads(t.outputs["stdout"].fetch().get_str().strip().splitlines()[-1])["sha256"]
    return objects, digests


def submitter(spec: specmod.SweepSpec, objects: Mapping[str, tasks.DataObject]):
    """One Execute task per trial: [interpreter] program ARGS, the data at data/<name>; stdout read on the node
    (its last lines and a tail come back, whatever it prints), its progress reports sent to `report_to`."""
    from pipeline import tasks

    program: Any = spec.program
    if spec.program_file is not None:
        program = tasks.blob(spec.program_file.read_bytes(), spec.program_file.name)
    head: list[Any] = [*shlex.split(spec.interpreter or ""), program]
    res = spec.resources
    extra: dict[str, Any] = {"gpus": res.gpus} if res.gpus else {}
    inputs = {d.relpath: objects[d.name] for d in spec.data}
    env = {"OMP_NUM_THREADS": str(max(1, int(res.cpus))), **spec.env}

    watch = tasks.Watch(json_key=spec.metric.key if spec.metric.source == "json-line" else "", progress=spec.progress)

    def submit(trial: specmod.Trial, report_to: progress.ReportTo | None = None) -> tasks.Execute:
        return tasks.Execute(
            [*head, *spec.render_args(trial)],
            watch=watch,
            report_to=report_to,
            input_paths=inputs,
            output_paths=spec.outputs,
            cpus=res.cpus,
            timeout=res.timeout,
            name=f"trial {trial.id}",
            env=env,
            **extra,
        )

    return submit


def reader(spec: specmod.SweepSpec) -> ReadMetric:
    def read(stdout: str, outputs: Mapping[str, bytes]) -> float:
        text = outputs[spec.metric.path].decode("utf-8", "replace") if spec.metric.path in outputs else None
        return spec.metric.read(stdout, text)

    return read


def _run(session: Session, checked: Checked) -> int:
    import ray

    spec, trials = checked.spec, checked.trials
    start_ray(session, f"{len(trials)} trial(s) of {spec.path.name}", _runtime_env(spec))
    try:
        objects, digests = produce_data(spec)
    except UsageError as e:
        session.error(str(e))
        return 2
    settings = {**spec.settings(), "data_sha256": digests}
    steps = spec.progress is not None
    store = ResultStore(session.args.out, spec.param_names, spec.metric.name, settings, [t.id for t in trials], steps)
    if not adopt_earlier(session, store, checked.previous):
        return 2
    store.meta = {
        "sweep_file": str(spec.path),
        "spec": spec.raw,
        "ray_version": ray.__version__,
        "python": sys.version.split()[0],
    }
    res = spec.resources
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    local = not (session.address or session.args.cluster or os.environ.get("RAY_ADDRESS"))  # as ensure_ray decides
    for field, resource, need in (("cpus", "CPU", res.cpus), ("gpus", "GPU", res.gpus)):
        most = max((n.get(resource, 0) for n in nodes), default=0)
        if need and most < need:
            if local:  # a Ray this command started on this machine: no node joins it
                session.error(
                    f"resources.{field} = {need:g} per trial, but the local Ray has {most:g} "
                    f"{resource}s; ask for at most that, or use --local-cpus / --cluster"
                )
                return 2
            session.say(f"warning: no node offers {need:g} {resource}(s) now; trials wait until one joins")
    submit, read = submitter(spec, objects), reader(spec)
    files = TrialFiles(session.args.out, spec.outputs)
    values: dict[str, Sequence[Any]] | None = None
    if spec.kind == "grid":
        values = {p.name: p.values for p in spec.params}

    def draw(results: list[TrialResult]) -> Path:
        title = f"{spec.path.name}: {spec.metric.describe()} ({spec.goal}), {len(results)} trials"
        out = Path(session.args.out) / "plot.png"
        step_name = (spec.progress.step or "report") if spec.progress is not None else None
        return report.plot(
            results, spec.param_names, spec.kind, out, title, spec.metric.name, spec.log_params, values, step_name
        )

    def best_line(b) -> str:
        params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.params.items())
        return f"best ({spec.goal} {spec.metric.name}): trial {b.id} {params} {spec.metric.name}={b.value:.6g}"

    s = spec.search
    finished = {r.id: (r.status, r.value) for r in store.results.values()}
    try:
        search = make_search(s, spec.params, trials, spec.goal, session.args.out, finished, fresh=session.args.fresh)
    except Exception as e:  # e.g. a study.db that is not Optuna's, or one of another sweep
        session.error(f"{Path(session.args.out) / STUDY_FILE}: cannot open it as the sweep's Optuna study ({e})")
        return 2
    concurrency = s.concurrency
    if concurrency is None and s.kind == "tpe":  # the sampler learns from results: no more at once than fit
        concurrency = max(1, int(sum(n.get("CPU", 0) for n in nodes) // res.cpus))
    rules = StopRules(s.target, s.max_trials, concurrency, s.budget_node_hours)
    total = s.trials if s.kind == "tpe" else len(trials)
    total = min(total, s.max_trials) if s.max_trials is not None else total
    hub = None
    if spec.progress is not None:
        from pipeline.progress import ProgressHub

        hub = ProgressHub.start(grace_s=s.grace)
    try:
        return run_and_report(
            session,
            store,
            trials,
            submit,
            res.cpus,
            draw,
            best_line,
            read=read,
            retries=res.retries,
            files=files,
            goal=spec.goal,
            search=search,
            rules=rules,
            hub=hub,
            total=total,
            budget=res.budget,
        )
    finally:
        if hub is not None:
            hub.close()


if __name__ == "__main__":
    sys.exit(main())
