"""python -m pipeline.mnist as a user runs it: bad options, then real sweeps on mnist-5k."""

import csv
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, free_port, run_cli


@pytest.fixture(scope="module")
def npz_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    (d / "garbage.npz").write_bytes(b"not a zip file")
    np.savez(d / "lacks.npz", x_train=np.zeros((2, 28, 28)), y_train=np.zeros(2))
    return d


def refusal(r):
    """The one line a refused run printed: it exited 2 and printed nothing else."""
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def sweep_2x2(out, *extra):
    """`python -m pipeline.mnist` on the 2 x 2 grid size 32, 64 x dropout 0.0, 0.4 of mnist-5k into `out`."""
    grid = ["--sizes", "32,64", "--dropouts", "0.0,0.4"]
    return ["-m", "pipeline.mnist", "--data", "mnist-5k", *grid, "--out", str(out), *extra]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--sizes", ""], "--sizes is empty"),
        (["--dropouts", ","], "--dropouts is empty"),
        (["--sizes", "32,0"], "must be > 0"),
        (["--sizes", "32,x"], "comma-separated whole numbers"),
        (["--dropouts", "0.2,1.0"], "outside [0, 1)"),
        (["--dropouts", "-0.1"], "outside [0, 1)"),
        (["--epochs", "0"], "--epochs 0"),
        (["--data", "/no/such/file.npz"], "no such file"),
        (["--data", "{npz}/garbage.npz"], "not a readable npz"),
        (["--data", "{npz}/lacks.npz"], "lacks x_test, y_test"),
        (["--address", "127.0.0.1:{port}"], "cannot reach Ray"),
        (["--program", "relative/train.py"], "give an absolute path"),
        (["--local-cpus", "0"], "--local-cpus"),
        (["--address", "127.0.0.1:1", "--cluster", "x"], "not both"),
    ],
)
def test_bad_options_one_line_before_any_work(args, expect, npz_files, tmp_path):
    args = [a.format(npz=npz_files, port=free_port()) for a in args]
    t0 = time.monotonic()
    r = run_cli("-m", "pipeline.mnist", "--out", str(tmp_path / "out"), *args, timeout=120)
    line = refusal(r)
    assert line.startswith("pipeline.mnist: error:") and expect in line, line
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - t0 < 60  # refused before Ray or training started


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.tensorflow
def test_sweep_2x2_on_mnist_5k(tmp_path):
    out = tmp_path / "res"
    r = run_cli(*sweep_2x2(out, "--seed", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_csv(out / "results.csv")
    assert [(int(x["size"]), float(x["dropout"])) for x in rows] == [(32, 0.0), (32, 0.4), (64, 0.0), (64, 0.4)]
    for x in rows:
        assert x["status"] == "ok" and 0.6 < float(x["accuracy"]) <= 1.0 and x["node"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["dataset"] == "mnist-5k" and doc["ray_version"] and doc["wall_seconds"] > 0
    assert doc["train_images"] == 4000 and doc["test_images"] == 1000
    png = (out / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "best: size=" in r.stdout
    assert "[4/4] done 4, failed 0" in r.stderr


@pytest.mark.tensorflow
def test_the_program_prints_a_validation_line_per_epoch_then_the_test_accuracy(tmp_path):
    data = tmp_path / "mnist-5k.npz"
    fetch = [sys.executable, str(ROOT / "pipeline/programs/fetch_data.py"), "--source", "mnist-5k", "--out", str(data)]
    subprocess.run(fetch, check=True, capture_output=True)
    prog = [sys.executable, str(ROOT / "pipeline/programs/mnist.py"), "--data", str(data), "--size", "32"]
    r = subprocess.run(
        [*prog, "--dropout", "0.2", "--epochs", "2", "--lr", "0.003", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    *epochs, last = r.stdout.splitlines()
    docs = [json.loads(l) for l in epochs]
    assert [d["epoch"] for d in docs] == [1, 2] and all(0.5 < d["val_accuracy"] <= 1 for d in docs), epochs
    assert 0.5 < float(last) <= 1
    bad = subprocess.run([*prog, "--dropout", "0.2", "--lr", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lr: must be a number > 0" in bad.stderr


# Stands in for the training program (the preset's bookkeeping is under test, not TensorFlow: the 2x2 sweep
# above runs the real one): the preset's command line in, an accuracy of its own out, size 64 failing while
# the flag file exists.
FLAKY_PROGRAM = """
import json, os, sys
size = sys.argv[sys.argv.index("--size") + 1]
dropout = sys.argv[sys.argv.index("--dropout") + 1]
assert os.path.getsize(sys.argv[sys.argv.index("--data") + 1]) > 0
with open({log!r}, "a") as f:
    f.write(size + " " + dropout + "\\n")
if size == "64" and os.path.exists({flag!r}):
    sys.stderr.write("injected failure for size 64\\n")
    sys.exit(3)
print(json.dumps({{"epoch": 1, "val_accuracy": 0.5}}))
print(round(0.9 - float(dropout) / 10 + int(size) / 10000, 4))
"""


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_failure_isolated_then_resume_runs_only_the_failed(tmp_path):
    log, flag = tmp_path / "calls.log", tmp_path / "fail-64"
    flag.touch()
    prog = tmp_path / "train.py"
    prog.write_text(FLAKY_PROGRAM.format(log=str(log), flag=str(flag)))
    out = tmp_path / "res"
    common = sweep_2x2(out, "--program", str(prog))
    r = run_cli(*common)
    assert r.returncode == 1, r.stderr[-3000:]
    rows = {(x["size"], x["dropout"]): x for x in read_csv(out / "results.csv")}
    assert [rows[("32", d)]["status"] for d in ("0.0", "0.4")] == ["ok", "ok"]
    for d in ("0.0", "0.4"):
        bad = rows[("64", d)]
        assert bad["status"] == "failed" and "code 3" in bad["error"] and "injected failure" in bad["error"]
    assert (out / "heatmap.png").exists()
    assert "2 of 4 trial(s) failed" in r.stderr
    first_ok = {k: v["accuracy"] for k, v in rows.items() if v["status"] == "ok"}

    flag.unlink()
    log.write_text("")
    r2 = run_cli(*common)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert sorted(log.read_text().split("\n")[:-1]) == ["64 0.0", "64 0.4"]  # only the failed ones ran
    rows2 = {(x["size"], x["dropout"]): x for x in read_csv(out / "results.csv")}
    assert all(x["status"] == "ok" for x in rows2.values())
    assert {k: rows2[k]["accuracy"] for k in first_ok} == first_ok
    assert "reusing 2 finished trial(s)" in r2.stderr

    r3 = run_cli(*common, "--epochs", "2", timeout=120)
    assert r3.returncode == 2 and "different sweep" in r3.stderr and "--fresh" in r3.stderr


def test_missing_data_file_is_named_once(tmp_path):
    r = run_cli("-m", "pipeline.mnist", "--out", str(tmp_path / "out"), "--data", "/no/such.npz", timeout=120)
    line = refusal(r)
    assert line.startswith("pipeline.mnist: error: --data '/no/such.npz': no such file;")
    assert line.count("--data") == 1, line


def test_unreadable_results_are_refused_before_ray_starts(tmp_path):
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=np.zeros((4, 28, 28)), y_train=np.zeros(4), x_test=np.zeros((2, 28, 28)), y_test=np.zeros(2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"settings": {"dataset"')  # cut short, and no results.csv
    r = run_cli("-m", "pipeline.mnist", "--out", str(out), "--data", str(data), timeout=120)
    line = refusal(r)  # one line: nothing from Ray, it was never started
    assert "results.json: it is unreadable" in line and "--fresh" in line


@pytest.mark.tensorflow
def test_the_mnist_sweep_file_example(tmp_path):
    """examples/mnist.toml, on a 2 x 1 grid of mnist-5k: the same program and results through a sweep file."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipeline/programs/fetch_data.py"),
            "--source",
            "mnist-5k",
            "--out",
            str(tmp_path / "mnist-5k.npz"),
        ],
        check=True,
        capture_output=True,
    )
    text = (ROOT / "examples" / "mnist.toml").read_text()
    text = text.replace('"../pipeline/programs/mnist.py"', f'"{ROOT / "pipeline/programs/mnist.py"}"')
    text = text.replace("size = [32, 64, 128, 256]", "size = [32, 64]").replace(
        "dropout = [0.0, 0.2, 0.4, 0.6, 0.8]", "dropout = [0.2]"
    )
    assert 'program = "/' in text and "size = [32, 64]" in text
    (tmp_path / "mnist.toml").write_text(text)
    out = tmp_path / "res"
    r = run_cli("-m", "pipeline.sweep", str(tmp_path / "mnist.toml"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_csv(out / "results.csv")
    assert [(x["size"], x["dropout"]) for x in rows] == [("32", "0.2"), ("64", "0.2")]
    assert all(x["status"] == "ok" and 0.6 < float(x["value"]) <= 1.0 for x in rows)
    assert (out / "plot.png").exists()


CLUSTER_RUN = """
import os, sys
from pipeline import {module}
rc = {module}.main({argv!r})
print("RESULT", rc, "ray" in sys.modules, os.environ.get("RAY_AUTH_MODE"))
"""


@pytest.mark.parametrize("module", ["mnist", "sweep_cli"])
def test_a_cluster_run_sets_token_auth_before_ray_is_imported(module, tmp_path):
    """Ray reads RAY_AUTH_MODE once, when first imported: for --cluster, connect_cluster (cloud.ray_auth) sets
    it, so nothing before it may import Ray. Here the cluster does not exist: the run stops at connecting."""
    sweep_file = ROOT / "examples" / "descent.toml"
    argv = {"mnist": ["--data", "mnist-5k"], "sweep_cli": [str(sweep_file)]}[module]
    argv += ["--cluster", "nosuch", "--out", str(tmp_path / "out")]
    env = {"RAYSWEEP_STATE_DIR": str(tmp_path / "state"), "RAY_AUTH_MODE": ""}
    r = run_cli("-c", CLUSTER_RUN.format(module=module, argv=argv), timeout=120, env=env)
    assert "--cluster 'nosuch'" in r.stderr, r.stdout + r.stderr
    [result] = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert result == "RESULT 2 False token", result


@pytest.mark.tensorflow
def test_the_mnist_asha_example(tmp_path):
    """examples/mnist-asha.toml, cut to 4 trials of 3 epochs two at a time: TPE and ASHA on the real program; each
    trial reports its epochs, the study opens with Optuna, the plot has the learning curves."""
    import optuna

    data = tmp_path / "mnist-5k.npz"
    fetch = [sys.executable, str(ROOT / "pipeline/programs/fetch_data.py"), "--source", "mnist-5k", "--out", str(data)]
    subprocess.run(fetch, check=True, capture_output=True)
    text = (ROOT / "examples" / "mnist-asha.toml").read_text()
    for a, b in [
        ('"../pipeline/programs/mnist.py"', f'"{ROOT / "pipeline/programs/mnist.py"}"'),
        ('"mnist-5k.npz"', f'"{data}"'),
        ("--epochs 9", "--epochs 3"),
        ("trials = 24", "trials = 4\nconcurrency = 2"),
        ("max_step = 9", "max_step = 3"),
    ]:
        assert a in text, a
        text = text.replace(a, b)
    (tmp_path / "asha.toml").write_text(text)
    out = tmp_path / "res"
    r = run_cli("-m", "pipeline.sweep", str(tmp_path / "asha.toml"), "--out", str(out), "--local-cpus", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_csv(out / "results.csv")
    assert [x["trial"] for x in rows] == ["0000", "0001", "0002", "0003"]
    statuses = [x["status"] for x in rows]
    assert set(statuses) <= {"ok", "pruned"} and "ok" in statuses, statuses  # which: the order trials end decides
    for x in rows:
        steps = (out / "trials" / x["trial"] / "progress.csv").read_text().splitlines()[1:]
        assert [int(s.split(",")[0]) for s in steps] == list(range(1, int(x["step"]) + 1))
        assert 0.5 < float(x["val_accuracy"]) <= 1
    study = optuna.load_study(study_name="raysweep", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 4 and study.best_value == max(
        float(x["val_accuracy"]) for x in rows if x["status"] == "ok"
    )
    assert (out / "plot.png").stat().st_size > 10_000
