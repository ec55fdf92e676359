import multiprocessing as mp
import os
import time
import uuid

import pytest

from pipeline.cache import NodeCache

PAYLOAD = b"x" * 5_000_000


def _writer(root, key, q):
    entry = NodeCache(root).acquire(key, PAYLOAD)
    entry.close()
    q.put(entry.written)


def test_materialized_once_across_processes(tmp_path):
    key = uuid.uuid4().hex
    q = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_writer, args=(tmp_path, key, q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    written = sorted(q.get(timeout=5) for _ in procs)
    assert written == [0, 0, 0, len(PAYLOAD)]
    path = tmp_path / key
    assert path.read_bytes() == PAYLOAD
    assert oct(path.stat().st_mode & 0o777) == oct(0o444)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


class _Unwritable:
    """Data whose write fails after the temporary file was made (as a full disk would)."""

    def __len__(self):
        return 10


def test_failed_write_leaves_nothing(tmp_path):
    c = NodeCache(tmp_path)
    key = uuid.uuid4().hex
    with pytest.raises(TypeError):
        c.acquire(key, _Unwritable())
    assert c.lookup(key) is None
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_adopt_links_without_copy(tmp_path):
    c = NodeCache(tmp_path / "c")
    src = tmp_path / "out.bin"
    src.write_bytes(b"output")
    key = uuid.uuid4().hex
    assert c.adopt(key, src)
    assert c.lookup(key).stat().st_ino == src.stat().st_ino
    entry = c.acquire(key, b"output")  # adopted with a stamp: a hit, nothing written
    assert entry.written == 0
    entry.close()


def test_adopt_refuses_a_file_with_other_links(tmp_path):
    c = NodeCache(tmp_path / "c")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"someone else's")
    os.chmod(outside, 0o600)
    src = tmp_path / "out.bin"
    os.link(outside, src)
    assert not c.adopt(uuid.uuid4().hex, src)
    assert outside.stat().st_mode & 0o777 == 0o600 and outside.stat().st_nlink == 2
    assert not [p for p in (tmp_path / "c").iterdir() if len(p.name) == 32]


@pytest.mark.parametrize("damage", ["append", "chmod", "same-size-mtime-restored", "replaced", "no-stamp"])
def test_damaged_entry_written_again(tmp_path, damage):
    c = NodeCache(tmp_path)
    key = uuid.uuid4().hex
    data = os.urandom(600_000)
    c.acquire(key, data).close()
    path = tmp_path / key
    st = path.stat()
    os.chmod(path, 0o644)
    if damage == "append":
        with open(path, "ab") as f:
            f.write(b"x")
    elif damage == "same-size-mtime-restored":
        path.write_bytes(bytes(len(data)))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif damage == "replaced":
        path.unlink()
        path.write_bytes(data)
    elif damage == "no-stamp":
        (tmp_path / f"{key}.stamp").unlink()
    if damage != "chmod":
        os.chmod(path, 0o444)
    entry = c.acquire(key, data)
    assert entry.written == len(data)
    assert path.read_bytes() == data and path.stat().st_mode & 0o777 == 0o444
    assert entry.mismatch(data) is None
    entry.close()


def test_evicts_only_stale(tmp_path):
    c = NodeCache(tmp_path, max_age_s=3600)
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    for k in (old, new):
        c.acquire(k, b"1").close()
    past = time.time() - 7200
    for p in tmp_path.glob(f"{old}*"):
        os.utime(p, (past, past))
    assert c.evict_stale() == 3  # the entry, its stamp and its lock
    assert c.lookup(old) is None and c.lookup(new) is not None


def test_bad_key_refused(tmp_path):
    with pytest.raises(ValueError):
        NodeCache(tmp_path).lookup("../etc")
