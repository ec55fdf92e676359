"""Node-local materialisation of data objects, shared by the tasks on one node.

A data object has a key made when it was created (a random UUID, so keys never collide across Ray
sessions). The first task on a node that needs it writes it once into the cache, read-only; later tasks
on that node map the cached file into their directories instead of writing it again.

A cached file is shared, so it is checked: every entry has a stamp (`KEY.stamp`: inode number, size,
mtime) written by whoever made the entry, and before each use, and again after each task that used it,
the file is compared with its stamp (mode 0444 too) and with the data object's own bytes at random
offsets (the caller holds them in memory). A mismatch evicts the entry; the next use writes it afresh.
The inode's ctime is not compared: linking the file into a task directory changes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_MAX_AGE_S = 24 * 3600.0
_TOUCH_EVERY_S = 60.0
READ_ONLY = 0o444
SAMPLE_BLOCK = 4096
SAMPLE_COUNT = 16  # random blocks compared per check, besides the first and the last
FULL_COMPARE_MAX = 256 * 1024  # files up to this size are compared whole

Buffer = bytes | bytearray | memoryview


def default_root() -> Path:
    env = os.environ.get("PIPELINE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"pipeline-cache-{os.getuid()}"


@dataclass(frozen=True)
class Stamp:
    """What a cache entry's inode looked like when it was made."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)

    def text(self) -> str:
        return f"{self.ino} {self.size} {self.mtime_ns}\n"

    @classmethod
    def parse(cls, text: str) -> Stamp | None:
        try:
            ino, size, mtime_ns = (int(x) for x in text.split())
        except ValueError:
            return None
        return cls(ino, size, mtime_ns)


