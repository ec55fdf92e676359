"""A malformed npz is refused in one line before any trial runs: shapes, dtypes, label range, sizes."""

import functools
import http.server
import subprocess
import sys
import threading

import numpy as np
import pytest

from pipeline import datasets
from pipeline.programs import fetch_data
from tests.conftest import ROOT, run_cli

N_TRAIN, N_TEST = 12, 5


def _arrays(**override):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    arrays.update(override)
    return arrays


BAD = {
    "x-not-images": ({"x_train": np.zeros(N_TRAIN, dtype=np.uint8)}, "x_train"),
    "x-string-dtype": ({"x_train": np.full((N_TRAIN, 28, 28), "a")}, "x_train"),
    "x-object-free-but-complex": ({"x_test": np.zeros((N_TEST, 28, 28), dtype=np.complex64)}, "x_test"),
    "y-string-dtype": ({"y_train": np.array(["3"] * N_TRAIN)}, "y_train"),
    "y-two-dims": ({"y_test": np.zeros((N_TEST, 1), dtype=np.uint8)}, "y_test"),
    "label-ten": ({"y_train": np.full(N_TRAIN, 10, dtype=np.int64)}, "y_train"),
    "label-negative": ({"y_test": np.full(N_TEST, -1, dtype=np.int64)}, "y_test"),
    "label-fraction": ({"y_train": np.full(N_TRAIN, 0.5)}, "y_train"),
    "train-test-image-shapes-differ": ({"x_test": np.zeros((N_TEST, 32, 32), dtype=np.uint8)}, "x_test"),
    "images-labels-count-differ": ({"y_train": np.zeros(N_TRAIN - 1, dtype=np.uint8)}, "y_train"),
    "no-test-images": (
        {"x_test": np.zeros((0, 28, 28), dtype=np.uint8), "y_test": np.zeros(0, dtype=np.uint8)},
        "x_test",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_npz_refused_in_one_line_naming_the_array(tmp_path, case):
    override, array = BAD[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **_arrays(**override))
    with pytest.raises(ValueError) as ei:
        datasets.plan(str(path))
    msg = str(ei.value)
    assert "\n" not in msg and array in msg, msg


def test_good_npz_accepted_with_float_labels_that_are_whole(tmp_path):
    path = tmp_path / "good.npz"
    np.savez(path, **_arrays(y_test=np.arange(N_TEST, dtype=np.float32)))
    assert datasets.plan(str(path)).local
    assert fetch_data.check_npz(str(path)) == (N_TRAIN, N_TEST)


def test_cli_refuses_bad_data_before_starting_anything(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, **_arrays(y_train=np.full(N_TRAIN, 10, dtype=np.int64)))
    r = run_cli("-m", "pipeline.mnist", "--data", str(path), "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "y_train" in lines[0] and "0-9" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_downloaded_npz_checked_by_the_fetch_program(tmp_path):
    served = tmp_path / "srv"
    served.mkdir()
    np.savez(served / "bad.npz", **_arrays(x_train=np.full((N_TRAIN, 28, 28), "a")))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/bad.npz"
        r = subprocess.run(
            [sys.executable, str(ROOT / "pipeline/programs/fetch_data.py"), "--source", url, "--out", "d.npz"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "x_train" in r.stderr, r.stderr
