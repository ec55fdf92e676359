"""The search: which trial runs next, whether a running one goes on, and when the sweep stops.

    search = make_search(spec.search, spec.params, trials, goal, out_dir)   # a FixedSearch or an OptunaSearch
    trial = search.next()                  # None: no more trials to start
    prune = search.report(trial.id, step, value)
    search.tell(result)

`grid` and `random` without a scheduler are a FixedSearch: the trials of the sweep file in order, as always.
With a scheduler, or `kind = "tpe"`, an Optuna study decides (ask/tell): its pruners (SuccessiveHalving, i.e.
ASHA; Hyperband; Median) and samplers (TPE; a fixed list enqueued for grid and random). The study is kept in
OUT/study.db (Optuna's SQLite storage), so a resume continues it and `optuna-dashboard sqlite:///OUT/study.db`
shows it live.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.spec import Param, SearchSpec, Trial, trial_seed

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"
STUDY_NAME = "raysweep"
#: results that end a trial for good (kept on resume); "failed" and "cancelled" ones run again
FINAL = ("ok", "pruned")


class Search(Protocol):
    def next(self) -> Trial | None: ...

    def report(self, trial_id: str, step: float, value: float) -> bool: ...

    def tell(self, trial_id: str, status: str, value: float | None) -> None: ...

    def close(self) -> None: ...


class FixedSearch:
    """The trials given, in order; nothing is pruned."""

    def __init__(self, trials: Iterable[Trial]):
        self._todo = deque(trials)

    def next(self) -> Trial | None:
        return self._todo.popleft() if self._todo else None

    def report(self, trial_id: str, step: float, value: float) -> bool:
        return False

    def tell(self, trial_id: str, status: str, value: float | None) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class StopRules:
    """When the sweep stops starting trials: `target` reached (the running ones are cancelled), `max_trials`
    started in all, the trials' run time summed over `budget_node_hours`; at most `concurrency` at once."""

    target: float | None = None
    max_trials: int | None = None
    concurrency: int | None = None
    budget_node_hours: float | None = None

    def reached(self, value: float | None, goal: str) -> bool:
        if self.target is None or value is None:
            return False
        return value >= self.target if goal == "max" else value <= self.target


def distributions(params: Sequence[Param]) -> dict[str, Any]:
    import optuna.distributions as d

    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "values":
            out[p.name] = d.CategoricalDistribution(list(p.values))
        elif p.kind == "int-uniform":
            out[p.name] = d.IntDistribution(int(p.low), int(p.high))
        else:
            out[p.name] = d.FloatDistribution(p.low, p.high, log=p.kind == "log-uniform")
    return out


def pruner(s: SearchSpec) -> Any:
    import optuna

    if s.scheduler == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=s.min_step if s.min_step is not None else "auto", reduction_factor=s.reduction
        )
    if s.scheduler == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=s.min_step or 1,
            max_resource=s.max_step if s.max_step is not None else "auto",
            reduction_factor=s.reduction,
        )
    if s.scheduler == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=int(s.min_step or 0))
    return optuna.pruners.NopPruner()


def sampler(s: SearchSpec) -> Any:
    import optuna

    if s.kind == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed)
    return optuna.samplers.RandomSampler(seed=s.seed)  # grid and random trials are enqueued: it never draws


