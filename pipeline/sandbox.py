"""One external program run in its own temporary directory.

The sandbox is the governor's unit of work, with no Ray in it: make a fresh directory, map the inputs
into it as files, run the program there with stdout/stderr captured to files, collect the declared
outputs, remove the directory (on success, failure and timeout alike).
"""

from __future__ import annotations

import atexit
import collections
import errno
import fcntl
import itertools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pipeline import reaper
from pipeline.lines import StdoutMonitor, Watched

log = logging.getLogger(__name__)

STDERR_TAIL_BYTES = 4096
STDERR_TAIL_LINES = 20

#: What an input can be: bytes written into the directory, or an existing file linked into it.
Source = bytes | memoryview | Path


class ExecuteError(Exception):
    """A program run failed: non-zero exit, a signal, a timeout or a missing/invalid output."""

    def __init__(
        self,
        message: str,
        name: str = "",
        returncode: int | None = None,
        stderr_tail: str = "",
        timed_out: bool = False,
    ):
        super().__init__(message)
        self.name = name
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out

    def __reduce__(self):  # keep the attributes across Ray's pickling
        return (type(self), (str(self), self.name, self.returncode, self.stderr_tail, self.timed_out))


def check_relpath(path: str, what: str = "path") -> str:
    """Return `path` normalised if it is a relative path that stays inside a directory, else raise."""
    if not isinstance(path, str):
        raise TypeError(f"{what} must be a string, got {type(path).__name__}: {path!r}")
    if not path or "\0" in path:
        raise ValueError(
            f"{what} {path!r} is empty or contains a NUL byte; give a relative file path like 'out/result.txt'"
        )
    p = PurePosixPath(path)
    if p.is_absolute():
        raise ValueError(f"{what} {path!r} is absolute; give a path relative to the task directory")
    if ".." in p.parts:
        raise ValueError(f"{what} {path!r} escapes the task directory ('..'); give a path inside it")
    norm = str(p)
    if norm in (".", ""):
        raise ValueError(f"{what} {path!r} names the task directory itself; give a file path inside it")
    return norm


@dataclass(frozen=True)
class ProgramRun:
    """What to run. `argv` is a list, or a string when `shell` is true."""

    argv: Sequence[str] | str
    name: str = "task"
    shell: bool = False
    env: Mapping[str, str] | None = field(default=None, repr=False)  # values may be secrets
    timeout: float | None = None
    capture_stdout: bool = False
    output_paths: tuple[str, ...] = ()


@dataclass
class RunResult:
    outputs: dict[str, Path] = field(default_factory=dict)  # valid until the sandbox is closed
    stdout: BinaryIO | None = None  # an unnamed file at offset 0, likewise
    seconds: float = 0.0
    stderr_tail: str = ""  # the last lines the program wrote to stderr (warnings of a success, say)
    watched: Watched | None = None  # what a StdoutMonitor kept of stdout
    stopped: bool = False  # the monitor stopped the program (its exit status and outputs are not checked)


def _tail(f: BinaryIO) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - STDERR_TAIL_BYTES))
    data = f.read()
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-STDERR_TAIL_LINES:])


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


FICLONE = 0x40049409  # ioctl: make dst share src's blocks copy-on-write (btrfs, XFS, bcachefs, ...)
_no_reflink: set[int] = set()  # devices where FICLONE failed: not tried again by this process


def _clone(src_fd: int, dst: Path) -> bool:
    """Make `dst` a private copy-on-write clone of the open file `src_fd`; False if unsupported."""
    dev = os.fstat(src_fd).st_dev
    if dev in _no_reflink:
        return False
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        fcntl.ioctl(fd, FICLONE, src_fd)
        return True
    except OSError:
        _no_reflink.add(dev)
        os.unlink(dst)
        return False
    finally:
        os.close(fd)


