"""The processes a program leaves behind, ended when its run ends.

Killing a program's process group misses what left it: a daemon (fork, `setsid`, fork again) is in a
session of its own and its parent is gone. So the process that runs programs makes itself a child
subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`, Linux 3.4): an orphan of anything it started is re-parented
to it, not to init, and stays findable. When a run ends, the children of this process that started at or
after the run began (the program's orphans; read from `/proc/self/task/<tid>/children`, one `pread` of a
kept file per thread when nothing was left, the common case) are killed with all their descendants and
reaped. Children of this process that were there before the run are left alone. A Ray worker stays a
subreaper all its life; another process is one from its Sandbox's creation until its programs have ended.

One program at a time is the normal case (a Ray worker runs one task at a time). When runs overlap in one
process, the orphans cannot be told apart, so they are ended when the last of the overlapping runs ends.

When the process itself is killed (Ray's `cancel(force=True)` ends the worker), nothing of it runs any more.
For that, `guard_this_process()` (once per Ray worker) marks the environment its programs inherit with a
token of its own and starts a small guard process (no child of the worker and in a session of its own, so
neither Ray's kill of the worker's children nor of its process group takes it) that waits for the worker's end, seen as the end of a pipe, then kills every process still
carrying the token, until none is left. Ray's worker also kills its direct children as it exits (the program
and, with this process a subreaper, every orphan it left); the guard ends the rest: a program's children
still under it, which the kernel hands to init once the worker is gone. A process that removed the token
from its environment escapes the guard (not the subreaper, while the worker lives).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_subreaper_pid = 0  # the process that made itself a subreaper (not a child forked from it since)
_for_good_pid = 0  # the process that stays one (become_subreaper(for_good=True))
_failed_pid = 0  # the process where prctl failed
_lock = threading.Lock()
_running: set[int] = set()  # programs of this process running now (their pids)
_since: float | None = None  # start of the earliest run that ended while others still ran (monotonic s)
_children_fds: dict[int, int] = {}  # thread id -> open /proc/self/task/<tid>/children
_fds_pid = 0

#: The environment variable that marks the programs of a guarded process (see guard_this_process).
GUARD_ENV = "PIPELINE_RUNNER"
_guarded_pid = 0

# The guard: waits for its stdin to end (the guarded process is gone), then kills what carries the token.
_GUARD = r"""
import os, stat, sys, time
if not stat.S_ISFIFO(os.fstat(0).st_mode):  # not the pipe from the guarded process: nothing to wait for
    sys.exit(1)
needle = b"\0PIPELINE_RUNNER=" + sys.argv[1].encode() + b"\0"
while os.read(0, 4096):
    pass
me = os.getpid()
for _ in range(200):
    found = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if needle in env:
            found += 1
            try:
                os.kill(int(name), 9)
            except OSError:
                pass
    if not found:
        break
    time.sleep(0.05)
