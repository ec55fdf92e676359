"""python -m pipeline.sweep SWEEP.toml as a user runs it, on a local Ray with tiny programs."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.support import small_tmpfs

# a trial fails while FAIL exists and x > 0.8; every run is logged
PROG = r"""
import json, os, sys
x, y, seed = float(sys.argv[1]), sys.argv[2], sys.argv[3]
d = os.environ["STATE"]
with open(os.path.join(d, "calls.log"), "a") as f:
    f.write(f"{sys.argv[1]}\n")
if x > 0.8 and os.path.exists(os.path.join(d, "FAIL")):
    sys.exit(f"injected failure at x={x}")
print(json.dumps({"score": x * (2 if y == "b" else 1), "seed": int(seed)}))
"""

SWEEP = """
program = "prog.py"
args = "{x} {y} {trial.seed}"
metric = { json-line = "score" }
goal = "max"
env = { STATE = "STATE_DIR" }
[params]
x = { uniform = [0.0, 1.0] }
y = ["a", "b"]
[search]
kind = "random"
trials = 40
seed = 7
[resources]
cpus = 0.5
timeout = 60
"""


def sweep(*args, timeout=300):
    return run_cli("-m", "pipeline.sweep", *args, "--local-cpus", "2", timeout=timeout)


def rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def lines(text):
    return [l for l in text.splitlines() if l.strip() and "WARNING" not in l]


@pytest.fixture
def project(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "prog.py").write_text(PROG)
    (tmp_path / "sweep.toml").write_text(SWEEP.replace("STATE_DIR", str(state)))
    return tmp_path, state


@pytest.mark.parametrize(
    "text, expect",
    [
        ('program = "prog.py"\nargs = "{x} {z}"\n[params]\nx = [1]\n', "args: {z} names no parameter"),
        ('program = "prog.py"\n[params]\nx = { log-uniform = [0, 1] }\n', "params.x.log-uniform:"),
        ('program = "nope.py"\n[params]\nx = [1]\n', "program: 'nope.py' is not a file"),
        ('program = "prog.py"\nmetric = "acc"\n[params]\nx = [1]\n', "metric: 'acc' is not valid"),
        ('program = "prog.py"\n[params]\nx = [1]\n[resources]\ntimeout = -1\n', "resources.timeout:"),
        ("program = [\n", "not valid TOML"),
    ],
)
def test_a_bad_sweep_file_is_one_line_before_any_work(project, text, expect):
    tmp, _ = project
    f = tmp / "bad.toml"
    f.write_text(text)
    r = sweep(str(f), "--out", str(tmp / "out"), timeout=60)
    assert r.returncode == 2, r.stderr
    got = lines(r.stderr)
    assert len(got) == 1 and got[0].startswith(f"raysweep: error: {f}: ") and expect in got[0], r.stderr
    assert not (tmp / "out").exists()


def test_an_out_directory_of_other_files_is_refused_before_any_work(project):
    """--out names a directory the sweep did not write: its files (a plot.png, a trials/ of the user's) would
    be replaced, so it is refused in one line, with or without --fresh, and nothing in it changes."""
    tmp, _ = project
    out = tmp / "mine"
    (out / "trials" / "x=1").mkdir(parents=True)
    (out / "plot.png").write_text("my picture")
    (out / "trials" / "x=1" / "stdout.txt").write_text("my notes")
    for extra in ([], ["--fresh"]):
        r = sweep(str(tmp / "sweep.toml"), "--out", str(out), *extra, timeout=60)
        got = lines(r.stderr)
        assert r.returncode == 2 and len(got) == 1 and "not the results of a sweep" in got[0], r.stderr
        assert "Ray" not in r.stderr  # refused before Ray started
    assert (out / "plot.png").read_text() == "my picture"
    assert (out / "trials" / "x=1" / "stdout.txt").read_text() == "my notes"
    assert sorted(p.name for p in out.rglob("*")) == ["plot.png", "stdout.txt", "trials", "x=1"]


def test_the_plain_python_example_runs(tmp_path):
    out = tmp_path / "descent"
    r = sweep(str(ROOT / "examples" / "descent.toml"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    got = rows(out)
    assert len(got) == 12 and all(x["status"] == "ok" for x in got)
    assert all(1e-5 <= float(x["lr"]) <= 1e-3 and 0 <= float(x["momentum"]) <= 0.95 for x in got)
    best = min(got, key=lambda x: float(x["loss"]))
    assert f"best (min loss): trial {best['trial']} " in r.stdout
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"{out / 'plot.png'}" in r.stdout
    assert '"loss"' in (out / "trials" / "0000" / "stdout.txt").read_text()
    assert "[12/12] done 12, failed 0" in r.stderr


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_random_search_of_40_failures_resume_and_refusals(project):
    tmp, state = project
    (state / "FAIL").touch()
    out = tmp / "out"
    r = sweep(str(tmp / "sweep.toml"), "--out", str(out))
    assert r.returncode == 1, r.stderr[-3000:]
    first = rows(out)
    assert len(first) == 40 and len({x["trial"] for x in first}) == 40
    failed = {x["trial"] for x in first if x["status"] == "failed"}
    assert failed == {x["trial"] for x in first if float(x["x"]) > 0.8} and 0 < len(failed) < 40
    for x in first:
        assert 0.0 <= float(x["x"]) <= 1.0 and x["y"] in ("a", "b")
        if x["status"] == "ok":
            assert float(x["score"]) == pytest.approx(float(x["x"]) * (2 if x["y"] == "b" else 1))
        else:
            assert "injected failure" in x["error"] and "code 1" in x["error"]
    assert f"{len(failed)} of 40 trial(s) failed" in r.stderr
    assert (out / "plot.png").exists()

    # results.json damaged: resume from the intact results.csv, running only the failed trials
    (state / "FAIL").unlink()
    (state / "calls.log").write_text("")
    doc = (out / "results.json").read_text()
    (out / "results.json").write_text(doc[: len(doc) // 3])
    r2 = sweep(str(tmp / "sweep.toml"), "--out", str(out))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "results.json it is unreadable" in r2.stderr and f"reusing {40 - len(failed)} finished" in r2.stderr
    assert len((state / "calls.log").read_text().splitlines()) == len(failed)
    second = {x["trial"]: x for x in rows(out)}
    assert all(x["status"] == "ok" for x in second.values())
    assert {t: x["score"] for t, x in second.items() if t not in failed} == {
        x["trial"]: x["score"] for x in first if x["trial"] not in failed
    }
    assert json.loads((out / "results.json").read_text())["settings"]["search"] == {"kind": "random", "seed": 7}

    # a different sweep in the same --out is refused before Ray starts
    (tmp / "sweep.toml").write_text((tmp / "sweep.toml").read_text().replace("seed = 7", "seed = 8"))
    r3 = sweep(str(tmp / "sweep.toml"), "--out", str(out), timeout=60)
    assert r3.returncode == 2 and "different sweep" in r3.stderr and "--fresh" in r3.stderr
    assert len(lines(r3.stderr)) == 1, r3.stderr

    # neither results file readable: refused before Ray starts, naming both
    (out / "results.json").write_text("{")
    (out / "results.csv").write_text("trial,x\n")
    r4 = sweep(str(tmp / "sweep.toml"), "--out", str(out), timeout=60)
    assert r4.returncode == 2 and len(lines(r4.stderr)) == 1, r4.stderr
    assert "results.json: it is unreadable" in r4.stderr and "results.csv cannot stand in" in r4.stderr


@pytest.mark.root
def test_a_full_disk_under_out_stops_cleanly(project):
    tmp, _ = project
    with small_tmpfs(tmp, "24k") as mnt:
        r = sweep(str(tmp / "sweep.toml"), "--out", str(mnt / "out"))
        assert r.returncode == 1, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        errors = [l for l in r.stderr.splitlines() if l.startswith("raysweep: error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0] and "resume" in errors[0], r.stderr
        assert [str(p) for p in mnt.rglob("*") if ".tmp-" in p.name] == []
        kept = rows(mnt / "out")  # what was written is whole
        assert 0 < len(kept) < 40 and all(x["status"] == "ok" for x in kept)


GPU_DRIVER = """
import sys, ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
from pipeline.sweep_cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_trial_asking_for_a_gpu_gets_one_from_rays_accounting(tmp_path):
    import inspect

    from pipeline import tasks

    if "gpus" not in inspect.signature(tasks.Execute).parameters:
        pytest.skip("tasks.Execute(gpus=N) is not in this tree yet")
    (tmp_path / "gpu.py").write_text('import os\nprint(len(os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")))\n')
    (tmp_path / "gpu.toml").write_text(
        'program = "gpu.py"\nargs = "{i}"\n[params]\ni = [1, 2]\n[resources]\ncpus = 0.5\ngpus = 1\n'
    )
    (tmp_path / "driver.py").write_text(GPU_DRIVER)
    out = tmp_path / "out"
    r = run_cli(str(tmp_path / "driver.py"), str(tmp_path / "gpu.toml"), "--out", str(out), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["value"] for x in rows(out)] == ["1.0", "1.0"]  # each saw one device


def _wheel(directory, name: str, version: str, module_source: str):
    """A minimal pure-Python wheel (PEP 427) of one module, built by hand: no build backend, no network."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{name.replace('-', '_')}.py": module_source,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            data = text.encode()
            z.writestr(arc, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(data)}")
        record.append(f"{dist}.dist-info/RECORD,,")
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.mark.slow  # Ray clones the whole Python environment (2.3 GB) for the trials' packages
def test_the_programs_own_packages_are_installed_for_its_trials(tmp_path):
    """`packages` in the sweep file: Ray installs them (runtime_env pip) where the trials run; here from a
    local folder of wheels (PIP_NO_INDEX / PIP_FIND_LINKS reach pip through Ray's runtime-env agent).
    Ray builds them into a clone of this whole environment (2.3 GB with TensorFlow) in its session
    directory, which it keeps after the session: a local sweep removes that copy when it ends."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tag = tmp_path.name[-8:]
    _wheel(wheels, "raysweep-probe-pkg", "1.0", f"TAG = {tag!r}\n")
    (tmp_path / "prog.py").write_text(
        "import json, sys, raysweep_probe_pkg\n"
        "print(json.dumps({'score': float(sys.argv[1]), 'tag': raysweep_probe_pkg.TAG}))\n"
    )
    (tmp_path / "sweep.toml").write_text(
        'program = "prog.py"\nargs = "{x}"\nmetric = { json-line = "score" }\npackages = ["raysweep-probe-pkg==1.0"]\n'
        "[params]\nx = [1, 2]\n[resources]\ncpus = 1\ntimeout = 120\n"
    )
    out = tmp_path / "out"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    try:
        env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "RAY_TMPDIR": str(ray_tmp)}
        r = run_cli("-m", "pipeline.sweep", str(tmp_path / "sweep.toml"), "--out", str(out), "--local-cpus", "2",
                    timeout=600, env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        got = rows(out)
        assert [x["status"] for x in got] == ["ok", "ok"], got
        for x in got:
            assert f'"tag": "{tag}"' in (out / "trials" / x["trial"] / "stdout.txt").read_text()
        assert list(ray_tmp.glob("ray/session_*/logs")), "the sweep's Ray session was not under RAY_TMPDIR"
        kept = list(ray_tmp.glob("ray/session_*/runtime_resources/pip/*"))
        assert not kept, f"the packages' environment was left behind: {kept}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_local_sweep_leaves_no_task_directories_behind(project):
    """The workers of the local Ray a sweep starts make their task directories (and some ahead) under
    PIPELINE_SANDBOX_DIR; they are killed when Ray stops, before they can remove them: the sweep does."""
    tmp, _ = project
    sandbox = tmp / "sandbox"
    sandbox.mkdir()
    (tmp / "sweep.toml").write_text((tmp / "sweep.toml").read_text().replace("trials = 40", "trials = 4"))
    r = run_cli("-m", "pipeline.sweep", str(tmp / "sweep.toml"), "--out", str(tmp / "out"), "--local-cpus", "2",
                timeout=300, env={"PIPELINE_SANDBOX_DIR": str(sandbox)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(rows(tmp / "out")) == 4
    left = sorted(p.name for p in sandbox.iterdir())
    assert not left, f"task directories left behind: {left}"


def test_cluster_config_without_a_cluster_is_refused(project):
    tmp, _ = project
    r = sweep(str(tmp / "sweep.toml"), "--out", str(tmp / "out"), "--cluster-config", "cluster.toml", timeout=60)
    got = lines(r.stderr)
    assert r.returncode == 2 and len(got) == 1 and "--cluster-config applies only with --cluster" in got[0], r.stderr


def _children_named(pid: int, names: tuple[str, ...]) -> bool:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if int(rest[1]) == pid and comm.startswith(names):
                return True
    return False


def test_ctrl_c_while_ray_starts_is_one_line_and_exit_130(project):
    """Ctrl-C as the local Ray is starting (its raylet is up, ray.init is not done or just done) ends the
    sweep with exit 130 and no traceback."""
    tmp, _ = project
    (tmp / "slow.toml").write_text('program = "/bin/sleep"\nargs = "{x}"\n[params]\nx = [30]\n')
    code = "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    code += "sys.argv = ['pipeline.sweep', *sys.argv[1:]]; runpy.run_module('pipeline.sweep', run_name='__main__')"
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp / "slow.toml"), "--out", str(tmp / "out"), "--local-cpus", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _children_named(p.pid, ("raylet", "gcs_server")):
            assert p.poll() is None and time.monotonic() < deadline, "the sweep never started a local Ray"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err and "interrupted" in err, err[-3000:]


def test_trials_bigger_than_the_local_ray_are_refused_instead_of_waiting_forever(project):
    tmp, _ = project
    (tmp / "big.toml").write_text('program = "/bin/true"\n[params]\nx = [1]\n[resources]\ncpus = 4\n')
    r = sweep(str(tmp / "big.toml"), "--out", str(tmp / "out"), timeout=120)  # --local-cpus 2
    got = [l for l in lines(r.stderr) if not l.startswith("Ray ")]
    assert r.returncode == 2 and len(got) == 1, r.stderr[-3000:]
    assert "resources.cpus = 4" in got[0] and "2 CPUs" in got[0], got


NO_AUTO_INIT = """
import sys
import ray
from pipeline import runner, tasks
from pipeline.spec import Trial

tasks.ensure_ray(num_cpus=1)
trials = [Trial("a", {"x": 1}), Trial("b", {"x": 2})]

def submit(trial):
    return tasks.Execute(["true"] if trial.id == "a" else ["sleep", "30"], stdout=True)

def read(stdout, outputs):  # the connection is lost as the first trial ends, the other still running
    ray.shutdown()
    raise ConnectionError("lost")

store = runner.ResultStore(sys.argv[1], ["x"], "value", {})
try:
    runner.run_trials(trials, submit, store, read=read, poll_s=0.2)
except ConnectionError:
    print("lost")
print("started a Ray:", ray.is_initialized())
"""


def test_a_ray_call_after_the_connection_is_gone_does_not_start_a_local_ray(project):
    """Ray starts a whole local Ray (dashboard and all) for some calls made while not connected: in the CLIs,
    cancelling the running trials after the cluster's connection was lost did so, on the user's machine, at
    the end of a sweep that had already failed."""
    tmp, _ = project
    r = run_cli("-c", NO_AUTO_INIT, str(tmp / "out"), timeout=120)
    assert r.returncode == 0 and "started a Ray: False" in r.stdout, r.stdout + r.stderr[-2000:]
