"""Adaptive search as a user runs it (python -m pipeline.sweep), on a local Ray, with a tiny program that prints
known learning curves: which trials are pruned and when, the stop rules, Optuna's study in --out and its resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import spec as S
from tests.conftest import ROOT, run_cli

# a learning curve reaching q after `epochs` epochs, one JSON line per epoch; SIGTERM leaves a marker
CURVE = r"""
import json, os, signal, sys, time
q, epochs, pause = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
state = os.environ["STATE"]
with open(os.path.join(state, "calls.log"), "a") as f:
    f.write(f"{q}\n")
def term(*_):
    open(os.path.join(state, f"term-{q}"), "w").close()
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
for e in range(1, epochs + 1):
    time.sleep(pause / 2 if q > 0.9 else pause)
    print(json.dumps({"epoch": e, "acc": q * e / epochs}), flush=True)
print(json.dumps({"acc": q}))
"""

HEAD = """
program = "curve.py"
metric = { json-line = "acc" }
env = { STATE = "STATE_DIR" }
"""
PROGRESS = 'progress = { json-line = "acc", step = "epoch" }\n'


def sweep_args(tmp, text, program=CURVE):
    """`program` as curve.py and HEAD + `text` as sweep.toml in `tmp`; the arguments after `python` of the sweep
    of them into tmp/out on a local Ray of 2 CPUs."""
    (tmp / "curve.py").write_text(program)
    (tmp / "sweep.toml").write_text(HEAD.replace("STATE_DIR", str(tmp)) + text)
    return ["-m", "pipeline.sweep", str(tmp / "sweep.toml"), "--out", str(tmp / "out"), "--local-cpus", "2"]


def sweep(tmp, text, *extra, program=CURVE, timeout=240):
    return run_cli(*sweep_args(tmp, text, program), *extra, timeout=timeout)


def rows(out):
    with open(out / "results.csv") as f:
        return {r["trial"]: r for r in csv.DictReader(f)}


def study(out):
    import optuna

    return optuna.load_study(study_name="raysweep", storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_asha_prunes_the_trial_behind_at_the_first_rung_and_the_study_opens_with_optuna(tmp_path):
    """One at a time, in the order 0.5, 0.9, 0.3: 0.9 beats 0.5 at every rung and runs on; 0.3 is behind both
    at the first rung (step 1, ASHA with 3 trials and reduction 3 promotes only the best) and is stopped there."""
    text = PROGRESS + 'args = "{q} 9 0.3"\n[params]\nq = [0.5, 0.9, 0.3]\n'
    text += '[search]\nscheduler = "asha"\nmin_step = 1\nconcurrency = 1\n'
    r = sweep(tmp_path, text)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    got = rows(out)
    assert {k: v["status"] for k, v in got.items()} == {"q=0.5": "ok", "q=0.9": "ok", "q=0.3": "pruned"}, got
    assert got["q=0.5"]["step"] == got["q=0.9"]["step"] == "9"
    last = int(got["q=0.3"]["step"])  # what it printed before the SIGTERM reached it: the decision was at step 1
    assert 1 <= last < 9 and float(got["q=0.3"]["acc"]) == pytest.approx(0.3 * last / 9)  # its last value kept
    assert (tmp_path / "term-0.3").exists() and not (tmp_path / "term-0.5").exists()  # SIGTERM, then it exited
    lines = (out / "trials" / "q=0.3" / "progress.csv").read_text().splitlines()
    assert lines[:2] == ["step,value", f"1,{0.3 / 9!r}"] and len(lines) == 1 + last
    doc = json.loads((out / "results.json").read_text())
    assert [len(t["progress"]) for t in doc["trials"]] == [9, 9, last]
    trials = {t.user_attrs["id"]: t for t in study(out).trials}
    assert {k: t.state.name for k, t in trials.items()} == {"q=0.5": "COMPLETE", "q=0.9": "COMPLETE", "q=0.3": "PRUNED"}
    assert list(trials["q=0.3"].intermediate_values) == [1]  # pruned on its first report: the first rung
    assert "done 2, pruned 1, failed 0" in r.stderr
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"

    r2 = sweep(tmp_path, text)  # a resume: nothing left to run, the pruned trial is a result
    assert r2.returncode == 0 and "reusing 3 finished trial(s)" in r2.stderr, r2.stderr[-2000:]
    assert len(study(out).trials) == 3

    changed = text.replace('scheduler = "asha"', 'scheduler = "median"')
    r3 = sweep(tmp_path, changed)
    assert r3.returncode == 2 and "different sweep" in r3.stderr and "--fresh" in r3.stderr, r3.stderr[-2000:]


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_a_trial_that_reached_max_step_is_not_pruned(tmp_path):
    """max_step is where the scheduler's resource ends: with a rung there (min_step = max_step = 3), 0.5 is
    behind 0.9 at it but has had all the steps the search gives, so it is not stopped: it prints its step 4 a
    second later and ends ok with the value it prints last (it was pruned there, a finished trial called pruned)."""
    text = PROGRESS + 'args = "{q} 4 1.0"\n[params]\nq = [0.9, 0.5]\n'
    text += '[search]\nscheduler = "asha"\nmin_step = 3\nmax_step = 3\nconcurrency = 1\n'
    r = sweep(tmp_path, text)
    assert r.returncode == 0, r.stderr[-3000:]
    got = rows(tmp_path / "out")
    assert {k: v["status"] for k, v in got.items()} == {"q=0.9": "ok", "q=0.5": "ok"}, got
    assert float(got["q=0.5"]["acc"]) == 0.5 and not (tmp_path / "term-0.5").exists()  # it ran to its end
    assert {t.user_attrs["id"]: t.state.name for t in study(tmp_path / "out").trials} == {
        "q=0.9": "COMPLETE",
        "q=0.5": "COMPLETE",
    }


# a program that ignores SIGTERM (q < 0.5), with a child in its process group that ignores it too; each run
# first notes whether the process group of an earlier one is still there, and logs every epoch it printed
STUBBORN = r"""
import json, os, signal, subprocess, sys, time
q, epochs, pause = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
state = os.environ["STATE"]
def log(**kw):
    with open(os.path.join(state, f"log-{q}"), "a") as f:
        f.write(json.dumps(kw) + "\n")
