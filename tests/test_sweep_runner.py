"""pipeline.runner on a local Ray with a tiny program: failure isolation, retries, resume, settings
mismatch, metric reading, trial files, a damaged results.json, a full disk."""

import json
import sys

import pytest

from pipeline import spec as S
from pipeline.runner import (
    OutputError,
    ResultStore,
    SettingsMismatch,
    TrialFiles,
    TrialResult,
    read_previous,
    run_trials,
)
from tests.support import small_tmpfs

# x=3 fails while FAIL exists; every run is logged; y=="once" fails on its first run only
PROG = r"""
import json, os, sys
x, y = sys.argv[1], sys.argv[2]
d = os.environ["STATE"]
with open(os.path.join(d, "calls.log"), "a") as f:
    f.write(f"{x} {y}\n")
if x == "3" and os.path.exists(os.path.join(d, "FAIL")):
    sys.stderr.write("injected failure for x=3\n")
    sys.exit(3)
marker = os.path.join(d, f"ran-{x}")
if y == "once" and not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit("first run fails")
if y == "missing":
    import raysweep_no_such_module
if y == "garbage":
    print("no number here")
    sys.exit(0)
print("log line")
sys.stderr.write(f"warning for x={x}\n")
print(json.dumps({"score": int(x) * 10}))
"""


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


def make_submit(state):
    from pipeline import tasks

    prog = tasks.blob(PROG, "prog.py")

    def submit(trial):
        p = trial.params
        return tasks.Execute(
            ["python3", prog, str(p["x"]), str(p["y"])], stdout=True, name=f"t {trial.id}", env={"STATE": str(state)}
        )

    return submit


def trials(xs, y="a"):
    return [S.Trial(S.grid_id({"x": x, "y": y}), {"x": x, "y": y}) for x in xs]


def read_score(stdout, outputs):
    return S.Metric("json-line", key="score").read(stdout)


def calls(state):
    p = state / "calls.log"
    return sorted(p.read_text().splitlines()) if p.exists() else []


def test_failure_is_isolated_recorded_and_resume_runs_only_it(ray_local, state, tmp_path):
    (state / "FAIL").touch()
    out = tmp_path / "out"
    ts = trials([1, 2, 3, 4])
    store = ResultStore(out, ["x", "y"], "score", {"v": 1}, [t.id for t in ts])
    results = run_trials(ts, make_submit(state), store, read=read_score, files=TrialFiles(out), poll_s=0.2)
    by = {r.params["x"]: r for r in results}
    assert [by[x].status for x in (1, 2, 3, 4)] == ["ok", "ok", "failed", "ok"]
    assert [by[x].value for x in (1, 2, 4)] == [10.0, 20.0, 40.0]
    assert "code 3" in by[3].error and "injected failure for x=3" in by[3].error
    assert (out / "trials" / ts[2].id / "stderr.txt").read_text().strip() == "injected failure for x=3"
    assert (out / "trials" / ts[0].id / "stdout.txt").read_text() == 'log line\n{"score": 10}\n'
    assert (out / "trials" / ts[0].id / "stderr.txt").read_text() == "warning for x=1\n"  # a success's too
    doc = json.loads((out / "results.json").read_text())
    assert [t["id"] for t in doc["trials"]] == [t.id for t in ts]  # in the search's order
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "trial,x,y,score,status,seconds,node,attempts,retries,error"

    (state / "FAIL").unlink()
    (state / "calls.log").unlink()
    store2 = ResultStore(out, ["x", "y"], "score", {"v": 1}, [t.id for t in ts])
    assert store2.load_previous() == 3
    results2 = run_trials(ts, make_submit(state), store2, read=read_score, poll_s=0.2)
    assert calls(state) == ["3 a"]
    assert all(r.status == "ok" for r in results2)
    assert {r.params["x"]: r.value for r in results2} == {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0}

    other = ResultStore(out, ["x", "y"], "score", {"v": 2}, [])
    with pytest.raises(SettingsMismatch, match=r"different sweep \(v 1 there vs 2 now\); use --fresh"):
        other.load_previous()
    gone = ResultStore(out, ["x", "y"], "score", {}, [])  # a field removed from the sweep file is a change too
    with pytest.raises(SettingsMismatch, match=r"different sweep \(v 1 there vs None now\)"):
        gone.load_previous()


def test_retries_rerun_program_failures_and_bad_output_fails(ray_local, state, tmp_path):
    ts = trials([5], y="once") + trials([6], y="garbage") + trials([7], y="once")
    store = ResultStore(tmp_path / "out", ["x", "y"], "score", {}, [t.id for t in ts])
    by = {
        r.params["x"]: r for r in run_trials(ts[:2], make_submit(state), store, read=read_score, retries=1, poll_s=0.2)
    }
    assert by[5].status == "ok" and by[5].value == 50.0 and by[5].retries == 1 and by[5].attempts == 1
    assert by[6].status == "failed" and by[6].error.startswith("bad output: no JSON line") and by[6].retries == 0
    assert calls(state) == ["5 once", "5 once", "6 garbage"]
    r7 = run_trials(ts[2:], make_submit(state), store, read=read_score, retries=0, poll_s=0.2)[0]
    assert r7.status == "failed" and "first run fails" in r7.error


def test_a_missing_module_is_the_trials_error(ray_local, state, tmp_path):
    out = tmp_path / "out"
    ts = trials([8], y="missing")
    store = ResultStore(out, ["x", "y"], "score", {}, [t.id for t in ts])
    r = run_trials(ts, make_submit(state), store, read=read_score, files=TrialFiles(out), poll_s=0.2)[0]
    assert r.status == "failed" and "ModuleNotFoundError" in r.error and "code 1" in r.error
    assert "raysweep_no_such_module" in (out / "trials" / ts[0].id / "stderr.txt").read_text()


