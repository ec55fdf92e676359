"""What a sweep's trials cost, and the budget that stops starting them. Plain data in: the nodes' instance types
and hourly rates come from the CLI (pipeline.cli_common asks the cluster's API through cloud.connect); a local
Ray, or a Ray at an --address, has no price.

A trial is charged its share of the node it ran on, for as long as it ran: seconds x the node's hourly rate x
(the trial's CPUs / the node's CPUs, at most 1), and its node-seconds are that share too. A cluster's idle time
is not a trial's (`exoscale.py status` and `cost-report` give the whole cluster's cost).

The budget stops new trials, never running ones: a trial starts only while the estimate stays within it, the
estimate being the cost of the finished trials, and each running one and the new one at a finished trial's
mean cost. (Only the time a trial ran is known, once it ended: the time since it was submitted includes
Ray's queue and worker start, seconds on a cluster, and would count trials of 0.2 s as trials of 7 s.) Until
one has ended, a first wave of as many trials as the nodes have slots is started, no more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

LOCAL_TYPE = "local"
NO_PRICE = "a local Ray has no price"


class BudgetError(ValueError):
    """A budget that is not a number > 0; one line."""


def check_budget(value: object, source: str = "--budget") -> float | None:
    """A budget as a float (None stays None); BudgetError for anything but a finite number > 0."""
    if value is None:
        return None
    try:
        budget = float(value) if isinstance(value, str) else value
    except ValueError:
        budget = None
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0:
        raise BudgetError(f"{source} {value!r}: give a number > 0, in the currency of the cluster's prices (e.g. 5)")
    return float(budget)


@dataclass(frozen=True)
class NodeRate:
    """One node as the sweep prices it: its instance type, its hourly rate (None: price unknown) and the CPUs Ray
    counts on it (0: unknown, the trial is charged the whole node)."""

    instance_type: str
    hourly: float | None
    cpus: float = 0.0


@dataclass
class SweepPrices:
    """The nodes' rates by the IP Ray names them with; `currency` None is a run without prices (a local Ray).
    `refresh`, given, is asked once for every node not known yet (an autoscaler adds nodes)."""

    currency: str | None = None
    nodes: dict[str, NodeRate] = field(default_factory=dict)
    refresh: Callable[[], Mapping[str, NodeRate]] | None = None
    source: str = ""
    _asked: set[str] = field(default_factory=set)

    @property
    def priced(self) -> bool:
        return self.currency is not None

    def node(self, ip: str) -> NodeRate | None:
        if ip not in self.nodes and self.refresh is not None and ip and ip not in self._asked:
            self._asked.add(ip)
            try:
                self.nodes.update(self.refresh())
            except Exception as e:  # the prices are an estimate; a failed look-up leaves the node unpriced
                log.warning("the price of node %s could not be looked up: %s", ip, e)
        return self.nodes.get(ip)


class Priced(Protocol):
    """What the meter reads and writes on a trial's result (pipeline.runner.TrialResult)."""

    status: str
    seconds: float | None
    node: str
    instance_type: str
    node_seconds: float | None
    cost: float | None


