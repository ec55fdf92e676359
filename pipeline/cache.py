"""Node-local materialisation of data objects, shared by the tasks on one node.

A data object has a key made when it was created (a random UUID, so keys never collide across Ray
sessions). The first task on a node that needs it writes it once into the cache, read-only; every
later task on that node links the cached file into its directory instead of writing it again. Outputs
a task produced are adopted into the cache by a hard link, so a consumer on the same node writes nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_MAX_AGE_S = 24 * 3600.0
_TOUCH_EVERY_S = 60.0


def default_root() -> Path:
    env = os.environ.get("PIPELINE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"pipeline-cache-{os.getuid()}"


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

    def lookup(self, key: str) -> Path | None:
        p = self._path(key)
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        now = time.time()
        if now - st.st_mtime > _TOUCH_EVERY_S:  # keep recently used entries from being evicted
            try:
                os.utime(p, (now, now))
            except OSError:
                pass
        return p

    def materialize(self, key: str, write: Callable[[BinaryIO], None]) -> tuple[Path, int]:
        """Return (path, bytes written by this call): the cached file, written by `write` if absent."""
        hit = self.lookup(key)
        if hit is not None:
            return hit, 0
        path = self._path(key)
        with open(self.root / f"{key}.lock", "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another task on this node may be writing it right now
            if path.exists():
                return path, 0
            tmp = self.root / f"{key}.tmp-{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    write(f)
                    written = f.tell()
                os.chmod(tmp, 0o444)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self.evict_stale()
        return path, written

    def adopt(self, key: str, src: Path) -> bool:
        """Hard-link an existing file (a task's output) into the cache under `key`; False if impossible."""
        path = self._path(key)
        if path.exists():
            return True
        try:
            os.chmod(src, 0o444)
            os.link(src, path)
            return True
        except FileExistsError:
            return True
        except OSError as e:
            log.debug("cannot adopt %s into the node cache: %s", src, e)
            return False

    def evict_stale(self) -> int:
        """Remove entries unused for longer than max_age_s; return how many."""
        cutoff = time.time() - self.max_age_s
        removed = 0
        for entry in self.root.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except OSError:
                pass
        return removed
