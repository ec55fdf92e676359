import os
import time
from pathlib import Path

import pytest

from pipeline.sandbox import ExecuteError, ProgramRun, Sandbox, TaskDirs, check_relpath


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a/..", ".", "a\0b"])
def test_check_relpath_refuses(bad):
    with pytest.raises(ValueError):
        check_relpath(bad)


def test_check_relpath_type_and_normalises():
    with pytest.raises(TypeError):
        check_relpath(3)
    assert check_relpath("a//b/./c") == "a/b/c"


def test_runs_in_fresh_dir_removed_after(tmp_path):
    with Sandbox(tmp_root=tmp_path) as box:
        res = box.run(
            ProgramRun(["sh", "-c", "pwd; echo hi > out.txt"], capture_stdout=True, output_paths=("out.txt",))
        )
        cwd = res.stdout.read().decode().strip()
        assert Path(cwd).resolve() == box.workdir.resolve()
        assert res.outputs["out.txt"].read_text() == "hi\n"
    assert not Path(cwd).exists()
    assert list(tmp_path.iterdir()) == []


def test_inputs_bytes_and_linked_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"linked")
    with Sandbox(tmp_root=tmp_path) as box:
        box.map_input("sub/a.txt", b"bytes")
        box.map_input("b.txt", src)
        res = box.run(ProgramRun(["sh", "-c", "cat sub/a.txt b.txt"], capture_stdout=True))
        assert res.stdout.read() == b"byteslinked"
    assert src.read_bytes() == b"linked"  # removing the sandbox leaves the linked source alone


def test_stdin_bytes(tmp_path):
    with Sandbox(tmp_root=tmp_path) as box:
        res = box.run(ProgramRun(["sort"], capture_stdout=True), stdin=b"b\na\n")
        assert res.stdout.read() == b"a\nb\n"


def test_nonzero_exit_reports_name_code_and_stderr_tail(tmp_path):
    script = "for i in $(seq 1 50); do echo line$i >&2; done; exit 7"
    with Sandbox(tmp_root=tmp_path) as box:
        with pytest.raises(ExecuteError) as ei:
            box.run(ProgramRun(["sh", "-c", script], name="mytask"))
    e = ei.value
    assert e.returncode == 7 and e.name == "mytask"
    assert "'mytask'" in str(e) and "code 7" in str(e) and "line50" in str(e)
    assert "line1\n" not in e.stderr_tail  # only the tail
    assert list(tmp_path.iterdir()) == []


def test_a_successful_program_keeps_its_stderr_tail_and_the_next_starts_empty(tmp_path):
    import tempfile

    script = "for i in $(seq 1 50); do echo warn$i >&2; done"
    err = tempfile.TemporaryFile()  # reused across runs, as a worker does
    with Sandbox(tmp_root=tmp_path, stderr_file=err) as box:
        res = box.run(ProgramRun(["sh", "-c", script]))
    assert res.stderr_tail.splitlines()[-1] == "warn50" and "warn1\n" not in res.stderr_tail
    with Sandbox(tmp_root=tmp_path, stderr_file=err) as box:
        assert box.run(ProgramRun(["true"])).stderr_tail == ""


def test_no_stderr_of_a_program_that_reopened_it_reaches_the_next_ones_error(tmp_path):
    import tempfile

    err = tempfile.TemporaryFile()  # reused across runs, as a worker does
    with Sandbox(tmp_root=tmp_path, stderr_file=err) as box:  # a new open file description, writing at 0
        box.run(ProgramRun(["sh", "-c", "echo secret-of-the-first-task > /dev/stderr"]))
    with Sandbox(tmp_root=tmp_path, stderr_file=err) as box, pytest.raises(ExecuteError) as ei:
        box.run(ProgramRun(["sh", "-c", "echo x >&2; exit 1"]))
    assert ei.value.stderr_tail == "x"


def test_signal_is_named(tmp_path):
    with Sandbox(tmp_root=tmp_path) as box:
        with pytest.raises(ExecuteError, match="SIGTERM"):
            box.run(ProgramRun(["sh", "-c", "kill -TERM $$"]))