for name in sorted(os.listdir(state)):
    if name.startswith("pgid-"):
        try:
            os.killpg(int(open(os.path.join(state, name)).read()), 0)
            log(earlier=name, alive=True)
        except ProcessLookupError:
            log(earlier=name, alive=False)
if q < 0.5:
    signal.signal(signal.SIGTERM, lambda *_: log(term=time.time()))
    subprocess.Popen(["sleep", "600"], preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    with open(os.path.join(state, f"pgid-{q}"), "w") as f:
        f.write(str(os.getpgid(0)))
for e in range(1, epochs + 1):
    time.sleep(pause / 4 if q > 0.85 else pause)
    print(json.dumps({"epoch": e, "acc": q * e / epochs}), flush=True)
    log(epoch=e, t=time.time())
print(json.dumps({"acc": q}))
"""


def test_a_pruned_program_that_ignores_sigterm_is_killed_after_the_grace_period_with_its_process_group(tmp_path):
    """In order, one at a time: 0.9 leads every rung; 0.3 is behind at step 1 and pruned, ignores the SIGTERM
    and prints on until the SIGKILL `grace` (1 s, not the default 5) later ends it and the child of its process
    group; 0.8, behind 0.9 at step 1, finds no process of 0.3's group left when it starts."""
    text = PROGRESS + 'args = "{q} 100 0.1"\n[params]\nq = [0.9, 0.3, 0.8]\n'
    text += '[search]\nscheduler = "asha"\nmin_step = 1\nconcurrency = 1\ngrace = 1\n'
    r = sweep(tmp_path, text, program=STUBBORN)
    assert r.returncode == 0, r.stderr[-3000:]
    got = rows(tmp_path / "out")
    assert {k: v["status"] for k, v in got.items()} == {"q=0.9": "ok", "q=0.3": "pruned", "q=0.8": "pruned"}, got
    log = [json.loads(line) for line in (tmp_path / "log-0.3").read_text().splitlines()]
    terms = [e["term"] for e in log if "term" in e]
    printed = [e for e in log if "epoch" in e]
    assert len(terms) == 1, log  # one SIGTERM, which it ignored
    last = printed[-1]
    assert last["epoch"] < 100, "the pruned program ran to its end: no SIGKILL came"
    lived = last["t"] - terms[0]
    assert 0.5 <= lived < 4, f"the program printed for {lived:.2f} s after SIGTERM; grace = 1 (the default is 5)"
    assert got["q=0.3"]["step"] == str(last["epoch"])  # its last step and value are the last it printed
    assert float(got["q=0.3"]["acc"]) == pytest.approx(0.3 * last["epoch"] / 100)
    lines = (tmp_path / "out" / "trials" / "q=0.3" / "progress.csv").read_text().splitlines()
    assert len(lines) == 1 + last["epoch"]
    later = [json.loads(line) for line in (tmp_path / "log-0.8").read_text().splitlines()]
    assert {"earlier": "pgid-0.3", "alive": False} in later, later  # the group, its sleeping child too, was gone
    assert "done 1, pruned 2, failed 0" in r.stderr


# a learning curve whose values tell its runs apart (run n adds n / 1000), its pid noted for the test
RERUN = r"""
import json, os, sys, time
q, epochs, pause = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
state = os.environ["STATE"]
with open(os.path.join(state, f"runs-{q}"), "a") as f:
    f.write(f"{os.getpid()}\n")
run = len(open(os.path.join(state, f"runs-{q}")).read().split())
for e in range(1, epochs + 1):
    time.sleep(pause)
    print(json.dumps({"epoch": e, "acc": q * e / epochs + run / 1000}), flush=True)
print(json.dumps({"acc": q + run / 1000}))
"""


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_a_crashed_worker_mid_trial_runs_it_again_and_its_progress_starts_over(tmp_path):
    """The Ray worker running trial 0.9 is killed (SIGKILL) after its program printed 3 of 12 epochs: Ray runs
    the task again, and what the sweep keeps of that trial (progress.csv, results.json, its step and value) is
    the second run's alone, from its step 1; the study holds one trial for it, complete."""
    text = PROGRESS + 'args = "{q} 12 0.4"\n[params]\nq = [0.9, 0.5]\n[search]\nscheduler = "asha"\nmin_step = 1\n'
    out = tmp_path / "out"
    argv = [sys.executable, *sweep_args(tmp_path, text, RERUN)]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        runs = tmp_path / "runs-0.9"
        deadline = time.monotonic() + 120
        while not runs.exists():
            assert p.poll() is None and time.monotonic() < deadline, "the sweep never started trial q=0.9"
            time.sleep(0.05)
        program = int(runs.read_text().split()[0])
        worker = parent_pid(program)  # the program runs as a child of the Ray worker running its task
        with open(f"/proc/{worker}/cmdline", "rb") as f:
            assert f.read().startswith(b"ray::_execute_remote"), (
                "the program's parent is not the Ray worker of its task"
            )
        time.sleep(0.4 * 3 + 0.2)  # 3 epochs printed (and reported)
        os.kill(worker, signal.SIGKILL)
        _, err = p.communicate(timeout=240)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0, err.decode()[-3000:]
    assert len(runs.read_text().split()) == 2  # Ray ran the task again
    got = rows(out)
    assert got["q=0.9"]["status"] == "ok" and got["q=0.9"]["attempts"] == "2", got
    assert float(got["q=0.9"]["acc"]) == pytest.approx(0.9 + 0.002)  # the second run's result
    expected = [(e, 0.9 * e / 12 + 0.002) for e in range(1, 13)]
    lines = (out / "trials" / "q=0.9" / "progress.csv").read_text().splitlines()
    assert lines[0] == "step,value" and [(int(s), float(v)) for s, v in (x.split(",") for x in lines[1:])] == [
        (e, pytest.approx(v)) for e, v in expected
    ], lines  # the second run's reports alone, from step 1
    doc = {t["id"]: t for t in json.loads((out / "results.json").read_text())["trials"]}
    assert [tuple(x) for x in doc["q=0.9"]["progress"]] == [(e, pytest.approx(v)) for e, v in expected]
    assert got["q=0.9"]["step"] == "12" and got["q=0.5"]["status"] in ("ok", "pruned")
    trials = [t for t in study(out).trials if t.user_attrs["id"] == "q=0.9"]
    assert len(trials) == 1 and trials[0].state.name == "COMPLETE" and trials[0].value == pytest.approx(0.902)
    assert trials[0].intermediate_values[12] == pytest.approx(0.902)  # judged on the second run past the first's


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_a_reached_target_cancels_the_running_trials_and_ends_with_exit_0(tmp_path):
    """0.95 runs twice as fast as the others and reaches the target while 0.2 still runs; 0.3, 0.4 and 0.5 wait
    in Ray's queue for a slot (no concurrency set: every trial is submitted at once)."""
    text = PROGRESS + 'args = "{q} 9 1.0"\n[params]\nq = [0.95, 0.2, 0.3, 0.4, 0.5]\n[search]\ntarget = 0.9\n'
    r = sweep(tmp_path, text)
    assert r.returncode == 0, r.stderr[-3000:]
    got = rows(tmp_path / "out")
    assert got["q=0.95"]["status"] == "ok"
    assert got["q=0.2"]["status"] == "cancelled" and int(got["q=0.2"]["step"] or 0) < 9, got  # stopped midway
    queued = ("0.3", "0.4", "0.5")
    assert all(got[f"q={q}"]["status"] == "cancelled" for q in queued if f"q={q}" in got), got
    # the queued trials are cancelled without their programs starting; one may have taken 0.95's slot before
    # the sweep saw 0.95's result (it is then stopped as 0.2 is)
    calls = (tmp_path / "calls.log").read_text().split()
    assert len([q for q in queued if q in calls]) <= 1, calls
    assert "the target was reached" in r.stderr


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_tpe_proposes_trials_one_by_one_and_a_resume_continues_its_study(tmp_path):
    text = 'args = "{q} 1 0"\n[params]\nq = { uniform = [0.0, 0.9] }\n[search]\nkind = "tpe"\ntrials = 4\nseed = 3\n'
    r = sweep(tmp_path, text)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(rows(out)) == ["0000", "0001", "0002", "0003"]
    assert [t.state.name for t in study(out).trials] == ["COMPLETE"] * 4
    r2 = sweep(tmp_path, text.replace("trials = 4", "trials = 6"))  # the trial count may grow: a resume
    assert r2.returncode == 0 and "reusing 4 finished trial(s)" in r2.stderr, r2.stderr[-2000:]
    assert sorted(rows(out)) == [f"{i:04d}" for i in range(6)]
    trials = study(out).trials
    assert [t.user_attrs["id"] for t in trials] == [f"{i:04d}" for i in range(6)]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert len((tmp_path / "calls.log").read_text().split()) == 6  # none ran twice


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_kill_9_of_the_driver_then_a_resume_loses_no_trial_and_runs_none_twice(tmp_path):
    text = 'args = "{q} 3 0.5"\n[params]\nq = { uniform = [0.0, 0.9] }\n[search]\nkind = "tpe"\ntrials = 4\n'
    text += "concurrency = 1\n"
    out = tmp_path / "out"
    argv = [sys.executable, *sweep_args(tmp_path, text)]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not ((out / "results.csv").exists() and len(rows(out)) >= 2):
            assert p.poll() is None and time.monotonic() < deadline, "the sweep never finished 2 trials"
            time.sleep(0.1)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
        p.wait()
    time.sleep(2)  # the orphaned local Ray and its running trial end with their driver
    r = run_cli(*argv[1:], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(rows(out)) == ["0000", "0001", "0002", "0003"]
    done = [t for t in study(out).trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["id"] for t in done) == ["0000", "0001", "0002", "0003"]


@pytest.mark.parametrize(
    "text, expect",
    [
        ('[search]\nscheduler = "asha"\n', "search.scheduler = 'asha' needs a progress field"),
        (PROGRESS + '[search]\nscheduler = "asha"\nmin_step = 9\nmax_step = 3\n', "search.min_step: 9 is more than"),
        ('progress = { json-line = "acc", step = 1 }\n', "progress.step: 1 is not valid"),
        ('progress = { regex = "acc (.*)" }\n', "needs a named group (?P<value>"),
        ('progress = { regex = "(?P<value>" }\n', "not a valid regular expression"),
        ('[search]\nkind = "tpe"\n', "search.trials: None is not valid"),
        ('[search]\nkind = "grid"\nsampler = "tpe"\n', "search.sampler: unknown field"),
        ('[search]\nscheduler = "pbt"\n', "search.scheduler: 'pbt' is not valid"),
        ("[search]\nconcurrency = 0\n", "search.concurrency: 0 is not valid"),
        ("[search]\nbudget_node_hours = -1\n", "search.budget_node_hours: -1"),
        ('[search]\ntarget = "high"\n', "search.target: 'high' is not valid"),
        (PROGRESS + "[search]\ngrace = -1\n", "search.grace: -1 is not valid"),
        (PROGRESS + '[search]\ngrace = "5s"\n', "search.grace: '5s' is not valid"),
        ("[search]\ngrace = 2\n", "search.grace: only a trial stopped through its progress reports"),
    ],
)
def test_bad_adaptive_settings_are_refused_in_one_line(tmp_path, text, expect):
    (tmp_path / "curve.py").write_text(CURVE)
    doc = S.tomllib.loads('program = "curve.py"\nargs = "{q} 1 0"\n' + text + "[params]\nq = [0.5]\n")
    with pytest.raises(S.SpecError) as e:
        S.parse(doc, tmp_path)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


# prints a progress line every 0.3 s for 1.5 s; notes when it started and ended
SPAN = r"""
import json, os, sys, time
t0 = time.time()
for e in range(1, 6):
    time.sleep(0.3)
    print(json.dumps({"epoch": e, "acc": e / 10}), flush=True)
with open(os.path.join(os.environ["STATE"], "spans.log"), "a") as f:
    f.write(f"{t0} {time.time()}\n")
print(json.dumps({"acc": 0.5}))
"""


def test_trials_with_progress_run_no_more_at_once_than_the_cpus(tmp_path):
    """Six trials of 1 CPU on a Ray of 2, all submitted at once: never three programs at a time (a trial's task
    that waited in ray.get before its start would lend its CPU to the next one)."""
    text = PROGRESS + 'args = "{i}"\n[params]\ni = [1, 2, 3, 4, 5, 6]\n[search]\nscheduler = "none"\n'
    r = sweep(tmp_path, text, program=SPAN, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    spans = [tuple(map(float, line.split())) for line in (tmp_path / "spans.log").read_text().splitlines()]
    assert len(spans) == 6
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most <= 2, sorted(spans)


def test_a_plain_sweep_is_not_adaptive_and_keeps_its_ids():
    """`grid` and `random` without a scheduler keep their trials and ids (no Optuna, no study.db)."""
    doc = S.tomllib.loads('program = "/bin/true"\n[params]\nq = [1, 2]\n')
    spec = S.parse(doc, ROOT)
    assert spec.progress is None and not spec.search.adaptive
    assert [t.id for t in spec.trials()] == ["q=1", "q=2"]