def mismatch(fd: int, stamp: Stamp, data: Buffer) -> str | None:
    """Why the open file `fd` is not the entry `stamp` describes holding `data`, or None if it is."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_ino != stamp.ino:
        return "the file was replaced"
    if st.st_size != stamp.size or st.st_size != len(data):
        return f"size {st.st_size} bytes, expected {len(data)}"
    if stat.S_IMODE(st.st_mode) != READ_ONLY:
        return f"mode {stat.S_IMODE(st.st_mode):04o}, expected 0444"
    if st.st_mtime_ns != stamp.mtime_ns:
        return "it was written to (its mtime changed)"
    view = memoryview(data).cast("B")
    size = len(view)
    if size <= FULL_COMPARE_MAX:
        offsets = [0]
        block = max(size, 1)
    else:
        block = SAMPLE_BLOCK
        last = size - block
        offsets = [0, last, *(random.randrange(0, last) for _ in range(SAMPLE_COUNT))]
    for off in offsets:
        if os.pread(fd, block, off) != view[off : off + block]:
            return f"its content differs at byte {off}"
    return None


@dataclass
class Entry:
    """A checked cache entry, held open: `fd` pins the very inode a task is given."""

    key: str
    path: Path
    fd: int
    stamp: Stamp
    written: int  # bytes written by the call that returned it (0 on a hit)

    def mismatch(self, data: Buffer) -> str | None:
        return mismatch(self.fd, self.stamp, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NodeCache:
    """Files keyed by data-object key under one directory; safe across processes on one node."""

    def __init__(self, root: str | os.PathLike | None = None, max_age_s: float | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if max_age_s is None:
            max_age_s = float(os.environ.get("PIPELINE_CACHE_MAX_AGE_S", DEFAULT_MAX_AGE_S))
        self.max_age_s = max_age_s

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"cache key {key!r} is not a 32-digit hex UUID")
        return self.root / key

    def _stamp_path(self, key: str) -> Path:
        return self.root / f"{key}.stamp"

    def _lock(self, key: str):
        lock = open(self.root / f"{key}.lock", "wb")
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the file is closed
        return lock

    def _open_checked(self, key: str, data: Buffer) -> Entry | None:
        """The entry for `key` if present and intact; a damaged one is logged (and left to the caller)."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, OSError):
            return None
        try:
            stamp_path = self._stamp_path(key)
            stamp = Stamp.parse(stamp_path.read_text())
            why = "it has no valid stamp" if stamp is None else mismatch(fd, stamp, data)
        except OSError:
            stamp, why = None, "it has no stamp"
        if stamp is None or why is not None:
            os.close(fd)
            log.warning("node cache entry %s is damaged (%s); writing it again", path, why)
            return None
        now = time.time()
        try:
            if now - stamp_path.stat().st_mtime > _TOUCH_EVERY_S:  # in use: not evicted as stale
                os.utime(stamp_path, (now, now))
        except OSError:
            pass
        return Entry(key, path, fd, stamp, 0)

    def acquire(self, key: str, data: Buffer) -> Entry:
        """An intact entry holding `data`, written now if absent or damaged. Close it after use."""
        entry = self._open_checked(key, data)
        if entry is not None:
            return entry
        path = self._path(key)
        with self._lock(key):  # another task on this node may be writing it right now
            entry = self._open_checked(key, data)
            if entry is not None:
                return entry
            self._remove(key)
            tmp = self.root / f"{key}.tmp-{os.getpid()}"
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, READ_ONLY)
                try:
                    with open(fd, "wb", closefd=False) as f:
                        f.write(data)
                    os.fchmod(fd, READ_ONLY)
                    stamp = Stamp.of(os.fstat(fd))
                    self._write_stamp(key, stamp)
                    os.replace(tmp, path)
                except BaseException:
                    os.close(fd)
                    raise
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self.evict_stale()
        return Entry(key, path, fd, stamp, stamp.size)

    def _write_stamp(self, key: str, stamp: Stamp) -> None:
        tmp = self.root / f"{key}.stamp.tmp-{os.getpid()}"
        tmp.write_text(stamp.text())
        os.replace(tmp, self._stamp_path(key))

    def _remove(self, key: str) -> None:
        for p in (self._path(key), self._stamp_path(key)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def evict(self, entry: Entry, why: str) -> None:
        """Drop a damaged entry (unless it was already replaced by a good one)."""
        with self._lock(entry.key):
            try:
                current = os.lstat(entry.path).st_ino
            except FileNotFoundError:
                return
            if current == entry.stamp.ino:
                log.warning("node cache entry %s was changed (%s); evicted", entry.path, why)
                self._remove(entry.key)

    def adopt(self, key: str, src: Path) -> bool:
        """Hard-link a task's output into the cache under `key`; False (nothing done) when the file is
        not a regular file with a single link, i.e. possibly not one the task's directory alone holds."""
        path = self._path(key)
        try:
            st = os.lstat(src)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            log.debug("not adopting %s into the node cache: %d links", src, st.st_nlink)
            return False
        with self._lock(key):
            if path.exists():
                return True
            try:
                os.chmod(src, READ_ONLY)
                self._write_stamp(key, Stamp.of(os.lstat(src)))
                os.link(src, path)
                return True
            except OSError as e:
                log.debug("cannot adopt %s into the node cache: %s", src, e)
                self._remove(key)
                return False

    def lookup(self, key: str) -> Path | None:
        """The entry's path if present (unchecked: use acquire to get a checked one)."""
        p = self._path(key)
        return p if p.exists() else None

    def evict_stale(self) -> int:
        """Remove entries unused for longer than max_age_s (their stamp's mtime); return how many files."""
        cutoff = time.time() - self.max_age_s
        removed = 0
        for entry in self.root.iterdir():
            name = entry.name
            try:
                if _KEY_RE.match(name):
                    try:
                        used = (self.root / f"{name}.stamp").stat().st_mtime
                    except FileNotFoundError:
                        used = entry.stat().st_mtime
                else:
                    used = entry.stat().st_mtime
                if used < cutoff:
                    entry.unlink()
                    removed += 1
            except OSError:
                pass
        return removed