"""


def become_subreaper(for_good: bool = False) -> bool:
    """Make this process a child subreaper; False where Linux does not offer it. `for_good` (a Ray worker, which
    runs programs all its life): it stays one; otherwise only until its programs running now have ended (a
    subreaper adopts the orphans of all its descendants, e.g. a local Ray's workers as it stops, which nobody
    else of such a process would wait for)."""
    global _subreaper_pid, _for_good_pid, _failed_pid
    pid = os.getpid()
    if for_good:
        _for_good_pid = pid
    if _subreaper_pid == pid:
        return True
    if _failed_pid == pid or not _prctl(PR_SET_CHILD_SUBREAPER, 1):
        _failed_pid = pid  # said once (a warning), not tried again
        return False
    _subreaper_pid = pid
    return True


def guard_this_process() -> None:
    """Once per process: what its programs leave is killed when it ends in any way (see the module's text).
    Costs one small process per guarded process, nothing per program."""
    global _guarded_pid
    if _guarded_pid == os.getpid():
        return
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    read_end, write_end = os.pipe()  # the write end stays here alone (close-on-exec); its end is ours
    env = {k: v for k, v in os.environ.items() if k != GUARD_ENV}
    # started by a shell that leaves it in the background and exits: so it is no child of this process, which
    # Ray's worker kills as it exits (and, to that end, this process is no subreaper for the moment)
    was_subreaper = _is_subreaper()
    if was_subreaper:
        _prctl(PR_SET_CHILD_SUBREAPER, 0)
    try:
        shell = subprocess.Popen(
            ["/bin/sh", "-c", 'exec 3<&0; "$@" <&3 3<&- &', "sh", sys.executable, "-S", "-c", _GUARD, token],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        shell.wait(30)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.close(write_end)
        log.warning("no guard for the programs of process %d: %s", os.getpid(), e)
        return
    finally:
        os.close(read_end)
        if was_subreaper:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _guard_fds.append(write_end)
    os.environ[GUARD_ENV] = token
    _guarded_pid = os.getpid()


_guard_fds: list[int] = []  # kept open for the process's life


def _is_subreaper() -> bool:
    value = ctypes.c_int(0)
    try:
        return _libc().prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) == 0 and value.value != 0
    except (OSError, AttributeError):
        return False


_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _prctl(option: int, value: int) -> bool:
    try:
        if _libc().prctl(option, value, 0, 0, 0) == 0:
            return True
        log.warning("prctl(%d, %d) failed: %s", option, value, os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.warning("prctl(%d, %d) is not available: %s", option, value, e)
    return False


def started(pid: int) -> None:
    """A program was started as `pid` (a direct child of this process)."""
    with _lock:
        _running.add(pid)


def ended(pid: int, since: float) -> None:
    """The program `pid`, started after `since` (time.monotonic()), has ended and been waited for: kill and
    reap whatever it left running (unless other programs of this process still run: then at their end)."""
    global _since
    with _lock:
        _running.discard(pid)
        if _since is not None:
            since = min(since, _since)
        if _running:
            _since = since
            return
        _since = None
        kill_started_since(since, pid)
        _stop_being_subreaper()


def _stop_being_subreaper() -> None:
    """No program runs: a process that is not one for good stops being a subreaper (see become_subreaper)."""
    global _subreaper_pid
    pid = os.getpid()
    if _subreaper_pid == pid and _for_good_pid != pid and _prctl(PR_SET_CHILD_SUBREAPER, 0):
        _subreaper_pid = 0


def kill_started_since(since: float, first_pid: int = 0) -> None:
    """Kill and reap this process's children that started at or after `since` (time.monotonic()), and all
    their descendants; bounded (a process that forks as fast as it is killed is given up on, with a warning).
    A child started in the same clock tick as `since` counts only if its pid is at least `first_pid`."""
    if not _children():  # the common case: nothing left
        return
    tick = _ticks(since)
    for _ in range(100):
        ours = [pid for pid in _children() if _is_new(pid, tick, first_pid)]
        if not ours:
            return
        for pid in ours:
            for p in _descendants(pid):
                _kill(p)
            _kill(pid)
        _reap(ours)
    log.warning("processes left by a program were still being started after 100 rounds of killing them")


def _ticks(monotonic_s: float) -> int:
    """A time.monotonic() value as the clock ticks since boot that /proc/PID/stat's start times count."""
    offset = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()
    return int((monotonic_s + offset) * _CLK_TCK)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def _is_new(pid: int, tick: int, first_pid: int) -> bool:
    fields = _stat(pid)
    if fields is None:
        return False
    start = int(fields[19])
    return start > tick or (start == tick and pid >= first_pid)


def _children_fd(tid: int) -> int:
    global _fds_pid
    if _fds_pid != os.getpid():  # a forked child: these were the parent's
        _children_fds.clear()
        _fds_pid = os.getpid()
    fd = _children_fds.get(tid)
    if fd is None:
        fd = _children_fds[tid] = os.open(f"/proc/self/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
    return fd


def _children() -> list[int]:
    """This process's children: those of the calling thread (the program it started) and of the main thread
    (which the kernel gives a subreaper's orphans to, as its first live thread)."""
    out: list[int] = []
    for tid in {threading.get_native_id(), os.getpid()}:
        try:
            out += [int(x) for x in os.pread(_children_fd(tid), 1 << 16, 0).split()]
        except OSError as e:  # that thread is gone, or no such file (a kernel without CONFIG_PROC_CHILDREN)
            _children_fds.pop(tid, None)
            if tid == os.getpid():
                _warn_once(e)
    return out


_warned: list[bool] = []


def _warn_once(e: OSError) -> None:
    if not _warned:
        _warned.append(True)
        log.warning("cannot list this process's children (%s): what programs leave running is not ended", e)


def _descendants(pid: int) -> list[int]:
    """All descendants of `pid` (children first found, then theirs), from /proc/PID/task/*/children."""
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pids: list[int], timeout: float = 5.0) -> None:
    """Wait for killed children of this process (bounded: one stuck in the kernel is given up on)."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours to wait for, or waited for elsewhere
                done = pid
            if done:
                left.discard(pid)
        if left:
            if time.monotonic() > deadline:
                log.warning("killed processes %s left by a program did not end within %g s", sorted(left), timeout)
                return
            time.sleep(0.001)