def _link_open_file(src_fd: int, src: Path, dst: Path) -> bool:
    """Map the inode open as `src_fd`, found at `src`, at `dst`: a hard link (True: shared), else a symlink
    (True) across filesystems; a private copy (False) if `src` was replaced by another inode meanwhile."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
            raise
        os.symlink(src, dst)
        return True
    if os.lstat(dst).st_ino == os.fstat(src_fd).st_ino:
        return True
    os.unlink(dst)
    with open(f"/proc/self/fd/{src_fd}", "rb") as f, open(dst, "xb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    os.chmod(dst, 0o444)
    return False


def _rmtree(path: Path) -> None:
    """Remove a task directory and whatever the program left in it, also directories it made read-only or
    closed (mode 000). Only directories of that tree are opened up, never through a symlink: a program's
    link to a file elsewhere does not make that file the toolkit's to change."""
    top = os.fspath(path)
    try:
        os.rmdir(top)  # the common case: the program left nothing behind
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    tried: set[str] = set()

    def open_up(d: str) -> None:
        if (d == top or d.startswith(top + os.sep)) and not os.path.islink(d):
            try:
                os.chmod(d, 0o700)
            except OSError:
                pass

    def onerror(func, p, exc_info):
        open_up(os.path.dirname(p))  # a read-only directory's entries cannot be removed
        try:
            if func in (os.open, os.scandir, os.listdir):  # a closed directory: open it, then empty it
                if p not in tried:
                    tried.add(p)
                    open_up(p)
                    shutil.rmtree(p, onerror=onerror)
            else:
                func(p)
        except OSError:
            pass

    shutil.rmtree(top, onerror=onerror)


#: The name of each worker's parent directory of task directories starts with this, then its pid and "-".
TASK_DIRS_PREFIX = "pipeline-tasks-"


def task_dirs_root(tmp_root: str | os.PathLike[str] | None = None) -> Path:
    """Where the task directories' parents are made: `tmp_root`, by default the temporary directory."""
    return Path(tmp_root) if tmp_root is not None else Path(tempfile.gettempdir())