class OptunaSearch:
    """An Optuna study in OUT/study.db driven by ask/tell; trial ids are ours (user attribute `id`)."""

    def __init__(
        self,
        s: SearchSpec,
        params: Sequence[Param],
        trials: Sequence[Trial] | None,
        goal: str,
        out_dir: str | Path,
        finished: Mapping[str, tuple[str, float | None]],
        fresh: bool = False,
    ):
        """`trials`: the fixed list (grid, random) or None (tpe: `s.trials` asked of the sampler); `finished`:
        the status and value of the trials already in the results (a resume), by id."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.spec = s
        self.seed = s.seed
        self.path = Path(out_dir) / STUDY_FILE
        if fresh:
            self.path.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{self.path.resolve()}")
        self.study = optuna.create_study(
            storage=storage,
            study_name=STUDY_NAME,
            direction="maximize" if goal == "max" else "minimize",
            sampler=sampler(s),
            pruner=pruner(s),
            load_if_exists=True,
        )
        self.dists = distributions(params)
        self._running: dict[str, Any] = {}
        self._rerun: deque[Trial] = deque()
        known = self._reconcile(finished)
        if trials is not None:
            self._todo = deque(t for t in trials if t.id not in finished)
            self._left = 0  # nothing sampled: the list is the search
        else:
            self._todo = deque(self._rerun)
            self._rerun.clear()
            self._left = max(0, s.trials - len([v for v in finished.values() if v[0] in FINAL]))
        self._next_number = known

    def _reconcile(self, finished: Mapping[str, tuple[str, float | None]]) -> int:
        """Bring the study in line with the results after an interruption (the results are written first): a
        trial the study still holds as running is told its result when the results have it, else failed and
        run again under its id (tpe). Returns the next free trial number."""
        import optuna

        top = -1
        rerun: dict[str, Trial] = {}
        for ft in self.study.get_trials(deepcopy=False):
            tid = ft.user_attrs.get("id")
            if tid is None:
                continue
            if tid.isdigit():
                top = max(top, int(tid))
            interrupted = ft.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
            if interrupted:
                status, value = finished.get(tid, ("", None))
                if status == "ok" and value is not None:
                    self.study.tell(ft.number, value)
                elif status == "pruned":
                    self.study.tell(ft.number, state=optuna.trial.TrialState.PRUNED)
                else:
                    self.study.tell(ft.number, state=optuna.trial.TrialState.FAIL)
            if (interrupted or ft.user_attrs.get("cancelled")) and tid not in finished:
                rerun[tid] = Trial(tid, dict(ft.params), trial_seed(self.seed, tid))
        self._rerun.extend(rerun.values())
        return top + 1

    def next(self) -> Trial | None:
        if self._todo:
            t = self._todo.popleft()
            self.study.enqueue_trial(t.params, user_attrs={"id": t.id})
            ot = self.study.ask(self.dists)
            if self.spec.kind == "tpe":
                self._left = max(0, self._left - 1)
        elif self._left > 0:
            self._left -= 1
            tid = f"{self._next_number:04d}"
            self._next_number += 1
            ot = self.study.ask(self.dists)
            ot.set_user_attr("id", tid)
            t = Trial(tid, dict(ot.params), trial_seed(self.seed, tid))
        else:
            return None
        self._running[t.id] = ot
        return t

    def report(self, trial_id: str, step: float, value: float) -> bool:
        ot = self._running.get(trial_id)
        if ot is None:
            return False
        with warnings.catch_warnings():  # a step reported again (a retried run starts over): Optuna keeps the first
            warnings.simplefilter("ignore")
            ot.report(value, round(step))
        if self.spec.max_step is not None and step >= self.spec.max_step:
            return False  # all the steps the search gives: a stop saves nothing and would call it pruned
        return bool(ot.should_prune())

    def tell(self, trial_id: str, status: str, value: float | None) -> None:
        import optuna

        ot = self._running.pop(trial_id, None)
        if ot is None:
            return
        if status == "ok" and value is not None and math.isfinite(value):
            self.study.tell(ot, value)
        elif status == "pruned":
            self.study.tell(ot, state=optuna.trial.TrialState.PRUNED)
        else:
            if status == "cancelled":
                ot.set_user_attr("cancelled", True)
            self.study.tell(ot, state=optuna.trial.TrialState.FAIL)

    def close(self) -> None:
        pass


def make_search(
    s: SearchSpec,
    params: Sequence[Param],
    trials: Sequence[Trial],
    goal: str,
    out_dir: str | Path,
    finished: Mapping[str, tuple[str, float | None]],
    fresh: bool = False,
) -> Search:
    """The search a sweep file asks for (see the module's docstring)."""
    if s.kind != "tpe" and s.scheduler == "none":
        return FixedSearch(t for t in trials if t.id not in finished)
    return OptunaSearch(s, params, trials if s.kind != "tpe" else None, goal, out_dir, finished, fresh)