def test_damaged_results_json_falls_back_to_an_intact_csv(tmp_path):
    out = tmp_path / "out"
    store = ResultStore(out, ["x", "y"], "score", {"v": 1})
    store.record(TrialResult({"x": 1, "y": "a"}, "ok", value=10.0, seconds=0.1, node="n", id="t1"))
    store.record(TrialResult({"x": 2.5, "y": "b"}, "failed", error="boom,\nwith lines", id="t2"))
    text = store.json_path.read_text()
    store.json_path.write_text(text[: len(text) // 2])
    prev = read_previous(out, ["x", "y"], "score")
    assert prev is not None and prev.settings is None and "results.csv" in prev.note
    assert [(t.id, t.params, t.status, t.value) for t in prev.trials] == [
        ("t1", {"x": 1, "y": "a"}, "ok", 10.0),
        ("t2", {"x": 2.5, "y": "b"}, "failed", None),
    ]
    assert ResultStore(out, ["x", "y"], "score", {"v": 1}).adopt(prev) == 1
    csv_text = store.csv_path.read_text()
    store.csv_path.write_text(csv_text[: len(csv_text) - 20])
    with pytest.raises(SettingsMismatch, match="results.json: it is unreadable.*cannot stand in"):
        read_previous(out, ["x", "y"], "score")
    assert read_previous(tmp_path / "none", ["x"], "score") is None


@pytest.fixture
def full_disk(tmp_path):
    with small_tmpfs(tmp_path) as mnt:
        yield mnt


@pytest.mark.root
def test_a_full_disk_is_one_clean_error_and_leaves_no_temp_file(full_disk):
    store = ResultStore(full_disk / "out", ["x"], "score", {"pad": "p" * 2000})
    with pytest.raises(OutputError) as e:
        for i in range(200):
            store.record(TrialResult({"x": i}, "ok", value=float(i), error="e" * 100, id=f"{i:04d}"))
    assert "No space left on device" in str(e.value) and "results." in str(e.value)
    assert [p.name for p in (full_disk / "out").iterdir() if ".tmp-" in p.name] == []
    doc = json.loads(store.json_path.read_text())  # what was written last is whole
    assert doc["trials"] and doc["trials"][-1]["id"] < f"{i:04d}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


FILE_PROG = r"""
import json, sys
data = open(sys.argv[1]).read()
with open("metrics.json", "w") as f:
    json.dump({"acc": len(data) * float(sys.argv[2])}, f)
with open("model.txt", "w") as f:
    f.write("weights " + sys.argv[2])
"""


@pytest.fixture
def served(tmp_path):
    """A file served over HTTP on 127.0.0.1 (a thread of this process)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    (root / "train.txt").write_text("0123456789")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_data_file_metric_and_outputs_kept(ray_local, served, tmp_path):
    import hashlib

    from pipeline.cli_common import UsageError
    from pipeline.sweep_cli import produce_data, reader, submitter

    (tmp_path / "prog.py").write_text(FILE_PROG)
    sha = hashlib.sha256(b"0123456789").hexdigest()
    text = (
        'program = "prog.py"\nargs = "{data.train} {w}"\noutputs = ["model.txt"]\n'
        'metric = { file = "metrics.json", key = "acc" }\n'
        f'[data]\ntrain = {{ url = "{served}/train.txt", sha256 = "{sha}" }}\n[params]\nw = [0.5, 2]\n'
    )
    (tmp_path / "s.toml").write_text(text)
    spec = S.load(tmp_path / "s.toml")
    assert spec.outputs == ("model.txt", "metrics.json") and spec.data[0].relpath == "data/train.txt"
    objects, digests = produce_data(spec)
    assert digests == {"train": sha}
    out = tmp_path / "out"
    ts = spec.trials()
    store = ResultStore(out, spec.param_names, spec.metric.name, {}, [t.id for t in ts])
    results = run_trials(ts, submitter(spec, objects), store, read=reader(spec), files=TrialFiles(out), poll_s=0.2)
    assert [(r.status, r.value) for r in results] == [("ok", 5.0), ("ok", 20.0)]
    assert (out / "trials" / "w=2" / "model.txt").read_text() == "weights 2"
    assert json.loads((out / "trials" / "w=0.5" / "metrics.json").read_text()) == {"acc": 5.0}

    (tmp_path / "s.toml").write_text(text.replace(sha, "0" * 64))
    with pytest.raises(UsageError, match="data.train: .*has sha256 .*expected 0000"):
        produce_data(S.load(tmp_path / "s.toml"))


def test_trial_files_hold_the_last_attempt_only(tmp_path):
    """A trial run again (a retry, or a resume of a failed one) leaves no file of the attempt before: no
    stale stderr.txt beside a success, no earlier output beside a failure; other files are not touched."""
    files = TrialFiles(tmp_path, outputs=["m.json", "sub/o.txt"])
    d = files.keep("x=1", b"first\n", {"m.json": b"1", "sub/o.txt": b"o"}, stderr="boom")
    (d / "notes.txt").write_text("mine")
    files.keep("x=1", None, {}, stderr="failed again")  # a failure: no stdout, no outputs
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == ["notes.txt", "stderr.txt"]
    files.keep("x=1", b"second\n", {"m.json": b"2"})  # a success that wrote nothing on stderr
    assert (d / "stdout.txt").read_text() == "second\n" and (d / "m.json").read_text() == "2"
    assert not (d / "stderr.txt").exists() and (d / "notes.txt").read_text() == "mine"