class TaskDirs:
    """Fresh task directories for one long-lived process (a Ray worker), cheaply.

    Each task gets a directory of its own, made empty (mode 0700) by one mkdir relative to the open fd of
    a private parent directory (no path walk, no random name per task) and never reused. The directory work
    is done by a background thread while the tasks pause (no directory asked for in PAUSE_S): it makes as
    many directories ahead as the last burst of tasks took (at least READY_MIN, at most READY_MAX; a task
    makes its own when they run out), and removes the finished ones with whatever the programs left in
    them; also while tasks run once MAX_PENDING wait, which bounds what a long burst leaves behind (4 KiB
    each). Nothing of this runs beside the tasks otherwise: a thread of
    a busy worker costs the tasks more than the work itself (its GIL hand-overs), and removing a directory
    frees its block, which on a filesystem without a journal mounted with `discard` (as this project's
    test VMs' disks are) is a synchronous discard request to the disk per directory.
    A Sandbox that mapped inputs or collects outputs removes its directory itself, at once.
    A process that dies leaves its parent behind: the next TaskDirs under the same root removes the
    parents (of this user) whose process is gone.
    """

    READY_MIN = 64
    READY_MAX = 512
    PAUSE_S = 0.5
    MAX_PENDING = 1024

    def __init__(self, tmp_root: str | os.PathLike[str] | None = None, prefix: str = TASK_DIRS_PREFIX):
        self._root, self._prefix = task_dirs_root(tmp_root), prefix
        _remove_orphans(self._root, prefix)
        self.parent, self._fd = self._new_parent()
        self._old_fds: list[int] = []  # of parents a program removed (closed with this object)
        self._parent_lock = threading.Lock()
        self._count = itertools.count()
        # made ahead, never used: each name with the inode and change time it was made with
        self._ready: collections.deque[tuple[str, int, int]] = collections.deque()
        self._pending: list[str] = []  # finished, to remove
        self._taken = 0  # directories taken since the last fill: the next fill makes as many (within bounds)
        self._last_make = time.monotonic() - self.PAUSE_S  # a new worker has no tasks yet: fill up at once
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._background, name="task-dirs", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _mkdir(self) -> str:
        while True:
            name = f"t{next(self._count)}"
            try:
                os.mkdir(name, 0o700, dir_fd=self._fd)
                return name
            except FileExistsError:  # e.g. made by a program that guessed the name: not ours, skipped
                continue
            except FileNotFoundError:  # the parent is gone (a program removed it): a new one, then go on
                self._renew_parent()

    def _make_ahead(self) -> None:
        name = self._mkdir()
        st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        self._ready.append((name, st.st_ino, st.st_ctime_ns))

    def _untouched(self, name: str, ino: int, ctime_ns: int) -> bool:
        """Whether a directory made ahead is still as it was made: a program next to it (same user) may have
        put something in it or put a link in its place, which changes its change time or its inode."""
        try:
            st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except OSError:
            return False
        return st.st_ino == ino and st.st_ctime_ns == ctime_ns

    def _new_parent(self) -> tuple[Path, int]:
        parent = Path(tempfile.mkdtemp(prefix=f"{self._prefix}{os.getpid()}-", dir=self._root))
        return parent, os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _renew_parent(self) -> None:
        with self._parent_lock:
            if os.fstat(self._fd).st_nlink:  # still there (renewed meanwhile by the other thread)
                return
            self._old_fds.append(self._fd)  # not closed now: the other thread may be using it
            self.parent, self._fd = self._new_parent()
            self._ready.clear()  # all in the removed parent
            with self._lock:
                self._pending = []

    def make(self) -> Path:
        """A new empty directory, mode 0700, for one task."""
        self._last_make = time.monotonic()
        self._taken += 1
        while True:
            try:
                name, ino, ctime_ns = self._ready.popleft()
            except IndexError:
                name = self._mkdir()
                break
            if self._untouched(name, ino, ctime_ns):
                break
            with self._lock:  # not fresh any more: removed with the finished ones
                self._pending.append(name)
        if self._taken == 1:  # the first one taken since the last fill: refill at the next pause
            self._wake.set()
        return self.parent / name

    def remove_later(self, path: Path) -> None:
        """`path` (made by make()) is finished: removed at the tasks' next pause (or with MAX_PENDING)."""
        with self._lock:
            self._pending.append(path.name)
            wake = len(self._pending) in (1, self.MAX_PENDING)  # the first starts the pause's clock
        if wake:
            self._wake.set()

    def _remove_pending(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for name in batch:
            try:
                os.rmdir(name, dir_fd=self._fd)  # the common case: the program left nothing behind
            except FileNotFoundError:
                pass
            except NotADirectoryError:  # a link or file a program put in place of a directory made ahead
                try:
                    os.unlink(name, dir_fd=self._fd)
                except OSError:
                    pass
            except OSError:
                try:
                    _rmtree(self.parent / name)
                except Exception:  # whatever a program left, the thread goes on with the other directories
                    log.warning("could not remove the task directory %s", self.parent / name, exc_info=True)

    def _paused(self) -> bool:
        return time.monotonic() - self._last_make >= self.PAUSE_S

    def _background(self) -> None:
        while not self._closed:
            self._wake.clear()
            if len(self._pending) >= self.MAX_PENDING or (self._pending and self._paused()):
                self._remove_pending()
            if self._paused():
                want = min(self.READY_MAX, max(self.READY_MIN, self._taken))  # as many as the last burst took
                self._taken = 0
                while len(self._ready) < want and self._paused() and not self._closed:  # stop if tasks come
                    self._make_ahead()
            quiet = time.monotonic() - self._last_make
            if quiet < self.PAUSE_S and (self._pending or self._taken):
                self._wake.wait(self.PAUSE_S - quiet)  # work for the pause
            elif not self._pending and not self._taken:
                self._wake.wait()  # nothing to do until a task takes or leaves a directory

    def close(self) -> None:
        """Remove everything now (also run at exit)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._remove_pending()
        for fd in (self._fd, *self._old_fds):
            os.close(fd)
        _rmtree(self.parent)


_devnull_fd: int | None = None


def _devnull() -> int:
    """/dev/null, opened once per process (subprocess.DEVNULL opens it again for every program)."""
    global _devnull_fd
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _devnull_fd


def remove_orphaned_task_dirs(tmp_root: str | os.PathLike[str] | None = None) -> None:
    """Remove the TaskDirs parents under `tmp_root` (default: the temporary directory) of processes that are
    gone, e.g. the Ray workers of a local Ray that has stopped (they are killed, so cannot remove their own)."""
    _remove_orphans(task_dirs_root(tmp_root), TASK_DIRS_PREFIX)


def _remove_orphans(root: Path, prefix: str) -> None:
    """Remove `root/PREFIX<pid>-*` directories of this user whose process no longer exists."""
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for p in candidates:
        pid_text = p.name[len(prefix) :].split("-", 1)[0]
        try:
            if not pid_text.isdigit() or p.lstat().st_uid != os.geteuid() or not p.is_dir():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            _rmtree(p)
        except OSError:
            continue


class Sandbox:
    """A temporary directory for one run. Use as a context manager; it is removed on exit.

    Captured stdout and stderr go to unnamed files outside the directory, so the program sees a
    directory holding only its inputs.
    """

    def __init__(
        self,
        tmp_root: str | os.PathLike[str] | None = None,
        prefix: str = "pipeline-task-",
        stderr_file: BinaryIO | None = None,
        dirs: TaskDirs | None = None,
    ):
        """`stderr_file`: an open file to capture stderr in, emptied first (a worker reuses one for all
        its tasks, which saves creating a file per task); by default a new unnamed file. `dirs`: where the
        directory comes from and goes back to (removed soon after, off the caller's path); by default a
        new temporary directory under `tmp_root`, removed on close."""
        self._dirs = dirs
        self.workdir = dirs.make() if dirs is not None else Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_root))
        self._tmp_root = dirs.parent if dirs is not None else tmp_root
        self._files: list[BinaryIO] = []
        self._stderr_file = stderr_file
        self._holds_files = False  # inputs mapped or outputs declared: the directory is removed at once
        reaper.become_subreaper()  # what the programs leave running is re-parented here, to be ended

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
        if self._dirs is not None and not self._holds_files:
            self._dirs.remove_later(self.workdir)  # no data of ours in it: removal can wait
        else:
            _rmtree(self.workdir)

    def _unnamed_file(self) -> BinaryIO:
        f: BinaryIO = tempfile.TemporaryFile(dir=self._tmp_root)
        self._files.append(f)
        return f

    def _dst(self, relpath: str) -> Path:
        self._holds_files = True
        dst = self.workdir / check_relpath(relpath, "input path")
        if dst.parent != self.workdir:
            dst.parent.mkdir(parents=True, exist_ok=True)
        return dst

    def map_input(self, relpath: str, source: Source) -> Path:
        """Write bytes into a new read-only file at `relpath` (the program's own copy), or link a file."""
        dst = self._dst(relpath)
        if isinstance(source, Path):
            with open(source, "rb") as f:
                self.map_shared(relpath, f.fileno(), source)
            return dst
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        with open(fd, "wb") as f:
            f.write(source)
        return dst

    def map_shared(self, relpath: str, fd: int, path: Path) -> bool:
        """Map the open file `fd` (found at `path`) at `relpath`: a private copy-on-write clone where the
        filesystem offers one (False), else the same inode, hard-linked or symlinked (True: shared)."""
        dst = self._dst(relpath)
        if _clone(fd, dst):
            return False
        return _link_open_file(fd, path, dst)

    def run(
        self, program: ProgramRun, stdin: Source | int | None = None, monitor: StdoutMonitor | None = None
    ) -> RunResult:
        """Run the program in the work directory; raise ExecuteError on any failure.

        The program inherits this process's environment, plus `program.env` when given. With a `monitor`, its
        stdout goes through a pipe that the monitor reads while it runs (and copies to the captured file when
        stdout is captured too); a program the monitor stopped is a result with `stopped` set, not an error.
        """
        env = None if program.env is None else {**os.environ, **program.env}
        self._holds_files = self._holds_files or bool(program.output_paths)
        if self._stderr_file is not None:
            err = self._stderr_file
            if os.fstat(err.fileno()).st_size:  # the last program wrote to it (one syscall, not two; its size,
                err.seek(0)  # not our offset: a program may have opened /dev/stderr anew and written at 0)
                err.truncate()
        else:
            err = self._unnamed_file()
        out = self._unnamed_file() if program.capture_stdout else None
        stdin_arg: BinaryIO | int = _devnull()
        if isinstance(stdin, (Path, int)):  # a file, or an open one read from its start
            stdin_arg = open(stdin if isinstance(stdin, Path) else f"/proc/self/fd/{stdin}", "rb")
            self._files.append(stdin_arg)
        elif stdin is not None:
            stdin_arg = self._unnamed_file()
            stdin_arg.write(stdin)
            stdin_arg.seek(0)
        if monitor is not None and monitor.stopped:  # stopped before it started (a sweep that ended meanwhile)
            return RunResult(watched=monitor.finish(), stopped=True)
        pipe = _stdout_pipe(monitor)
        start = time.monotonic()
        executable = _resolved(program.argv, env)
        while True:
            try:
                proc = subprocess.Popen(
                    program.argv,
                    executable=executable,
                    shell=program.shell,
                    cwd=self.workdir,
                    env=env,
                    stdin=stdin_arg,
                    stdout=pipe[1] if pipe is not None else out if out is not None else _devnull(),
                    stderr=err,
                    start_new_session=True,
                )
                break
            except OSError as e:
                if executable is not None and isinstance(e, FileNotFoundError):  # gone since it was found
                    _resolved_programs.clear()
                    executable = None
                    continue
                _close_pipe(pipe)
                raise ExecuteError(
                    f"task {program.name!r} could not start {_argv0(program)!r}: {e.strerror}", name=program.name
                ) from None
        reaper.started(proc.pid)
        if monitor is not None and pipe is not None:
            os.close(pipe[1])
            monitor.start(pipe[0], proc.pid, copy_to=out)
        timed_out = False
        try:
            returncode = proc.wait(timeout=program.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _killpg(proc.pid)
            returncode = proc.wait()
        finally:
            _killpg(proc.pid)  # whatever the program left running in its session
            reaper.ended(proc.pid, start)  # and what it left outside it (daemons)
        seconds = time.monotonic() - start
        watched = monitor.finish() if monitor is not None else None
        if monitor is not None and monitor.stopped:
            tail = _tail(err) if os.fstat(err.fileno()).st_size else ""
            return RunResult(seconds=seconds, stderr_tail=tail, watched=watched, stopped=True)
        if timed_out or returncode != 0:
            tail = _tail(err)
            what = f"timed out after {program.timeout:g} s" if timed_out else _describe_exit(returncode)
            msg = f"task {program.name!r} {what}"
            msg += f"; last lines of stderr:\n{tail}" if tail else "; stderr was empty"
            raise ExecuteError(msg, name=program.name, returncode=returncode, stderr_tail=tail, timed_out=timed_out)
        if out is not None:
            out.seek(0)
        result = RunResult(
            stdout=out,
            seconds=seconds,
            stderr_tail=_tail(err) if os.fstat(err.fileno()).st_size else "",
            watched=watched,
        )
        real_work = os.path.realpath(self.workdir) if program.output_paths else ""
        for rel in program.output_paths:
            p = self.workdir / rel
            if not os.path.lexists(p):
                raise ExecuteError(
                    f"task {program.name!r} did not create its declared output {rel!r}",
                    name=program.name,
                    returncode=returncode,
                    stderr_tail=_tail(err),
                )
            real = os.path.realpath(p)
            if os.path.commonpath([real, real_work]) != real_work:
                raise ExecuteError(
                    f"task {program.name!r}: output {rel!r} is a symlink pointing outside the "
                    f"task directory ({real}); refused",
                    name=program.name,
                    returncode=returncode,
                )
            if not os.path.isfile(real):
                raise ExecuteError(
                    f"task {program.name!r}: output {rel!r} is not a regular file; declare files",
                    name=program.name,
                    returncode=returncode,
                )
            result.outputs[rel] = Path(real)
        return result


_resolved_programs: dict[tuple[str, str], str | None] = {}


def _resolved(argv: Sequence[str] | str, env: Mapping[str, str] | None) -> str | None:
    """The file a program name (no '/') runs, found on PATH once per process and name (subprocess would
    build and try every PATH entry again for each program started); None: let subprocess look."""
    if isinstance(argv, str) or not argv or "/" in argv[0]:
        return None
    path = (os.environ if env is None else env).get("PATH", os.defpath)
    key = (argv[0], path)
    try:
        return _resolved_programs[key]
    except KeyError:
        found = shutil.which(argv[0], path=path)
        if found is None or not os.path.isabs(found):  # not found, or relative to the task's directory
            return None
        if len(_resolved_programs) < 256:
            _resolved_programs[key] = found
        return found


def _argv0(program: ProgramRun) -> str:
    if isinstance(program.argv, str):
        return program.argv.split()[0] if program.argv.split() else program.argv
    return program.argv[0] if program.argv else ""


def _stdout_pipe(monitor: StdoutMonitor | None) -> tuple[int, int] | None:
    """The pipe a monitored program writes its stdout to (read end, write end); None without a monitor."""
    return os.pipe2(os.O_CLOEXEC) if monitor is not None else None


def _close_pipe(pipe: tuple[int, int] | None) -> None:
    for fd in pipe or ():
        os.close(fd)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
