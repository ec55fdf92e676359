"""The record behind `exoscale.py cost-report`: what each cluster made from this machine ran, and until when,
kept after `down` removed the cluster's own state.

One append-only file under the state root, `cost-history.jsonl`, made by the toolkit (its first line marks it
as ours; a file of that name without the mark is never written to). `up`, `status` and `down` append a line
each time they see the cluster's instances through the API: the cluster, the zone, the event, the time, and
per instance its id, name, type, API creation time and the hourly rate then in force (cluster.toml's
`[prices]` applied). `down` adds the time its deletes ended. The report reads only this file: an instance's
cost runs from its `created-at` to the `down` that removed it, or, for one no `down` removed (autostopped,
deleted elsewhere, still running), to the last time it was seen, which the report says.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from libcloud.compute.base import Node

from cloud.cost import duration_text, parse_time
from cloud.pricing import PriceTable, cost, money

log = logging.getLogger(__name__)

FILE_NAME = "cost-history.jsonl"
MARK = {"raysweep-cost-history": 1}


def history_path(state_root: Path) -> Path:
    return Path(state_root) / FILE_NAME


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def record(
    state_root: Path,
    cluster: str,
    zone: str,
    event: str,
    nodes: Iterable[Node],
    types: dict[str, str],
    prices: PriceTable,
    at: datetime | None = None,
) -> None:
    """Append one observation of the cluster's instances (`types`: {node id: type name}). Never raises: a
    history that cannot be written is a warning in the log, not a failed `up` or `down`."""
    rows = []
    for n in nodes:
        itype = types.get(str(n.id)) or n.extra.get("instance_type") or "unknown"
        rate = prices.rate(itype)
        if rate is not None:
            rate += prices.volume_gb_hour * int(n.extra.get("disk_size") or 0)
        created = parse_time(getattr(n, "created_at", None))
        rows.append(
            {
                "id": str(n.id),
                "name": n.name,
                "type": itype,
                "created_at": _iso(created) if created else None,
                "rate": None if rate is None else str(rate),
            }
        )
    line = {
        "at": _iso(at or _now()),
        "cluster": cluster,
        "zone": zone,
        "event": event,
        "currency": prices.currency,
        "nodes": rows,
    }
    _append(history_path(state_root), line)


def _append(path: Path, line: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "a") as f:
            if f.tell() == 0:
                f.write(json.dumps(MARK) + "\n")
            elif not _is_ours(path):
                log.warning("%s was not made by raysweep: the cost history is not written to it", path)
                return
            f.write(json.dumps(line) + "\n")
    except OSError as e:
        log.warning("cost history %s not written: %s", path, e)


def _is_ours(path: Path) -> bool:
    try:
        with open(path) as f:
            return json.loads(f.readline()) == MARK
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ report


@dataclass
class NodeLife:
    name: str
    type: str
    created: datetime | None
    rate: Decimal | None
    last_seen: datetime
    ended: datetime | None = None  # the down that removed it


@dataclass
class ClusterRun:
    """One life of a cluster: from its first instance until the `down` that removed it (a later `up` of the
    same name is another run)."""

    cluster: str
    zone: str
    currency: str
    nodes: dict[str, NodeLife] = field(default_factory=dict)
    ended: datetime | None = None
    last_seen: datetime | None = None

    @property
    def start(self) -> datetime | None:
        times = [n.created for n in self.nodes.values() if n.created]
        return min(times) if times else None

    @property
    def end(self) -> datetime | None:
        """When its last instance ended: removed by a down, else last seen (an autostop's deletes are not)."""
        ends = [n.ended or n.last_seen for n in self.nodes.values()]
        return max(ends) if ends else self.ended or self.last_seen

    def cost(self) -> tuple[Decimal, list[str]]:
        """The instances' cost from their creation to their end (the down, else when last seen), and the types
        without a price (left out)."""
        total, unknown = Decimal(0), []
        for n in self.nodes.values():
            end = n.ended or n.last_seen
            if n.rate is None or n.created is None:
                if n.type not in unknown:
                    unknown.append(n.type)
                continue
            total += cost(n.rate, max(0.0, (end - n.created).total_seconds()))
        return total, unknown


def read(state_root: Path) -> list[ClusterRun]:
    """Every cluster run the history holds, in the order they began; lines that do not parse are skipped."""
    path = history_path(state_root)
    if not path.exists() or not _is_ours(path):
        return []
    runs: list[ClusterRun] = []
    open_runs: dict[str, ClusterRun] = {}
    with open(path) as f:
        next(f, None)
        for text in f:
            try:
                line = json.loads(text)
                at = parse_time(line["at"])
                cluster, event = str(line["cluster"]), str(line["event"])
            except (ValueError, KeyError, TypeError):
                continue
            if at is None:
                continue
            nodes = [n for n in line.get("nodes") or [] if isinstance(n, dict) and n.get("id")]
            run = open_runs.get(cluster)
            if run is None:
                if not nodes:
                    continue  # a down or status of a cluster with nothing: no run
                run = ClusterRun(cluster, str(line.get("zone", "")), str(line.get("currency", "")))
                open_runs[cluster] = run
                runs.append(run)
            run.last_seen = at
            for n in nodes:
                life = run.nodes.get(n["id"])
                rate = Decimal(n["rate"]) if n.get("rate") is not None else None
                if life is None:
                    run.nodes[n["id"]] = NodeLife(
                        str(n.get("name", "")), str(n.get("type", "unknown")), parse_time(n.get("created_at")), rate, at
                    )
                else:  # the latest word of the API on it
                    life.last_seen, life.rate = at, rate
                    life.created = parse_time(n.get("created_at")) or life.created
                if event in ("down", "deleted"):  # deleted: some removed by a down that left others
                    run.nodes[n["id"]].ended = at
            if event == "down":
                run.ended = at
                del open_runs[cluster]
    return runs


HEADER = ("CLUSTER", "ZONE", "NODES", "STARTED", "ENDED", "DURATION", "COST")


def render(runs: list[ClusterRun]) -> str:
    """The report: one row per cluster run, ended ones included, and the total per currency."""
    if not runs:
        return "no clusters made from this machine yet (up, status and down record them)"
    rows = [HEADER]
    totals: dict[str, Decimal] = {}
    for r in runs:
        total, unknown = r.cost()
        totals[r.currency] = totals.get(r.currency, Decimal(0)) + total
        start, end = r.start, r.end
        text = money(total, r.currency) + (f" (price unknown: {', '.join(unknown)})" if unknown else "")
        rows.append(
            (
                r.cluster,
                r.zone,
                str(len(r.nodes)),
                _short(start),
                _short(r.ended) if r.ended else f"last seen {_short(r.last_seen)}",
                duration_text((end - start).total_seconds()) if start and end else "-",
                text,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append("total: " + ", ".join(money(t, c) for c, t in totals.items()))
    lines.append(
        "a cluster not ended by `down` (running, autostopped, deleted elsewhere) counts until it was last seen by "
        "up, status or down"
    )
    return "\n".join(lines)


def _short(t: datetime | None) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M") if t else "-"
