"""The sweep file: parse and validate it, expand its search into trials, read a trial's metric.

    spec = load("examples/descent.toml")       # SpecError (one line, naming the field) on any mistake
    for trial in spec.trials():               # grid: the product of the lists; random: seeded samples
        argv = spec.render_args(trial, data_paths)

Nothing here needs Ray: everything is checked before any work starts.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import random
import re
import shlex
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.lines import GRACE_S, ProgressSpec
from pipeline.sandbox import check_relpath

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_TRIALS = 100_000
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BUILTINS = ("trial.id", "trial.seed")
#: results.csv's columns besides the parameters and the metric: a parameter cannot have one of these names
RESULT_COLUMNS = ("trial", "status", "step", "seconds", "node", "attempts", "retries", "error")
#: files a trial's directory under --out/trials holds besides its outputs, and where its data appear
RESERVED_OUTPUTS = ("stdout", "stdout.txt", "stderr.txt", "progress.csv")
TOP_KEYS = (
    "program",
    "interpreter",
    "args",
    "outputs",
    "metric",
    "goal",
    "data",
    "params",
    "search",
    "resources",
    "packages",
    "env",
    "progress",
)
SEARCH_KEYS = (
    "kind",
    "trials",
    "seed",
    "scheduler",
    "min_step",
    "max_step",
    "reduction",
    "target",
    "max_trials",
    "concurrency",
    "budget_node_hours",
    "grace",
)
#: search fields that say when to stop, not what the trials are: they may change between runs of one sweep
STOP_KEYS = ("trials", "target", "max_trials", "concurrency", "budget_node_hours", "grace")
#: seconds a stopped trial's program has between SIGTERM and SIGKILL, by default
SCHEDULERS = ("none", "asha", "hyperband", "median")


class SpecError(ValueError):
    """A mistake in a sweep file: one line naming the field, what is wrong and what is valid."""


@dataclass(frozen=True)
class Param:
    """One parameter: grid `values`, or a distribution sampled in a random search."""

    name: str
    kind: str  # "values" (a list or a range) or "uniform" / "log-uniform" / "int-uniform"
    values: tuple[Any, ...] = ()
    low: float = 0.0  # an int for int-uniform (exact beyond 2**53)
    high: float = 0.0

    @property
    def log(self) -> bool:
        return self.kind == "log-uniform"

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "values":
            return self.values[rng.randrange(len(self.values))]
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "int-uniform":
            return rng.randint(int(self.low), int(self.high))  # ints as written
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


@dataclass(frozen=True)
class DataItem:
    """A file every trial gets: a URL fetched once by a task (sha256 optional), or a local file."""

    name: str
    url: str | None = None
    path: Path | None = None
    sha256: str | None = None

    @property
    def suffix(self) -> str:
        base = (self.url or str(self.path)).rsplit("/", 1)[-1].split("?", 1)[0]
        suffixes = "".join(Path(base).suffixes[-2:])
        return suffixes if re.fullmatch(r"(\.[A-Za-z0-9]{1,10}){0,2}", suffixes) else ""

    @property
    def relpath(self) -> str:
        """Where the file appears in each trial's directory."""
        return f"data/{self.name}{self.suffix}"


@dataclass(frozen=True)
class Metric:
    """How a trial's result is read: the last float of stdout, a key of the last JSON line of stdout
    holding it, or a key of a JSON file the trial writes."""

    source: str  # "stdout", "json-line" or "file"
    key: str = ""
    path: str = ""

    @property
    def name(self) -> str:
        return self.key or "value"

    def describe(self) -> str:
        if self.source == "stdout":
            return "the last number on stdout"
        if self.source == "json-line":
            return f"{self.key!r} of the last JSON line on stdout"
        return f"{self.key!r} of {self.path}"

    def read(self, stdout: str, file_text: str | None = None) -> float:
        """The trial's metric, or ValueError saying what was wrong with its output."""
        if self.source == "stdout":
            return parse_last_float(stdout)
        if self.source == "json-line":
            return _json_line_value(stdout, self.key)
        if file_text is None:
            raise ValueError(f"the trial did not write {self.path}")
        try:
            doc = json.loads(file_text)
        except ValueError as e:
            raise ValueError(f"{self.path} is not JSON ({e})") from None
        if not isinstance(doc, dict) or self.key not in doc:
            raise ValueError(f"{self.path} has no key {self.key!r}")
        return _finite(doc[self.key], f"{self.path}: {self.key}")