def test_timeout_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "child.pid"
    with Sandbox(tmp_root=tmp_path) as box:
        t0 = time.monotonic()
        with pytest.raises(ExecuteError, match="timed out after 0.5 s") as ei:
            box.run(ProgramRun(["sh", "-c", f"sleep 30 & echo $! > {marker}; wait"], timeout=0.5))
        assert ei.value.timed_out
        assert time.monotonic() - t0 < 10
    pid = int(marker.read_text())
    for _ in range(50):  # the background child was killed with its group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"child {pid} survived the timeout")
    assert [p.name for p in tmp_path.iterdir()] == ["child.pid"]


def test_missing_output_named(tmp_path):
    with Sandbox(tmp_root=tmp_path) as box:
        with pytest.raises(ExecuteError, match="did not create its declared output 'nope.txt'"):
            box.run(ProgramRun(["true"], output_paths=("nope.txt",)))


def test_output_symlink_outside_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s")
    with Sandbox(tmp_root=tmp_path) as box:
        with pytest.raises(ExecuteError, match="symlink pointing outside"):
            box.run(ProgramRun(["ln", "-s", str(secret), "out"], output_paths=("out",)))


def test_output_symlink_inside_allowed(tmp_path):
    with Sandbox(tmp_root=tmp_path) as box:
        res = box.run(ProgramRun(["sh", "-c", "echo x > real; ln -s real out"], output_paths=("out",)))
        assert res.outputs["out"].read_text() == "x\n"


def test_unknown_program_is_a_clear_error(tmp_path):
    with Sandbox(tmp_root=tmp_path) as box:
        with pytest.raises(ExecuteError, match="could not start 'no-such-program-xyz'"):
            box.run(ProgramRun(["no-such-program-xyz"]))


def test_readonly_leftovers_still_removed(tmp_path):
    with Sandbox(tmp_root=tmp_path) as box:
        box.run(ProgramRun(["sh", "-c", "mkdir d && touch d/f && chmod 000 d"]))
    assert list(tmp_path.iterdir()) == []


def test_reused_stderr_file_carries_nothing_over(tmp_path):
    import tempfile

    shared = tempfile.TemporaryFile()
    with Sandbox(tmp_root=tmp_path, stderr_file=shared) as box:
        with pytest.raises(ExecuteError, match="first-task-noise"):
            box.run(ProgramRun(["sh", "-c", "echo first-task-noise >&2; exit 1"]))
    with Sandbox(tmp_root=tmp_path, stderr_file=shared) as box:
        with pytest.raises(ExecuteError) as ei:
            box.run(ProgramRun(["sh", "-c", "echo second >&2; exit 2"]))
    assert "second" in str(ei.value) and "first-task-noise" not in str(ei.value)
    assert not shared.closed  # the worker's file outlives each sandbox


def test_task_dirs_fresh_removed_later_and_orphans_cleared(tmp_path):
    dirs = TaskDirs(tmp_path)
    made = [dirs.make() for _ in range(3)]
    assert len(set(made)) == 3 and all(p.is_dir() and not any(p.iterdir()) for p in made)
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in made)
    (made[1] / "sub").mkdir()
    (made[1] / "sub" / "f").write_text("x")
    os.chmod(made[1] / "sub", 0o500)  # a program may leave read-only directories behind
    with Sandbox(dirs=dirs) as box:
        box.run(ProgramRun(["true"]))
        inside = box.workdir
    for p in made:
        dirs.remove_later(p)
    deadline = time.monotonic() + 30
    while any(p.exists() for p in [*made, inside]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.exists() for p in [*made, inside]), "finished task directories not removed within 30 s"
    orphan = tmp_path / "pipeline-tasks-999999999-x"  # no such process
    orphan.mkdir()
    alive = tmp_path / f"pipeline-tasks-{os.getpid()}-y"
    alive.mkdir()
    other = TaskDirs(tmp_path)
    assert not orphan.exists() and alive.exists()
    dirs.close()
    other.close()
    assert not dirs.parent.exists() and not other.parent.exists()


class _BurstTaskDirs(TaskDirs):
    PAUSE_S = 2.0  # far longer than a burst of `true`s takes
    READY_MIN = READY_MAX = 4


