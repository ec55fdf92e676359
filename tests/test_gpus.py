"""Execute(..., gpus=N) asks Ray for GPUs; checked with Ray's resource accounting on a local Ray that
declares one GPU (these machines have none), in a process of its own."""

import subprocess
import sys

import pytest

from pipeline.tasks import Execute
from tests.conftest import ROOT

SCRIPT = """
import sys, time
import ray
from pipeline import tasks
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
gpu = tasks.Execute(["sh", "-c", 'echo "cuda=$CUDA_VISIBLE_DEVICES"'], gpus=1, stdout=True)
print(gpu.output.fetch(timeout=60).get_str().strip())
# while a task holds the GPU, Ray's accounting shows none free; the task waits for a file we make then
flag = sys.argv[1]
hold = tasks.Execute(["sh", "-c", f"i=0; while [ ! -e {flag} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"], gpus=1)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and ray.available_resources().get("GPU", 0) != 0:
    time.sleep(0.1)
print("gpu-free-while-held", ray.available_resources().get("GPU", 0))
open(flag, "w").close()
hold.wait(timeout=60)
none = tasks.Execute(["sh", "-c", 'echo "cuda=${CUDA_VISIBLE_DEVICES-unset}"'], stdout=True)
print(none.output.fetch(timeout=60).get_str().strip())
"""


def test_gpu_task_gets_the_declared_gpu(tmp_path):
    cmd = [sys.executable, "-c", SCRIPT, str(tmp_path / "release")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "cuda=0"
    assert lines[1] == "gpu-free-while-held 0"  # Ray counted the task's GPU
    assert lines[2] != "cuda=0", "a task that asked for no GPU was given one"


@pytest.mark.parametrize("bad", [-1, "1", True, float("nan"), None])
def test_bad_gpus_refused_in_one_line(bad):
    with pytest.raises((ValueError, TypeError), match="gpus must be"):
        Execute("true", gpus=bad)
