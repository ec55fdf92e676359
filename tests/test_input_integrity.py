"""No task can change another task's input, and outputs the toolkit did not create are never adopted.

Runs on the session's local Ray; the tasks run as the test's user (root in CI), so root's powers over a
read-only file are exercised too."""

import hashlib
import os
import stat
import time

import numpy as np
import pytest
import ray

from pipeline import tasks
from pipeline.tasks import Execute, ExecuteError

SMALL = b"ORIGINAL\n"
LARGE = os.urandom(3 * 1024 * 1024 + 123)  # above the private-copy limit: shared through the node cache


@pytest.fixture(autouse=True)
def _ray(ray_local):
    return ray_local


def _digest_seen_by_next_task(data: tasks.DataObject) -> tuple[str, str]:
    t = Execute(["sh", "-c", "sha256sum < in; stat -c %a in"], input_paths={"in": data}, stdout=True)
    words = t.output.fetch(timeout=60).get_str().split()  # "<sha256> - <mode>"
    return words[0], words[-1]


def _run_ignoring_failure(t: Execute) -> None:
    try:
        t.wait(timeout=60)
    except ExecuteError:
        pass


def test_issue_repro_later_task_sees_original():
    d = tasks.blob("ORIGINAL\n")
    _run_ignoring_failure(Execute(["sh", "-c", "chmod u+w in; echo HACKED >> in"], input_paths={"in": d}, stdout=True))
    assert Execute(["cat", "in"], input_paths={"in": d}, stdout=True).output.fetch().get_str() == "ORIGINAL\n"


TAMPERS = {
    "append": "chmod u+w in && echo HACKED >> in",
    "overwrite-in-place": "chmod u+w in && printf XXXX | dd of=in bs=1 seek=100 conv=notrunc 2>/dev/null",
    "truncate": "chmod u+w in && : > in",
    "chmod": "chmod 666 in",
    "rename": "mv in moved",
    "delete": "rm -f in",
    # the same size, every byte changed, the mtime put back: only a content check can see it
    "rewrite-restore-mtime": "touch -r in ref && chmod u+w in && tr '\\000-\\377' '\\001-\\377\\000' < in > x"
    " && cat x > in && touch -r ref in && chmod 444 in",
}


@pytest.mark.parametrize("payload", [SMALL, LARGE], ids=["small", "large"])
@pytest.mark.parametrize("how", list(TAMPERS))
def test_later_task_never_sees_a_change(payload, how):
    d = tasks.blob(payload, "data.bin")
    _run_ignoring_failure(Execute(["sh", "-c", TAMPERS[how]], input_paths={"in": d}))
    digest, mode = _digest_seen_by_next_task(d)
    assert digest == hashlib.sha256(payload).hexdigest(), f"after {how!r} a later task saw changed content"
    assert mode == "444"


@pytest.mark.root
def test_root_writes_a_read_only_input_without_chmod():
    if os.geteuid() != 0:
        pytest.skip("only root can write a mode-444 file without chmod")
    for payload in (SMALL, LARGE):
        d = tasks.blob(payload)
        _run_ignoring_failure(Execute(["sh", "-c", "echo HACKED >> in"], input_paths={"in": d}))
        assert _digest_seen_by_next_task(d)[0] == hashlib.sha256(payload).hexdigest()


def test_changing_a_shared_input_fails_that_task_naming_it():
    d = tasks.blob(LARGE)
    t = Execute(["sh", "-c", "chmod u+w in && echo HACKED >> in"], input_paths={"in": d}, name="tamperer")
    with pytest.raises(ExecuteError, match=r"'tamperer'.*input 'in' was changed"):
        t.wait(timeout=60)


def test_change_by_a_concurrent_task_never_yields_a_result_from_changed_data():
    d = tasks.blob(LARGE)
    reader = Execute(["sh", "-c", "sleep 1.5; sha256sum < in"], input_paths={"in": d}, stdout=True)
    tamper = Execute(["sh", "-c", "sleep 0.3; chmod u+w in && echo HACKED >> in"], input_paths={"in": d})
    _run_ignoring_failure(tamper)
    try:
        seen = reader.output.fetch(timeout=60).get_str().split()[0]
    except ExecuteError as e:
        assert "was changed" in str(e)
    else:  # the two ran apart (e.g. one CPU free at a time): then the reader saw the original
        assert seen == hashlib.sha256(LARGE).hexdigest()
    assert _digest_seen_by_next_task(d)[0] == hashlib.sha256(LARGE).hexdigest()


def test_cache_entry_changed_behind_the_toolkit_is_replaced(ray_local):
    d = tasks.blob(LARGE)
    Execute(["true", "in"], input_paths={"in": d}).wait()
    entry = ray_local / d.key
    st = entry.stat()
    os.chmod(entry, 0o644)
    entry.write_bytes((np.frombuffer(LARGE, dtype=np.uint8) ^ 0xFF).tobytes())  # same size, every byte changed
    os.chmod(entry, 0o444)
    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert entry.stat().st_size == len(LARGE)
    assert _digest_seen_by_next_task(d)[0] == hashlib.sha256(LARGE).hexdigest()


def test_inputs_of_many_tasks_still_written_once_per_node(ray_local):
    d = tasks.blob(LARGE)
    ts = [Execute(["sh", "-c", "sha256sum < in"], input_paths={"in": d}, stdout=True) for _ in range(6)]
    ray.get([t.info_ref for t in ts])
    infos = [t.wait() for t in ts]
    assert sum(i.input_bytes_written for i in infos) == len(LARGE)


# ------------------------------------------------------------------------------------------- outputs


def test_link_left_in_the_directory_removed_with_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    Execute(["ln", str(outside), "stray"]).wait()  # no inputs, no outputs: removed in the background
    deadline = time.monotonic() + 30
    while outside.stat().st_nlink != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outside.stat().st_nlink == 1, "a link the program left in its directory still there after 30 s"


def test_hard_linked_output_is_never_adopted_or_changed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    os.chmod(outside, 0o640)
    before = outside.stat()
    t = Execute(["sh", "-c", f"ln {outside} o"], output_paths=["o"])
    assert t.output.fetch().get_str() == "not yours\n"
    after = outside.stat()
    assert stat.S_IMODE(after.st_mode) == 0o640, "the toolkit changed the mode of a file it did not create"
    assert after.st_nlink == 1, "the toolkit kept a link to a file it did not create"
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    # the output still works as another task's input, from its own copy
    c = Execute(["sh", "-c", "chmod u+w in; echo more >> in; cat in"], input_paths={"in": t.output}, stdout=True)
    assert c.output.fetch().get_str() == "not yours\nmore\n"
    assert outside.read_text() == "not yours\n" and outside.stat().st_nlink == 1