def test_task_dirs_left_alone_while_tasks_come_and_removed_when_they_pause(tmp_path):
    dirs = _BurstTaskDirs(tmp_path)
    deadline = time.monotonic() + 30
    while len(list(dirs.parent.iterdir())) < dirs.READY_MAX and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(list(dirs.parent.iterdir())) == dirs.READY_MAX, "directories were not made ahead while idle"
    used = []
    for i in range(10):
        with Sandbox(dirs=dirs) as box:
            box.run(ProgramRun(["sh", "-c", f"echo {i} > left-behind"] if i == 0 else ["true"]))
            used.append(box.workdir)
    assert len(set(used)) == len(used), "a task directory was reused"
    assert all(p.exists() for p in used), "removal ran beside the tasks of a burst"
    while any(p.exists() for p in used) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.exists() for p in used), "finished task directories not removed within 30 s of the pause"
    left = list(dirs.parent.iterdir())
    assert len(left) <= dirs.READY_MAX and all(not any(p.iterdir()) for p in left), left  # only ones made ahead
    with Sandbox(dirs=dirs) as box, pytest.raises(ExecuteError, match="timed out"):
        box.run(ProgramRun(["sleep", "30"], timeout=0.5))
    dirs.close()
    assert not dirs.parent.exists()


class _SizedTaskDirs(TaskDirs):
    PAUSE_S = 1.0  # a burst of 20 `true`s takes a tenth of that
    READY_MIN = 2
    READY_MAX = 6


def test_task_dirs_made_ahead_as_many_as_the_last_burst_took_within_bounds(tmp_path):
    dirs = _SizedTaskDirs(tmp_path)

    def ready_after_pause(expected: int) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            names = [p for p in dirs.parent.iterdir()]
            if len(names) == expected:
                time.sleep(0.3)  # and no more come (a fill makes them all in one go)
                return len(list(dirs.parent.iterdir()))
            time.sleep(0.02)
        return len(list(dirs.parent.iterdir()))

    assert ready_after_pause(2) == 2  # a new worker: READY_MIN
    for burst, expected in ((5, 5), (20, 6), (1, 5)):  # (the last: 5 of the 6 are left, more than it took)
        for _ in range(burst):
            with Sandbox(dirs=dirs) as box:
                box.run(ProgramRun(["true"]))
        assert ready_after_pause(expected) == expected, f"after a burst of {burst}"
    dirs.close()


class _EndlessBurstTaskDirs(TaskDirs):
    PAUSE_S = 3600.0  # the tasks never pause here: only the bound removes
    READY_MIN = READY_MAX = 2
    MAX_PENDING = 3


