import multiprocessing as mp
import os
import time
import uuid

from pipeline.cache import NodeCache


def _writer(root, key, delay, q):
    c = NodeCache(root)

    def write(f):
        time.sleep(delay)
        f.write(b"x" * 1000)

    _path, n = c.materialize(key, write)
    q.put(n)


def test_materialized_once_across_processes(tmp_path):
    key = uuid.uuid4().hex
    q = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_writer, args=(tmp_path, key, 0.2, q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    written = sorted(q.get(timeout=5) for _ in procs)
    assert written == [0, 0, 0, 1000]
    path = tmp_path / key
    assert path.read_bytes() == b"x" * 1000
    assert oct(path.stat().st_mode & 0o777) == oct(0o444)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_write_leaves_nothing(tmp_path):
    c = NodeCache(tmp_path)
    key = uuid.uuid4().hex

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    try:
        c.materialize(key, boom)
    except RuntimeError:
        pass
    assert c.lookup(key) is None
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_adopt_links_without_copy(tmp_path):
    c = NodeCache(tmp_path / "c")
    src = tmp_path / "out.bin"
    src.write_bytes(b"output")
    key = uuid.uuid4().hex
    assert c.adopt(key, src)
    assert c.lookup(key).stat().st_ino == src.stat().st_ino


def test_evicts_only_stale(tmp_path):
    c = NodeCache(tmp_path, max_age_s=3600)
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    for k in (old, new):
        c.materialize(k, lambda f: f.write(b"1"))
    past = time.time() - 7200
    os.utime(tmp_path / old, (past, past))
    assert c.evict_stale() == 1
    assert c.lookup(old) is None and c.lookup(new) is not None


def test_bad_key_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError):
        NodeCache(tmp_path).lookup("../etc")