class CostMeter:
    """Prices each finished trial, says what the sweep cost so far, and whether the budget lets one more start."""

    def __init__(
        self,
        prices: SweepPrices,
        cpus_per_trial: float,
        budget: float | None = None,
        wave: Callable[[], int | None] = lambda: 1,
    ):
        """`wave`: how many trials run at once (the slots the nodes have), the first wave before any cost is known."""
        self.prices = prices
        self.cpus = cpus_per_trial
        self.budget = budget if prices.priced else None
        self.wave = wave

    def price(self, result: Priced) -> None:
        """Set the result's instance type, node-seconds (its share of the node) and cost (None without a price)."""
        seconds = result.seconds or 0.0
        if not self.prices.priced:
            result.instance_type, result.node_seconds, result.cost = LOCAL_TYPE, seconds, None
            return
        node = self.prices.node(result.node)
        if node is None:
            result.instance_type, result.node_seconds, result.cost = "unknown", seconds, None
            return
        share = min(1.0, self.cpus / node.cpus) if node.cpus > 0 else 1.0
        result.instance_type = node.instance_type
        result.node_seconds = round(seconds * share, 3)
        result.cost = None if node.hourly is None else round(node.hourly * seconds * share / 3600, 9)

    def spent(self, results: Iterable[Priced]) -> float:
        return sum(r.cost for r in results if r.cost is not None)

    def mean(self, results: Iterable[Priced]) -> float:
        costs = [r.cost for r in results if r.cost is not None]
        return sum(costs) / len(costs) if costs else 0.0

    def decide(self, results: Iterable[Priced], elapsed: Iterable[float]) -> str:
        """Whether one more trial may start under the budget: "start", "wait" (no trial has a cost yet and a
        first wave, `wave()` trials, is in flight: Ray would only queue more, and nothing tells their cost yet),
        or "stop" (the estimate would pass the budget). Always "start" without a budget."""
        if self.budget is None:
            return "start"
        results, elapsed = list(results), list(elapsed)
        if not any(r.cost is not None for r in results):
            return "start" if len(elapsed) < max(1, self.wave() or 1) else "wait"
        mean = self.mean(results)
        return "start" if self.spent(results) + mean * (len(elapsed) + 1) <= self.budget else "stop"

    def so_far(self, results: Iterable[Priced]) -> str | None:
        """'cost 0.12 EUR' (the finished trials': it changes when a trial ends, so a log gets no line per poll)
        for the progress line; None unpriced."""
        if not self.prices.priced:
            return None
        text = f"cost {money(self.spent(results), self.prices.currency)}"
        return text + (f" of {money(self.budget, self.prices.currency)}" if self.budget is not None else "")

    def summary(self, results: Iterable[Priced]) -> dict[str, Any]:
        """What results.json records: node-seconds per instance type, the estimated cost, per successful trial."""
        results = list(results)
        node_seconds: dict[str, float] = {}
        for r in results:
            if r.node_seconds is not None:
                node_seconds[r.instance_type] = round(node_seconds.get(r.instance_type, 0.0) + r.node_seconds, 3)
        out: dict[str, Any] = {"node_seconds": node_seconds, "currency": self.prices.currency}
        if not self.prices.priced:
            out["note"] = NO_PRICE
            return out
        ok = [r for r in results if r.status == "ok"]
        total = self.spent(results)
        unpriced = sorted({r.instance_type for r in results if r.cost is None and r.node_seconds})
        out.update(
            estimated=round(total, 9),
            per_successful_trial=round(total / len(ok), 9) if ok else None,
            prices=self.prices.source,
            budget=self.budget,
        )
        if unpriced:
            out["price_unknown"] = unpriced
        return out

    def line(self, results: Iterable[Priced]) -> str:
        """The summary's line for the user."""
        s = self.summary(results)
        seconds = ", ".join(f"{t} {v / 3600:.3g}" for t, v in s["node_seconds"].items()) or "none"
        if not self.prices.priced:
            return f"cost: {NO_PRICE}; node-hours: {seconds}"
        c = self.prices.currency
        per = s["per_successful_trial"]
        text = f"cost: {money(s['estimated'], c)} estimated (the trials' share of their nodes; node-hours: {seconds})"
        text += f", {money(per, c)} per successful trial" if per is not None else ", no successful trial"
        if s.get("price_unknown"):
            text += f"; price unknown for {', '.join(s['price_unknown'])}"
        return text


def money(amount: float | None, currency: str | None) -> str:
    if amount is None or currency is None:
        return "price unknown"
    digits = 2 if amount >= 1 else 4 if amount >= 0.01 else 6  # a short trial may cost 0.000004
    return f"{amount:.{digits}f} {currency}"