def test_task_dirs_of_an_endless_burst_removed_once_max_pending_wait(tmp_path):
    dirs = _EndlessBurstTaskDirs(tmp_path)
    used = []
    for i in range(10):
        with Sandbox(dirs=dirs) as box:
            box.run(ProgramRun(["sh", "-c", f"echo {i} > left-behind"] if i == 0 else ["true"]))
            used.append(box.workdir)
    deadline = time.monotonic() + 30
    while any(p.exists() for p in used[:9]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(p.exists() for p in used[:9]), "3 batches of MAX_PENDING not removed within 30 s"
    assert len(list(dirs.parent.iterdir())) <= dirs.MAX_PENDING + dirs.READY_MAX
    dirs.close()
    assert not dirs.parent.exists()


def test_program_name_found_once_still_follows_path_when_the_file_goes(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for d, word in ((first, "first"), (second, "second")):
        d.mkdir()
        (d / "say-which").write_text(f"#!/bin/sh\necho {word}\n")
        (d / "say-which").chmod(0o755)
    env = {"PATH": f"{first}:{second}:{os.environ['PATH']}"}

    def run() -> str:
        with Sandbox(tmp_root=tmp_path) as box:
            result = box.run(ProgramRun(["say-which"], env=env, capture_stdout=True))
            assert result.stdout is not None
            return result.stdout.read().decode().strip()

    assert run() == "first"
    (first / "say-which").unlink()
    assert run() == "second"


UNPRIVILEGED_CLEANUP = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.sandbox import ProgramRun, Sandbox, TaskDirs
root = sys.argv[2]
victim = os.path.join(root, "victim")
with open(victim, "w") as f:
    f.write("mine")
os.chmod(victim, 0o644)
leftovers = f"ln -s {victim} link; mkdir closed; touch closed/f; chmod 000 closed; chmod 555 ."
with Sandbox(tmp_root=root) as box:
    box.map_input("in.txt", b"x")  # a directory with inputs: removed at once, on close
    box.run(ProgramRun(["sh", "-c", leftovers]))
dirs = TaskDirs(root)
with Sandbox(dirs=dirs) as box:  # without inputs: removed by the worker's thread, at the next pause
    box.run(ProgramRun(["sh", "-c", leftovers]))
deadline = time.monotonic() + 10
while box.workdir.exists() and time.monotonic() < deadline:
    time.sleep(0.1)
print(oct(os.stat(victim).st_mode & 0o777), sorted(os.listdir(root)), box.workdir.exists(), dirs._thread.is_alive(), sep="|")
"""


def test_leftovers_a_program_locked_are_removed_without_touching_files_outside(tmp_path):
    """As a user who is not root (root's override of file permissions dropped): a program that leaves a
    directory it closed (mode 000), its own directory read-only and a symlink to a file outside has its
    directory removed all the same, the linked file's mode unchanged, and the worker's thread still alive."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop root's permission override")
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all"]
    else:
        drop = []
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [*drop, sys.executable, "-c", UNPRIVILEGED_CLEANUP, str(root), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    mode, left, used_dir_there, alive = r.stdout.strip().split("|")
    assert mode == "0o644", r.stdout  # the symlink's target: not the toolkit's to change
    assert left.startswith("['pipeline-tasks-") and "pipeline-task-" not in left.replace("pipeline-tasks-", ""), (
        r.stdout
    )
    assert used_dir_there == "False" and alive == "True", r.stdout


class _FourAheadTaskDirs(TaskDirs):
    PAUSE_S = 1.0
    READY_MIN = READY_MAX = 4


def test_a_task_directory_made_ahead_and_touched_since_is_not_handed_out(tmp_path):
    """A program can reach the directories made ahead for later tasks (same user, next to its own). One it
    put a file in, or swapped for a link, is not given to a task as its fresh directory; a fresh one is."""
    dirs = _FourAheadTaskDirs(tmp_path)
    deadline = time.monotonic() + 30
    while len(dirs._ready) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    own, forged, linked = [name for name, *_ in list(dirs._ready)[:3]]
    outside = tmp_path / "outside"
    outside.mkdir()
    plant = f"mkdir -p ../{forged}/o && echo FORGED > ../{forged}/o/y; rmdir ../{linked}; ln -s {outside} ../{linked}"
    with Sandbox(dirs=dirs) as box:
        assert box.workdir.name == own
        box.run(ProgramRun(["sh", "-c", plant]))
    assert (dirs.parent / forged / "o" / "y").exists() and (dirs.parent / linked).is_symlink()
    for _ in range(3):
        with Sandbox(dirs=dirs) as box:
            assert box.workdir.is_dir() and not box.workdir.is_symlink() and not any(box.workdir.iterdir())
            box.map_input("o/y", b"mine")  # written in the task's own directory, nowhere else
            box.run(ProgramRun(["true"]))
    assert not any(outside.iterdir())
    dirs.close()


def test_task_dirs_recover_when_a_program_removed_their_parent(tmp_path):
    dirs = _SizedTaskDirs(tmp_path)
    with Sandbox(dirs=dirs) as box:
        box.run(ProgramRun(["sh", "-c", 'rm -rf "$(dirname "$PWD")"']))
    for _ in range(3):  # the next tasks get fresh directories all the same
        with Sandbox(dirs=dirs) as box:
            box.map_input("x", b"1")
            box.run(ProgramRun(["cat", "x"]))
    dirs.close()
    assert not list(tmp_path.glob("pipeline-tasks-*"))


def test_a_program_stopped_before_it_started_is_not_started(tmp_path):
    from pipeline.lines import StdoutMonitor, Watch

    monitor = StdoutMonitor(Watch())
    monitor.stop()  # the sweep stopped the trial while it waited for a slot
    with Sandbox(tmp_root=tmp_path) as box:
        res = box.run(ProgramRun(["sh", "-c", f"touch {tmp_path / 'ran'}"]), monitor=monitor)
    assert res.stopped and not (tmp_path / "ran").exists()


def test_a_stop_that_comes_between_the_check_and_the_start_stops_the_program(tmp_path):
    """stop() before the monitor is given the process (the sandbox had already checked): done at start()."""
    import subprocess

    from pipeline.lines import StdoutMonitor, Watch

    monitor = StdoutMonitor(Watch(), grace_s=5)
    monitor.stop()
    r, w = os.pipe()
    proc = subprocess.Popen(["sleep", "30"], stdout=w, start_new_session=True)
    os.close(w)
    t0 = time.monotonic()
    monitor.start(r, proc.pid)
    assert proc.wait(timeout=10) == -15 and time.monotonic() - t0 < 10  # SIGTERM, at once
    monitor.finish()
    assert monitor.stopped
