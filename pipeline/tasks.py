"""Execute tasks on Ray: external programs run in per-task sandboxes, with data passed as files.

    from pipeline import tasks
    t = tasks.Execute("sort", stdin=tasks.blob("b\\na\\n"), stdout=True)
    print(t.output.fetch().get_str())

A data object is a file's bytes held in Ray's object store (as a uint8 array, so a task reads it
zero-copy); it is mapped into a consumer's directory through the node-local cache (pipeline.cache).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Union

import numpy as np
import ray

from pipeline import reaper
from pipeline.cache import Entry, NodeCache
from pipeline.lines import StdoutMonitor, Watch, Watched
from pipeline.progress import Reporter, ReportTo, watched_run
from pipeline.ray_address import RayAddressError, check_ray_address
from pipeline.sandbox import ExecuteError, ProgramRun, Sandbox, TaskDirs, check_relpath, remove_orphaned_task_dirs

log = logging.getLogger(__name__)

__all__ = [
    "DataObject",
    "Execute",
    "ExecuteError",
    "FetchedData",
    "RayAddressError",
    "RunInfo",
    "Watch",
    "Watched",
    "blob",
    "ensure_ray",
    "file",
    "stop_local_ray",
]


def ensure_ray(
    address: str | None = None, num_cpus: int | None = None, runtime_env: dict[str, Any] | None = None
) -> None:
    """Connect to Ray unless connected: `address`, else RAY_ADDRESS, else a new local Ray (with
    `num_cpus` CPUs when given, else all of this machine's). `runtime_env` is the job's (e.g. the
    programs' extra `pip` packages, which Ray installs on every node that runs a task).

    Through Ray Client (ray://...) this package is shipped to the cluster with the job, so the nodes
    need only Ray and the programs' own dependencies installed.

    An address that does not answer like Ray raises RayAddressError at once (one line naming it)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_ray_address(address)
    kwargs: dict[str, Any] = {"logging_level": "WARNING"}
    env = dict(runtime_env or {})
    if address is None:
        kwargs.update(include_dashboard=False, log_to_driver=True, num_cpus=num_cpus)
    elif address.startswith("ray://"):
        env["py_modules"] = [str(Path(__file__).resolve().parent)]
    if env:
        kwargs["runtime_env"] = env
    if address is not None and address.startswith("ray://"):
        _init_ray_client(address, kwargs)
    else:
        ray.init(address=address, **kwargs)
    if address is None:
        _clean_up_local_ray_at_exit()


#: Ray's client server on the head starts a server per client and reads its command line while it starts; one
#: that dies at once is a zombie by then, and the connection ends with this (psutil.ZombieProcess) although the
#: next client starts fine. Seen once in a full test run after several sweeps on the same cluster.
CLIENT_START_RACE = "Initialization failure from server"
CLIENT_START_ATTEMPTS = 3


def _init_ray_client(address: str, kwargs: dict[str, Any]) -> None:
    """ray.init through Ray Client, tried again (at most CLIENT_START_ATTEMPTS times) when the head's client
    server failed to start this client's server; any other failure is raised at once."""
    for attempt in range(1, CLIENT_START_ATTEMPTS + 1):
        try:
            ray.init(address=address, **kwargs)
            return
        except ConnectionAbortedError as e:
            if CLIENT_START_RACE not in str(e) or attempt == CLIENT_START_ATTEMPTS:
                raise
            log.warning("Ray's client server at %s failed to start this client (%s); trying again", address, e)
            ray.shutdown()
            time.sleep(1.0)


def _clean_up_local_ray_at_exit() -> None:
    """The local Ray this process started keeps its session directory after it stops; Ray's logs there are
    small, but the environments it built for the job's `pip` packages are a clone of this whole Python
    environment each (gigabytes), which no later session uses. And its workers are killed when it stops,
    leaving their task directories (some made ahead) behind. Stop Ray, then remove both, at exit."""
    node = getattr(ray._private.worker, "_global_node", None)  # Ray has no public accessor for it
    if node is None or not node.is_head():  # not started here: ray.init joined a `ray start` on this machine
        return
    atexit.register(_stop_and_clean_up, node)  # runs before Ray's own atexit shutdown, registered at its import


def stop_local_ray() -> None:
    """ray.shutdown(); and if this process started that Ray (ensure_ray or ray.init without an address),
    remove what it leaves behind: the environments built for `pip` packages, the task directories of its
    workers (which Ray kills)."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not node.is_head():
        ray.shutdown()
    else:
        atexit.unregister(_stop_and_clean_up)  # done now: not again at exit
        _stop_and_clean_up(node)


def _stop_and_clean_up(node: Any) -> None:
    built = Path(node.get_session_dir_path()) / "runtime_resources"
    workers = _children(getattr(node, "all_processes", {}).get("raylet", []))
    ray.shutdown()
    shutil.rmtree(built, ignore_errors=True)
    deadline = time.monotonic() + 5  # killed by the raylet's end: gone at once, or nearly
    while (workers := [pid for pid in workers if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    remove_orphaned_task_dirs(os.environ.get("PIPELINE_SANDBOX_DIR"))  # where the workers made them


def _children(processes: list) -> list[int]:
    """The pids of the processes whose parent is one of `processes` (Ray's ProcessInfo, e.g. the raylet's)."""
    parents = {str(p.process.pid) for p in processes if getattr(p, "process", None) is not None}
    found = []
    for entry in os.scandir("/proc") if parents else ():
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = f.read().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            if ppid in parents:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------- data objects


class FetchedData:
    """The bytes of a data object, brought to this process."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def get_bytes(self) -> bytes:
        return self._array.tobytes()

    def get_str(self, encoding: str = "utf-8") -> str:
        return self._array.tobytes().decode(encoding)

    def write(self, path: str | os.PathLike) -> Path:
        """Write to a local file (atomically: a reader never sees half a file); return its path."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")  # new: never an existing file or link
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with open(fd, "wb") as f:
                f.write(self._array.data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def __len__(self) -> int:
        return int(self._array.size)


@dataclass(frozen=True)
class DataObject:
    """A reference to a file's content in Ray; `key` names it in node caches, `name` is a file-name hint."""

    ref: ray.ObjectRef
    key: str
    name: str = ""

    def fetch(self, timeout: float | None = None) -> FetchedData:
        return FetchedData(get(self.ref, timeout=timeout))

    def __repr__(self) -> str:
        return f"DataObject(name={self.name!r}, key={self.key[:8]}…)"


def _as_array(data: bytes | bytearray | memoryview | str) -> np.ndarray:
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob() takes bytes or str, got {type(data).__name__}")
    return np.frombuffer(data, dtype=np.uint8)


def blob(data: bytes | bytearray | memoryview | str, name: str = "") -> DataObject:
    """Put bytes (or str, as UTF-8) into Ray as a data object."""
    array = _as_array(data)
    ensure_ray()
    return DataObject(ray.put(array), uuid.uuid4().hex, name)


def file(path: str | os.PathLike) -> DataObject:
    """A local file's content as a data object (named after the file)."""
    path = Path(path)
    array = np.fromfile(path, dtype=np.uint8)
    ensure_ray()
    return DataObject(ray.put(array), uuid.uuid4().hex, path.name)


# ---------------------------------------------------------------------------------------- task spec


@dataclass(frozen=True)
class _Spec:
    """What a worker needs to run one Execute task; data appear as indexes into the task's inputs.
    Sent as a tuple of these fields in this order (Execute builds it)."""

    name: str
    argv: tuple[str | int, ...]  # ints index into `inputs` (mapped to a random file name)
    shell: bool
    input_names: tuple[str, ...]  # the relative path of each input in the task directory
    input_keys: tuple[str, ...]
    stdin: int | None  # index into inputs
    output_paths: tuple[str, ...]
    output_keys: tuple[str, ...]  # cache keys of outputs (incl. stdout when captured)
    capture_stdout: bool
    env: tuple[tuple[str, str], ...] | None
    timeout: float | None
    watch: Watch | None = None  # stdout read on the node while the program runs (pipeline.lines)
    report_to: ReportTo | None = None  # where its progress reports go (pipeline.progress)


@dataclass(frozen=True)
class RunInfo:
    """What a finished task reports besides its outputs."""

    name: str
    node_ip: str
    hostname: str
    seconds: float
    input_bytes_written: int  # bytes this task wrote to map its inputs (0 on cache hits)
    attempt: int = 0  # 0 on the first run; more when Ray re-ran it (e.g. a node was lost)
    stderr_tail: str = ""  # the last lines the program wrote to stderr ("" when it wrote none)
    watched: Watched | None = None  # what was kept of stdout, for a task given `watch`
    stopped: bool = False  # the program was stopped on request (its outputs are empty)


def _random_name(data: DataObject) -> str:
    """A new file name for a data object in a task's directory, keeping its name's suffix when that is plain
    (`.npz`, `.tar.gz`): the name is pasted into a shell command unquoted (shell=True)."""
    suffixes = PurePosixPath(data.name).suffixes[-2:] if data.name else []
    suffix = "".join(x for x in suffixes if _PLAIN_SUFFIX.fullmatch(x))
    return f"d{uuid.uuid4().hex[:12]}{suffix}"


_PLAIN_SUFFIX = re.compile(r"\.[A-Za-z0-9_-]{1,16}")


@dataclass(frozen=True)
class _Worker:
    cache: NodeCache
    node_ip: str
    hostname: str
    stderr_file: Any  # one unnamed file this worker captures every task's stderr in (a task at a time)
    dirs: TaskDirs  # where its task directories are made


_worker: _Worker | None = None


def _worker_setup() -> _Worker:
    """Once per worker process: `python3` in a task means this worker's interpreter (its environment
    has what tasks need); the node cache is opened; the node's address is looked up; a guard is started
    that ends what the tasks' programs leave running if this worker is killed (pipeline.reaper)."""
    global _worker
    if _worker is None:
        bindir = os.path.dirname(sys.executable)
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[0] != bindir:
            os.environ["PATH"] = bindir + os.pathsep + path
        ip = ray.util.get_node_ip_address() if ray.is_initialized() else ""
        dirs = TaskDirs(os.environ.get("PIPELINE_SANDBOX_DIR"))
        reaper.guard_this_process()  # what a task's program leaves is killed also when this worker is killed
        reaper.become_subreaper(for_good=True)  # and, while it lives, when the program ends
        _worker = _Worker(NodeCache(), ip, socket.gethostname(), tempfile.TemporaryFile(), dirs)
    return _worker


#: Inputs up to this size are written into each task's directory (a private copy the program may change
#: freely); larger ones are shared through the node cache, checked before and after each task.
PRIVATE_COPY_MAX_BYTES = 1 << 20


def _run_spec(spec: _Spec, inputs: Sequence[np.ndarray]) -> list:
    """Worker side: map inputs (small ones copied, large ones through the node cache), run in a sandbox,
    check the shared inputs were not changed, return [info, *outputs]."""
    worker = _worker_setup()
    in_argv = _argv_names(spec)
    written = 0
    shared: list[tuple[str, Entry, np.ndarray]] = []  # inputs whose file is the node cache's own inode
    stdin: bytes | memoryview | int | None = None
    with Sandbox(stderr_file=worker.stderr_file, dirs=worker.dirs) as box:
        try:
            for i, (key, rel, array) in enumerate(zip(spec.input_keys, spec.input_names, inputs)):
                stdin_only = spec.stdin == i and rel not in in_argv  # needs no file in the directory
                data = array.data
                if array.size <= PRIVATE_COPY_MAX_BYTES:
                    written += array.size
                    if stdin_only:
                        stdin = data
                    else:
                        box.map_input(rel, data)
                        if spec.stdin == i:
                            stdin = data
                    continue
                entry = worker.cache.acquire(key, data)
                written += entry.written
                if stdin_only or box.map_shared(rel, entry.fd, entry.path):
                    shared.append((rel, entry, array))
                else:
                    entry.close()  # a private clone: nothing shared to check
                    continue
                if spec.stdin == i:
                    stdin = entry.fd
            monitor, reporter = _monitor(spec)
            try:
                result = box.run(_program(spec), stdin=stdin, monitor=monitor)
            finally:
                if reporter is not None:
                    reporter.close()
                _check_shared(spec.name, worker.cache, shared)
        finally:
            for _, entry, _ in shared:
                entry.close()
        outputs = []
        for key, rel in zip(spec.output_keys, spec.output_paths):
            path = result.outputs.get(rel)  # none of a stopped program
            array = np.fromfile(path, dtype=np.uint8) if path is not None else np.zeros(0, np.uint8)
            outputs.append(array)
            if path is not None and array.size > PRIVATE_COPY_MAX_BYTES:
                worker.cache.adopt(key, path)  # a consumer on this node links it, writing nothing
        if spec.capture_stdout:
            stdout = np.fromfile(result.stdout, dtype=np.uint8) if result.stdout is not None else np.zeros(0, np.uint8)
            outputs.append(stdout)
    # the RunInfo's fields as a list: Ray sends that as plain msgpack, cheaper than pickling a dataclass
    info = [spec.name, worker.node_ip, worker.hostname, result.seconds, written, _attempt(), result.stderr_tail]
    if spec.watch is not None:
        info += [result.watched, result.stopped]
    return [info, *outputs]


def _monitor(spec: _Spec) -> tuple[StdoutMonitor | None, Reporter | None]:
    """The reader of the program's stdout on this node, for a task given `watch`, and the reporter of its
    progress to the sweep, for a task given `report_to` too."""
    if spec.watch is None:
        return None, None
    return watched_run(spec.watch, spec.report_to, _attempt())


def _program(spec: _Spec) -> ProgramRun:
    argv_items = [spec.input_names[a] if isinstance(a, int) else a for a in spec.argv]
    argv: str | list[str] = argv_items
    if spec.shell:  # the items are shell text; data names are plain random names, safe unquoted
        argv = " ".join(argv_items)
    return ProgramRun(
        argv=argv,
        name=spec.name,
        shell=spec.shell,
        env=dict(spec.env) if spec.env is not None else None,
        timeout=spec.timeout,
        capture_stdout=spec.capture_stdout,
        output_paths=spec.output_paths,
    )


def _check_shared(name: str, cache: NodeCache, shared: list[tuple[str, Entry, np.ndarray]]) -> None:
    """After a run: a shared input that changed is evicted from the node cache, and fails the task (its
    result, or a concurrent task's, may come from changed data)."""
    changed = []
    for rel, entry, array in shared:
        why = entry.mismatch(array.data)
        if why is not None:
            cache.evict(entry, why)
            changed.append(f"input {rel!r} was changed ({why})")
    if changed:
        raise ExecuteError(
            f"task {name!r}: {'; '.join(changed)} while it ran; inputs are shared read-only with the other "
            f"tasks on this node (copy one to change it); the node's cached copy was discarded",
            name=name,
        )


def _attempt() -> int:
    """Which run of this task this is (Ray re-runs a task whose worker or node died)."""
    try:
        worker: Any = ray._private.worker.global_worker  # its core_worker exists only in a worker
        return int(worker.core_worker.get_current_task_attempt_number())
    except Exception:
        return 0


def _argv_names(spec: _Spec) -> set[str]:
    return {spec.input_names[a] for a in spec.argv if isinstance(a, int)}


@ray.remote
def _execute_remote(spec: bytes, *inputs: np.ndarray):
    out = _run_spec(_Spec(*pickle.loads(spec)), inputs)
    return out[0] if len(out) == 1 else tuple(out)


_options_cache: dict[tuple, Any] = {}


def _remote_for(num_returns: int, cpus: float, gpus: float):
    if num_returns == 1 and cpus == 1 and gpus == 0:  # the remote function's defaults: no option merging
        return _execute_remote
    key = (num_returns, cpus, gpus)
    fn = _options_cache.get(key)
    if fn is None:
        fn = _options_cache[key] = _execute_remote.options(num_returns=num_returns, num_cpus=cpus, num_gpus=gpus)
    return fn


def _check_amount(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{what} must be a number >= 0 (a fraction below 1 shares one), got {value!r}")
    if value > 1 and value != int(value):
        raise ValueError(f"{what} must be a whole number when above 1 (Ray's rule), got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------ Execute

DataLike = Union["Execute", DataObject]


def _as_data(item: Any, where: str) -> DataObject:
    if isinstance(item, DataObject):
        return item
    if isinstance(item, Execute):
        return item.output
    raise TypeError(
        f"{where} must be a data object (tasks.blob(...), a task's output) or a task, "
        f"got {type(item).__name__}: {item!r}"
    )


class Execute:
    """An external program run as a Ray task in a fresh temporary directory on some node.

    Submitted when constructed. `outputs` maps each declared output path (and "stdout" when captured)
    to a data object; `output` is the single one; `wait()` returns the RunInfo or raises ExecuteError.
    `watch` (a pipeline.lines.Watch) has the program's stdout read on its node while it runs, in bounded
    memory: the RunInfo's `watched` holds its last lines and tail (what a sweep reads its metric from), so
    stdout need not travel whole; `stdout=True` still returns it whole as a data object. With `report_to` too
    (pipeline.progress), its progress reports go to the sweep as they are printed, and the sweep can stop it.
    `info_ref` is the task's own Ray object (for ray.wait or ray.cancel; `wait()` reads it). A running program
    is stopped by `ray.cancel(info_ref, force=True)`; without force, Ray's cancel reaches the task only once
    its program has ended (the worker waits for it in one call that Ray's interrupt does not break).
    """

    def __init__(
        self,
        args: str | Sequence[Any],
        stdout: bool = False,
        stdin: DataLike | None = None,
        input_paths: Mapping[str, DataLike] | Iterable[tuple[str, DataLike]] = (),
        output_paths: Iterable[str] = (),
        shell: bool = False,
        name: str | None = None,
        cpus: float = 1,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        gpus: float = 0,
        watch: Watch | None = None,
        report_to: ReportTo | None = None,
    ):
        argv, datas, names = self._parse_args(args, shell)
        for rel, item in _pairs(input_paths):
            rel = check_relpath(rel, "input path")
            if rel in names:
                raise ValueError(f"input path {rel!r} is given twice; each input needs its own path")
            datas.append(_as_data(item, f"input_paths[{rel!r}]"))
            names.append(rel)
        stdin_index = None
        if stdin is not None:
            datas.append(_as_data(stdin, "stdin"))
            names.append(f".stdin-{uuid.uuid4().hex[:8]}")
            stdin_index = len(datas) - 1
        if isinstance(output_paths, str):
            raise TypeError(f"output_paths must be a list of paths, not the string {output_paths!r}")
        if not isinstance(output_paths, Iterable):
            raise TypeError(f"output_paths must be a list of relative file paths, got {output_paths!r}")
        outs = tuple(check_relpath(p, "output path") for p in output_paths)
        if len(set(outs)) != len(outs):
            raise ValueError(f"output_paths has duplicates: {list(outs)}")
        clash = set(outs) & set(names)
        if clash:
            raise ValueError(f"output path(s) {sorted(clash)} are also inputs; an output must be a new file")
        if stdout and "stdout" in outs:
            raise ValueError("output path 'stdout' clashes with stdout=True; rename the file")
        _no_file_is_a_directory([*names, *outs])
        cpus = _check_amount(cpus, "cpus")
        gpus = _check_amount(gpus, "gpus")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf
        ):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        if env is not None:
            _check_env(env)
        if watch is not None and not isinstance(watch, Watch):
            raise TypeError(f"watch must be a pipeline.lines.Watch or None, got {type(watch).__name__}")
        if report_to is not None and (watch is None or watch.progress is None):
            raise ValueError("report_to needs a watch with progress (the reports come from the program's stdout)")
        out_names = list(outs) + (["stdout"] if stdout else [])
        self.name = name or _default_name(argv, names)
        output_keys = tuple(uuid.uuid4().hex for _ in out_names)
        # the _Spec's fields in order, pickled as a tuple (faster than a dataclass); Ray passes bytes through
        # its fast path
        spec = (
            self.name,
            tuple(argv),
            shell,
            tuple(names),
            tuple(d.key for d in datas),
            stdin_index,
            outs,
            output_keys,
            bool(stdout),
            tuple(sorted(env.items())) if env is not None else None,
            float(timeout) if timeout is not None else None,
            watch,
            report_to,
        )
        ensure_ray()
        spec_bytes = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
        refs = _remote_for(1 + len(out_names), cpus, gpus).remote(spec_bytes, *(d.ref for d in datas))
        if not isinstance(refs, list):
            refs = [refs]
        self.info_ref: ray.ObjectRef = refs[0]
        self.outputs: dict[str, DataObject] = {
            n: DataObject(r, k, PurePosixPath(n).name) for n, r, k in zip(out_names, refs[1:], output_keys)
        }

    @staticmethod
    def _parse_args(args: Any, shell: bool) -> tuple[list, list[DataObject], list[str]]:
        if isinstance(args, str):
            items: list[Any] = [args] if shell else shlex.split(args)
        elif isinstance(args, (list, tuple)):
            items = list(args)
        else:
            raise TypeError(f"args must be a string or a list, got {type(args).__name__}")
        if not items:
            raise ValueError("args is empty; give the program to run, e.g. 'python3 prog.py'")
        if isinstance(items[0], str) and not items[0].strip():
            raise ValueError(f"args: the program to run is empty ({items[0]!r}); give it first, e.g. 'python3 prog.py'")
        argv: list[str | int] = []
        datas: list[DataObject] = []
        names: list[str] = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if "\0" in item:  # no program can be given it
                    raise ValueError(f"args[{i}] contains a NUL byte: {item[:60]!r}")
                argv.append(item)
            elif isinstance(item, (DataObject, Execute)):
                d = _as_data(item, f"args[{i}]")
                datas.append(d)
                names.append(_random_name(d))
                argv.append(len(datas) - 1)
            else:
                raise TypeError(
                    f"args[{i}] must be a string, a data object or a task, got {type(item).__name__}: {item!r}"
                )
        return argv, datas, names

    @property
    def output(self) -> DataObject:
        if len(self.outputs) != 1:
            raise ValueError(
                f"task {self.name!r} has {len(self.outputs)} outputs "
                f"({', '.join(self.outputs) or 'none'}); use task.outputs[name]"
            )
        return next(iter(self.outputs.values()))

    def wait(self, timeout: float | None = None) -> RunInfo:
        """Block until the task ends; return its RunInfo or raise its ExecuteError."""
        try:
            return RunInfo(*get(self.info_ref, timeout=timeout))
        except (ExecuteError, ray.exceptions.RayTaskError):
            self._errors_seen()
            raise

    def _errors_seen(self) -> None:
        """The task failed, so each of its outputs holds the error just raised: read them (at once, they are
        there), so that Ray does not report each as an unhandled error, traceback and all, when it goes."""
        for d in self.outputs.values():
            try:
                ray.get(d.ref, timeout=0)
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"Execute(name={self.name!r}, outputs={list(self.outputs)})"


def get(refs, timeout: float | None = None):
    """ray.get, but a failed Execute task raises its own ExecuteError rather than Ray's wrapper."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ExecuteError):
            raise e.cause from None
        raise


def _pairs(input_paths: Any) -> list[tuple[Any, Any]]:
    if isinstance(input_paths, Mapping):
        return list(input_paths.items())
    what = "input_paths must map relative paths to data objects (a dict, or (path, data) pairs)"
    if isinstance(input_paths, (str, bytes)) or not isinstance(input_paths, Iterable):
        raise TypeError(f"{what}, got {input_paths!r}")
    pairs = list(input_paths)
    for item in pairs:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{what}; {item!r} is not a (path, data) pair")
    return pairs


def _no_file_is_a_directory(paths: list[str]) -> None:
    """Refuse a path that is also a directory of another (an input "a" and an output "a/b"): both cannot be."""
    given = set(paths)
    for p in paths:
        for parent in PurePosixPath(p).parents:
            if str(parent) in given:
                raise ValueError(
                    f"{str(parent)!r} is a directory of {p!r} and also a file (an input or output path); "
                    f"a path cannot be both"
                )


def _check_env(env: Any) -> None:
    if not isinstance(env, Mapping):
        raise TypeError(f"env must map str to str (a dict), got a {type(env).__name__}")  # not its values: secrets
    bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"env must map str to str; bad entries for {bad!r}")
    for k, v in env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ValueError(
                f"env: {k!r} cannot be set: a name must be non-empty without '=' or NUL, a value without NUL"
            )


def _default_name(argv: list, names: list[str]) -> str:
    parts = [a if isinstance(a, str) else names[a] for a in argv[:3]]
    text = " ".join(parts)
    return text if len(text) <= 60 else text[:57] + "..."