def parse_last_float(text: str) -> float:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    if not lines:
        raise ValueError("the program printed nothing on stdout")
    try:
        value = float(lines[-1])
    except ValueError:
        raise ValueError(f"the last stdout line is not a number: {lines[-1][:80]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"the last stdout line is not a finite number: {lines[-1]!r}")
    return value


def _json_line_value(text: str, key: str) -> float:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and key in doc:
            return _finite(doc[key], key)
    raise ValueError(f"no JSON line on stdout has the key {key!r}")


def _finite(value: Any, what: str) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:  # a whole number too large for a float
        ok = False
    if not ok:
        raise ValueError(f"{what} is {str(value)[:40]!r}, not a finite number")
    return float(value)


@dataclass(frozen=True)
class Trial:
    """One run of the program: its id (a directory name under --out/trials), parameters and seed."""

    id: str
    params: dict[str, Any]
    seed: int = 0


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
    timeout: float | None = None
    retries: int = 0
    budget: float | None = None  # on a cluster: no new trial once the estimated cost would pass it (pipeline.cost)


@dataclass(frozen=True)
class SearchSpec:
    """The [search] table: the sampler (`kind`), the scheduler that stops trials early, the stop rules."""

    kind: str = "grid"  # grid, random, tpe
    trials: int = 0  # random and tpe: how many
    seed: int = 0
    scheduler: str = "none"  # none, asha, hyperband, median
    min_step: int | None = None  # the scheduler's resource (the progress step): its least and most
    max_step: int | None = None
    reduction: int = 3
    target: float | None = None
    max_trials: int | None = None
    concurrency: int | None = None
    budget_node_hours: float | None = None
    grace: float = GRACE_S  # seconds from SIGTERM to SIGKILL for a pruned or cancelled trial

    @property
    def adaptive(self) -> bool:
        return self.kind == "tpe" or self.scheduler != "none"


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    program: str  # as written
    program_file: Path | None  # the local file shipped with each task; None for a path on the nodes
    interpreter: str | None
    args: tuple[str, ...]  # shell-split words, each a format template
    outputs: tuple[str, ...]
    metric: Metric
    goal: str
    data: tuple[DataItem, ...]
    params: tuple[Param, ...]
    kind: str
    trials_wanted: int
    seed: int
    resources: Resources
    packages: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    search: SearchSpec = field(default_factory=SearchSpec)
    progress: ProgressSpec | None = None

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def log_params(self) -> set[str]:
        return {p.name for p in self.params if p.log}

    def trials(self) -> list[Trial]:
        """Every trial of the search, in a fixed order. Grid trial ids name their values (so adding
        values to a list keeps earlier ids); random ones are numbered, and sample i is the same
        whatever `trials` is (one draw per trial from the seeded generator, in order). tpe: none here, the
        sampler proposes them one by one (pipeline.search)."""
        if self.kind == "tpe":
            return []
        if self.kind == "grid":
            combos = [dict(zip(self.param_names, c)) for c in itertools.product(*(p.values for p in self.params))]
            ids = [grid_id(params) for params in combos]
            clash = {tid for tid, n in collections.Counter(ids).items() if n > 1}
            out = []
            for params, tid in zip(combos, ids):
                if tid in clash:  # values that read alike in a name (1 and 1.0, a/b and a_b): told apart
                    tid = _hashed_id(tid, json.dumps(list(params.items())))
                out.append(Trial(tid, params, trial_seed(self.seed, tid)))
            return out
        rng = random.Random(self.seed)
        out = []
        for i in range(self.trials_wanted):
            params = {p.name: p.sample(rng) for p in self.params}
            tid = f"{i:04d}"
            out.append(Trial(tid, params, trial_seed(self.seed, tid)))
        return out

    def render_args(self, trial: Trial) -> list[str]:
        """The program's arguments for one trial (placeholders filled; a value is always one argument)."""
        values = {
            **trial.params,
            "data": _Namespace({d.name: d.relpath for d in self.data}),
            "trial": _Namespace({"id": trial.id, "seed": trial.seed}),
        }
        return [word.format_map(values) for word in self.args]

    def settings(self) -> dict[str, Any]:
        """What makes two runs' results comparable (kept in results.json, checked on resume). Grid
        values and the random search's trial count may change: results of the other trials stay valid."""
        keep = {k: v for k, v in self.raw.items() if k not in ("resources",)}
        search = {k: v for k, v in dict(keep.get("search", {})).items() if k not in STOP_KEYS}
        keep["search"] = search
        if self.kind == "grid":
            keep.pop("params", None)
            keep["param_names"] = self.param_names
        if self.program_file is not None:
            keep["program_sha256"] = hashlib.sha256(self.program_file.read_bytes()).hexdigest()
        return keep


class _Namespace:
    """`{data.train}` and `{trial.seed}` in args: attribute access on a fixed set of names."""

    def __init__(self, items: Mapping[str, Any]):
        self.__dict__.update(items)


def grid_id(params: Mapping[str, Any]) -> str:
    """A grid trial's directory name, naming its values. Values that read alike here (1 and 1.0, or
    characters a file name cannot hold) can share one: SweepSpec.trials tells those apart."""
    text = ",".join(f"{k}={_fmt_value(v)}" for k, v in params.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if len(safe) > 80 or safe.startswith("."):
        safe = _hashed_id(safe, text)
    return safe


def _hashed_id(readable: str, exact: str) -> str:
    return readable[:60] + "-" + hashlib.sha256(exact.encode()).hexdigest()[:12]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)  # two values never share an id
    return str(v)


def trial_seed(seed: int, tid: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{tid}".encode()).digest()[:4], "big") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------ parsing


def load(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; raise SpecError with one line on the first mistake."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; give a sweep file (see examples/)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read it ({e})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML ({e})") from None
    return parse(doc, p.resolve().parent, p)


def parse(doc: Mapping[str, Any], base: Path, path: Path | None = None) -> SweepSpec:
    """Check a parsed sweep file; relative program and data paths are relative to `base`."""
    _no_unknown(doc, TOP_KEYS, "")
    program, program_file = _program(doc, base)
    interpreter = _interpreter(doc, program, program_file)
    outputs = _outputs(doc)
    metric = _metric(doc)
    if metric.source == "file" and metric.path not in outputs:
        outputs = (*outputs, metric.path)
    goal = doc.get("goal", "max")
    if goal not in ("max", "min"):
        raise SpecError(f'goal: {goal!r} is not valid; give "max" or "min"')
    data = _data(doc.get("data", {}), base)
    search = _search(doc.get("search", {}))
    kind, trials_wanted, seed = search.kind, search.trials, search.seed
    progress = _progress(doc.get("progress"))
    if search.scheduler != "none" and progress is None:
        raise SpecError(
            f"search.scheduler = {search.scheduler!r} needs a progress field to decide on, e.g. "
            'progress = { json-line = "val_acc", step = "epoch" }'
        )
    if "grace" in doc.get("search", {}) and progress is None:
        raise SpecError(
            "search.grace: only a trial stopped through its progress reports gets a grace period (without a "
            "progress field a stop is a SIGKILL); give a progress field or remove grace"
        )
    params = _params(doc.get("params"), "random" if kind == "tpe" else kind, metric.name)
    args = _args(doc, params, data)
    resources = _resources(doc.get("resources", {}))
    packages = _packages(doc.get("packages", []))
    env = _env(doc.get("env", {}))
    spec = SweepSpec(
        path=path or base / "sweep.toml",
        program=program,
        program_file=program_file,
        interpreter=interpreter,
        args=args,
        outputs=outputs,
        metric=metric,
        goal=goal,
        data=data,
        params=params,
        kind=kind,
        trials_wanted=trials_wanted,
        seed=seed,
        resources=resources,
        packages=packages,
        env=env,
        raw=json.loads(json.dumps(dict(doc), default=str)),
        search=search,
        progress=progress,
    )
    n = trials_wanted if kind != "grid" else math.prod(len(p.values) for p in params)
    if n > MAX_TRIALS:
        raise SpecError(f"params: the grid has {n} trials, more than {MAX_TRIALS}; use fewer values or a random search")
    return spec


def _no_unknown(table: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in table:
        if key not in valid:
            name = f"{where}.{key}" if where else key
            raise SpecError(f"{name}: unknown field; valid{' in ' + where if where else ''}: {', '.join(valid)}")


def _str(doc: Mapping[str, Any], key: str, where: str | None = None, required: bool = False) -> str | None:
    value = doc.get(key)
    name = where or key
    if value is None:
        if required:
            raise SpecError(f"{name}: missing; it is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{name}: {value!r} is not valid; give a non-empty string")
    return value


def _program(doc: Mapping[str, Any], base: Path) -> tuple[str, Path | None]:
    program = _str(doc, "program", required=True)
    assert program is not None
    if program.startswith("/"):
        return program, None
    f = (base / program).resolve()
    if not f.is_file():
        raise SpecError(
            f"program: {program!r} is not a file next to the sweep file ({f}); give a path relative to "
            f"the sweep file, or an absolute path on the nodes"
        )
    return program, f


def _interpreter(doc: Mapping[str, Any], program: str, program_file: Path | None) -> str | None:
    interpreter = _str(doc, "interpreter")
    if interpreter is None and program.endswith(".py"):
        return "python3"
    if interpreter is None and program_file is not None:
        raise SpecError(
            f'interpreter: missing for {program!r}; a shipped program that is not .py names the one that runs it, e.g. "bash"'
        )
    return interpreter


def _outputs(doc: Mapping[str, Any]) -> tuple[str, ...]:
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise SpecError(f"outputs: {outputs!r} is not valid; give a list of relative file paths")
    try:
        checked = tuple(check_relpath(o, "outputs:") for o in outputs)
    except ValueError as e:
        raise SpecError(str(e)) from None
    if len(set(checked)) != len(checked):
        raise SpecError(f"outputs: {outputs!r} names a file twice")
    reserved = [o for o in checked if _reserved(o)]
    if reserved:
        raise SpecError(
            f"outputs: {reserved[0]!r} is reserved (stdout.txt, stderr.txt, progress.csv, data/); rename the file"
        )
    return checked


def _reserved(path: str) -> bool:
    return path in RESERVED_OUTPUTS or path.startswith("data/")


def _metric(doc: Mapping[str, Any]) -> Metric:
    m = doc.get("metric", {"stdout": "last-float"})
    valid = '{ stdout = "last-float" }, { json-line = "KEY" } or { file = "PATH.json", key = "KEY" }'
    if not isinstance(m, dict):
        raise SpecError(f"metric: {m!r} is not valid; give {valid}")
    if set(m) == {"stdout"}:
        if m["stdout"] != "last-float":
            raise SpecError(f'metric.stdout: {m["stdout"]!r} is not valid; give "last-float"')
        return Metric("stdout")
    if set(m) == {"json-line"}:
        key = m["json-line"]
        if not isinstance(key, str) or not key:
            raise SpecError(f"metric.json-line: {key!r} is not valid; give the key holding the metric")
        return Metric("json-line", key=key)
    if set(m) == {"file", "key"}:
        if not isinstance(m["key"], str) or not m["key"]:
            raise SpecError(f"metric.key: {m['key']!r} is not valid; give the key holding the metric")
        if not isinstance(m["file"], str):
            raise SpecError(f"metric.file: {m['file']!r} is not valid; give a relative path of a JSON file")
        try:
            path = check_relpath(m["file"], "metric.file:")
        except ValueError as e:
            raise SpecError(str(e)) from None
        if _reserved(path):
            raise SpecError(
                f"metric.file: {path!r} is reserved (stdout.txt, stderr.txt, progress.csv, data/); rename the file"
            )
        return Metric("file", key=m["key"], path=path)
    raise SpecError(f"metric: {m!r} is not valid; give {valid}")


def _data(table: Any, base: Path) -> tuple[DataItem, ...]:
    if not isinstance(table, dict):
        raise SpecError("data: give a table of NAME = URL or path (or { url = ..., sha256 = ... })")
    items = []
    for name, value in table.items():
        where = f"data.{name}"
        if not NAME_RE.match(name):
            raise SpecError(f"{where}: the name must be letters, digits and _ (not starting with a digit)")
        sha = None
        if isinstance(value, dict):
            _no_unknown(value, ("url", "path", "sha256"), where)
            if len({"url", "path"} & set(value)) != 1:
                raise SpecError(f"{where}: give exactly one of url or path")
            sha = value.get("sha256")
            if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
                raise SpecError(f"{where}.sha256: {sha!r} is not 64 lowercase hex digits")
            value = value.get("url") or value.get("path")
        if not isinstance(value, str) or not value:
            raise SpecError(f"{where}: {value!r} is not valid; give a URL or a path")
        if value.startswith(("http://", "https://")):
            items.append(DataItem(name, url=value, sha256=sha))
            continue
        if "://" in value:
            raise SpecError(f"{where}: {value!r}: only http(s) URLs or local paths are valid")
        f = (base / Path(value).expanduser()).resolve()
        if not f.is_file():
            raise SpecError(f"{where}: {value!r}: no such file ({f})")
        if sha is not None and hashlib.sha256(f.read_bytes()).hexdigest() != sha:
            raise SpecError(f"{where}: {value!r} does not match its sha256")
        items.append(DataItem(name, path=f, sha256=sha))
    return tuple(items)


def _search(table: Any) -> SearchSpec:
    if not isinstance(table, dict):
        raise SpecError('search: give a table, e.g. { kind = "random", trials = 40, seed = 0 }')
    _no_unknown(table, SEARCH_KEYS, "search")
    kind = table.get("kind", "grid")
    if kind not in ("grid", "random", "tpe"):
        raise SpecError(f'search.kind: {kind!r} is not valid; give "grid", "random" or "tpe"')
    trials = table.get("trials")
    if kind == "grid" and trials is not None:
        raise SpecError('search.trials: a grid runs every combination; trials applies to kind = "random" or "tpe"')
    if kind != "grid":
        if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= MAX_TRIALS:
            raise SpecError(f"search.trials: {trials!r} is not valid; give a whole number from 1 to {MAX_TRIALS}")
    seed = table.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(f"search.seed: {seed!r} is not valid; give a whole number >= 0")
    scheduler = table.get("scheduler", "none")
    if scheduler not in SCHEDULERS:
        raise SpecError(f"search.scheduler: {scheduler!r} is not valid; give one of {', '.join(map(repr, SCHEDULERS))}")
    lo, hi = _whole(table, "min_step", 1), _whole(table, "max_step", 1)
    if lo is not None and hi is not None and lo > hi:
        raise SpecError(f"search.min_step: {lo} is more than search.max_step {hi}; give min_step <= max_step")
    reduction = _whole(table, "reduction", 2)
    target = table.get("target")
    if target is not None and not _number(target):
        raise SpecError(f"search.target: {target!r} is not valid; give the metric's value that ends the sweep")
    budget = table.get("budget_node_hours")
    if budget is not None and (not _number(budget) or budget <= 0):
        raise SpecError(f"search.budget_node_hours: {budget!r} is not valid; give a number of node-hours > 0")
    grace = table.get("grace", GRACE_S)
    if not _number(grace) or not 0 <= grace <= 3600:
        raise SpecError(f"search.grace: {grace!r} is not valid; give the seconds from SIGTERM to SIGKILL, 0 to 3600")
    return SearchSpec(
        kind=kind,
        trials=trials or 0,
        seed=seed,
        scheduler=scheduler,
        min_step=lo,
        max_step=hi,
        reduction=reduction if reduction is not None else 3,
        target=float(target) if target is not None else None,
        max_trials=_whole(table, "max_trials", 1),
        concurrency=_whole(table, "concurrency", 1),
        budget_node_hours=float(budget) if budget is not None else None,
        grace=float(grace),
    )


def _whole(table: Mapping[str, Any], key: str, least: int) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SpecError(f"search.{key}: {value!r} is not valid; give a whole number >= {least}")
    return value


def _progress(value: Any) -> ProgressSpec | None:
    """progress = { json-line = "KEY", step = "STEP_KEY" } or { regex = '...(?P<value>...)...(?P<step>...)' }."""
    if value is None:
        return None
    valid = '{ json-line = "KEY", step = "STEP_KEY" } or { regex = \'epoch (?P<step>\\d+) acc (?P<value>\\S+)\' }'
    if not isinstance(value, dict):
        raise SpecError(f"progress: {value!r} is not valid; give {valid}")
    if "regex" in value:
        _no_unknown(value, ("regex",), "progress")
        text = value["regex"]
        if not isinstance(text, str) or not text:
            raise SpecError(
                f"progress.regex: {text!r} is not valid; give a regular expression with a group (?P<value>...)"
            )
        try:
            rx = re.compile(text)
        except re.error as e:
            raise SpecError(f"progress.regex: {text!r} is not a valid regular expression ({e})") from None
        if "value" not in rx.groupindex or not set(rx.groupindex) <= {"value", "step"}:
            raise SpecError(
                f"progress.regex: {text!r} needs a named group (?P<value>...) and may have (?P<step>...), nothing else"
            )
        return ProgressSpec(regex=text)
    _no_unknown(value, ("json-line", "step"), "progress")
    key, step = value.get("json-line"), value.get("step", "")
    if not isinstance(key, str) or not key:
        raise SpecError(f"progress.json-line: {key!r} is not valid; give the key of the value each line reports")
    if not isinstance(step, str):
        raise SpecError(
            f'progress.step: {step!r} is not valid; give the key holding each line\'s step (a number), e.g. "epoch"'
        )
    return ProgressSpec(key=key, step=step)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _params(table: Any, kind: str, metric_name: str) -> tuple[Param, ...]:
    if not isinstance(table, dict) or not table:
        raise SpecError("params: missing or empty; give at least one, e.g. lr = [0.01, 0.1]")
    out = []
    for name, value in table.items():
        where = f"params.{name}"
        if not NAME_RE.match(name) or name in ("data", "trial"):
            raise SpecError(f"{where}: the name must be letters, digits and _ (and not data or trial)")
        if name in RESULT_COLUMNS or name == metric_name:
            raise SpecError(
                f"{where}: {name!r} is a column of results.csv ({', '.join(RESULT_COLUMNS)} and the metric "
                f"{metric_name!r}); rename the parameter"
            )
        out.append(_param(name, value, kind, where))
    return tuple(out)


def _param(name: str, value: Any, kind: str, where: str) -> Param:
    if isinstance(value, list):
        return Param(name, "values", _values(value, where))
    valid = "a list, or one of { range = [START, STOP, STEP] }, { choice = [...] }, { uniform = [LOW, HIGH] }, { log-uniform = [LOW, HIGH] }, { int-uniform = [LOW, HIGH] }"
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecError(f"{where}: {value!r} is not valid; give {valid}")
    ((how, arg),) = value.items()
    if how == "choice":
        if not isinstance(arg, list):
            raise SpecError(f"{where}.choice: {arg!r} is not valid; give a list of values")
        return Param(name, "values", _values(arg, f"{where}.choice"))
    if how == "range":
        return Param(name, "values", _range(arg, f"{where}.range"))
    if how not in ("uniform", "log-uniform", "int-uniform"):
        raise SpecError(f"{where}: {how!r} is not valid; give {valid}")
    if not (isinstance(arg, list) and len(arg) == 2 and all(_number(x) for x in arg) and arg[0] < arg[1]):
        raise SpecError(f"{where}.{how}: {arg!r} is not valid; give [LOW, HIGH] with LOW < HIGH")
    if how == "log-uniform" and arg[0] <= 0:
        raise SpecError(f"{where}.log-uniform: {arg!r}: LOW must be > 0")
    if how == "int-uniform" and not all(isinstance(x, int) for x in arg):
        raise SpecError(f"{where}.int-uniform: {arg!r}: give whole numbers")
    if how == "uniform" and not math.isfinite(arg[1] - arg[0]):
        raise SpecError(f"{where}.uniform: {arg!r}: HIGH - LOW is too large for a float; give a narrower range")
    if kind == "grid":
        raise SpecError(f'{where}: {how} is sampled; use search.kind = "random", or a list or range for a grid')
    if how == "int-uniform":
        return Param(name, how, low=arg[0], high=arg[1])
    return Param(name, how, low=float(arg[0]), high=float(arg[1]))


def _values(values: list, where: str) -> tuple[Any, ...]:
    if not values:
        raise SpecError(f"{where}: the list is empty; give at least one value")
    for v in values:
        if not (_number(v) or isinstance(v, (str, bool))):
            raise SpecError(f"{where}: {v!r} is not valid; values are numbers, strings or booleans")
    if len({json.dumps(v) for v in values}) != len(values):
        raise SpecError(f"{where}: {values!r} repeats a value")
    return tuple(values)


def _range(arg: Any, where: str) -> tuple[Any, ...]:
    if not (isinstance(arg, list) and len(arg) == 3 and all(_number(x) for x in arg)):
        raise SpecError(f"{where}: {arg!r} is not valid; give [START, STOP, STEP] (STOP included when reached)")
    start, stop, step = arg
    if step <= 0 or stop < start:
        raise SpecError(f"{where}: {arg!r}: give START <= STOP and STEP > 0")
    steps = (stop - start) / step
    if not math.isfinite(steps) or steps >= MAX_TRIALS:
        raise SpecError(f"{where}: {arg!r} has more than {MAX_TRIALS} values; give a larger STEP")
    n = math.floor(steps + 1e-9) + 1
    if all(isinstance(x, int) for x in arg):
        return tuple(start + i * step for i in range(n))
    values = tuple(round(start + i * step, 12) for i in range(n))
    if len(set(values)) != n:
        raise SpecError(f"{where}: {arg!r}: values rounded to 12 decimals repeat; give a STEP of at least 1e-12")
    return values


def _args(doc: Mapping[str, Any], params: Sequence[Param], data: Sequence[DataItem]) -> tuple[str, ...]:
    text = doc.get("args", "")
    if not isinstance(text, str):
        raise SpecError(f'args: {text!r} is not valid; give one string, e.g. "--lr {{lr}}"')
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise SpecError(f"args: {text!r} cannot be split as a shell would ({e})") from None
    known = {p.name for p in params} | {f"data.{d.name}" for d in data} | set(BUILTINS)
    first = {p.name: p.values[0] if p.values else p.low for p in params}
    samples = [first]  # each value of each parameter once (with the others' first): what a trial can be given
    for p in params:
        samples += [{**first, p.name: v} for v in (p.values[1:] if p.values else (p.high,))]
    builtins = {"data": _Namespace({d.name: d.relpath for d in data}), "trial": _Namespace({"id": "0000", "seed": 1})}
    for word in words:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(word) if f is not None]
        except ValueError as e:
            raise SpecError(f"args: {word!r}: {e} (write {{{{ and }}}} for literal braces)") from None
        for f in fields:
            if f not in known:
                raise SpecError(
                    f"args: {{{f}}} names no parameter, data item or built-in; valid: "
                    + ", ".join("{" + k + "}" for k in sorted(known))
                )
        for sample in samples if fields else ():
            try:
                word.format_map({**sample, **builtins})
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
                given = ", ".join(f"{k}={sample[k]!r}" for k in fields if k in sample)
                raise SpecError(f"args: {word!r} cannot be filled in with {given} ({e})") from None
    return tuple(words)


def _resources(table: Any) -> Resources:
    if not isinstance(table, dict):
        raise SpecError("resources: give a table, e.g. { cpus = 1, timeout = 600 }")
    _no_unknown(table, ("cpus", "gpus", "timeout", "retries", "budget"), "resources")
    cpus = table.get("cpus", 1)
    if not _number(cpus) or cpus <= 0 or not _ray_amount(cpus):
        raise SpecError(
            f"resources.cpus: {cpus!r} is not valid; give a number > 0 (whole above 1, in steps of 0.0001 below)"
        )
    gpus = table.get("gpus", 0)
    if not _number(gpus) or gpus < 0 or not _ray_amount(gpus):
        raise SpecError(
            f"resources.gpus: {gpus!r} is not valid; give a number >= 0 (whole above 1, in steps of 0.0001 below)"
        )
    timeout = table.get("timeout")
    if timeout is not None and (not _number(timeout) or timeout <= 0):
        raise SpecError(f"resources.timeout: {timeout!r} is not valid; give seconds > 0")
    retries = table.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise SpecError(f"resources.retries: {retries!r} is not valid; give a whole number from 0 to 10")
    budget = table.get("budget")
    if budget is not None and (not _number(budget) or budget <= 0):
        raise SpecError(
            f"resources.budget: {budget!r} is not valid; give a number > 0, in the currency of the cluster's prices"
        )
    return Resources(
        float(cpus), float(gpus), float(timeout) if timeout is not None else None, retries, _float_or_none(budget)
    )


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)


def _ray_amount(x: float) -> bool:
    """What Ray accepts as a task's amount of a resource: whole above 1, a multiple of 0.0001 below."""
    if x > 1:
        return x == int(x)
    return abs(x * 10_000 - round(x * 10_000)) < 1e-6


def _packages(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SpecError(
            f'packages: {value!r} is not valid; give a list of pip requirements, e.g. ["scikit-learn>=1.3"]'
        )
    bad = [v for v in value if v.strip().startswith("-")]
    if bad:
        raise SpecError(f"packages: {bad[0]!r} is an option, not a requirement; give package names")
    return tuple(v.strip() for v in value)


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise SpecError('env: give a table of NAME = "value"')
    for k, v in value.items():
        if not NAME_RE.match(k) or not isinstance(v, str):
            raise SpecError(f'env.{k}: {v!r} is not valid; give NAME = "string value"')
    return dict(value)
