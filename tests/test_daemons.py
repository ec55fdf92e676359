"""Every process a program starts ends with its run: daemons (double fork + setsid) and plain children alike,
on success, failure, timeout, and (through Ray) a forced cancel that kills the worker itself."""

import os
import sys
import time
import uuid
from pathlib import Path

import pytest
import ray

from pipeline.sandbox import ExecuteError, ProgramRun, Sandbox
from pipeline.tasks import Execute

# Leaves a daemon (double fork, setsid, stdio closed), a plain child in its own session, and a child that
# stays its parent (so is no orphan) of a process in a session of its own; records them all (pid and start
# time) in argv[1], then exits 0 ("ok"), 3 ("fail") or sleeps ("hang").
PROGRAM = r"""
import os, sys, time
record, mode = sys.argv[1], sys.argv[2]

def start_time(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]

r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in (0, 1, 2):
            os.close(fd)
        os.write(w, f"{os.getpid()}\n".encode())
        time.sleep(600)
        os._exit(0)
    os._exit(0)
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        os.write(w, f"{os.getpid()}\n".encode())
        time.sleep(600)
        os._exit(0)
    os.write(w, f"{os.getpid()}\n".encode())
    time.sleep(600)
    os._exit(0)
child = os.fork()
if child == 0:
    os.execvp("sleep", ["sleep", "600"])
os.close(w)
pids = [child]
with os.fdopen(r) as f:
    while len(pids) < 4:
        pids.append(int(f.readline()))
with open(record + ".tmp", "w") as f:
    f.write("".join(f"{pid} {start_time(pid)}\n" for pid in pids))
os.rename(record + ".tmp", record)
if mode == "ok":
    sys.exit(0)
if mode == "fail":
    sys.exit(3)
time.sleep(600)
"""


def _start_time(pid: int) -> str | None:
    """A process's start time, None when it is gone or a zombie (it holds nothing then but its pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _wait_for(path: Path, timeout: float = 30.0) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"the program did not record its daemon's pid in {path} within {timeout:g} s")
        time.sleep(0.05)
    return [(int(p), st) for p, st in (line.split() for line in path.read_text().splitlines())]


def _assert_ended(procs: list[tuple[int, str]], timeout: float, after: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid, st in procs if _start_time(pid) == st]
        if not alive:
            return
        if time.monotonic() > deadline:
            for pid in alive:  # do not leave them behind after the test
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            raise AssertionError(f"processes {alive} the program started still ran {timeout:g} s after {after}")
        time.sleep(0.05)


def _record(tmp_path: Path) -> Path:
    return tmp_path / f"pids-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_sandbox_ends_a_programs_daemon_and_children_when_it_exits(tmp_path, mode):
    record = _record(tmp_path)
    with Sandbox(tmp_root=tmp_path) as box:
        if mode == "ok":
            box.run(ProgramRun([sys.executable, "-c", PROGRAM, str(record), mode]))
        else:
            with pytest.raises(ExecuteError, match="exited with code 3"):
                box.run(ProgramRun([sys.executable, "-c", PROGRAM, str(record), mode]))
    _assert_ended(_wait_for(record), 5, f"the program's run ended ({mode})")


def test_sandbox_ends_a_programs_daemon_and_children_on_timeout(tmp_path):
    record = _record(tmp_path)
    with Sandbox(tmp_root=tmp_path) as box:
        with pytest.raises(ExecuteError, match="timed out"):
            box.run(ProgramRun([sys.executable, "-c", PROGRAM, str(record), "hang"], timeout=10))
    _assert_ended(_wait_for(record), 5, "the program's run timed out")


def test_sandbox_leaves_alone_children_of_this_process_it_did_not_start(tmp_path):
    import subprocess

    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        with Sandbox(tmp_root=tmp_path) as box:
            box.run(ProgramRun([sys.executable, "-c", PROGRAM, str(_record(tmp_path)), "ok"]))
        assert other.poll() is None, "a child this process started before the run was killed by the run's end"
    finally:
        other.kill()
        other.wait()


def test_a_process_that_is_no_worker_adopts_no_orphans_once_its_programs_ended(tmp_path):
    """Only while it runs programs: else it would adopt, and never wait for, the orphans of all its descendants."""
    import subprocess

    with Sandbox(tmp_root=tmp_path) as box:
        box.run(ProgramRun(["true"]))
    # the sleep keeps neither of the pipes: run() returns at once, while the orphan lives
    orphan = subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    pid = int(orphan.stdout)
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid != os.getpid(), "this process adopted an orphan after its program had ended"
    finally:
        os.kill(pid, 9)
        if ppid == os.getpid():
            os.waitpid(pid, 0)


@pytest.mark.parametrize("mode", ["ok", "fail", "timeout"])
def test_execute_ends_a_programs_daemon_and_children(ray_local, tmp_path, mode):
    record = _record(tmp_path)
    argv = ["python3", "-c", PROGRAM, str(record), "hang" if mode == "timeout" else mode]
    t = Execute(argv, timeout=10 if mode == "timeout" else None, name=f"daemon-{mode}")
    if mode == "ok":
        t.wait(timeout=60)
    else:
        with pytest.raises(ExecuteError):
            t.wait(timeout=60)
    _assert_ended(_wait_for(record), 10, f"the task ended ({mode})")


def test_execute_cancelled_with_force_ends_a_programs_daemon_and_children(ray_local, tmp_path):
    record = _record(tmp_path)
    t = Execute(["python3", "-c", PROGRAM, str(record), "hang"], name="daemon-cancel")
    procs = _wait_for(record, 60)
    ray.cancel(t.info_ref, force=True)
    # Ray's forced cancel kills the worker's children first (kill_child_processes_on_worker_exit), then the
    # worker: the task may still report the program's SIGKILL as its result before the worker is gone.
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError, ExecuteError)) as e:
        ray.get(t.info_ref, timeout=60)
    if isinstance(e.value, ExecuteError):
        assert "killed by signal SIGKILL" in str(e.value), e.value
    _assert_ended(procs, 20, "the task was cancelled (force=True)")
