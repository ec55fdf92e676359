"""What a cluster's instances cost so far and per hour, from what the API says of them: each instance's type and
its `created-at` (Exoscale bills an instance by the second from its creation until it is deleted, running or
not), priced with cloud.pricing. No guess: an instance of a type the price table lacks is "price unknown" and
left out of the total (which then says so); one without a creation time has no uptime.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from libcloud.compute.base import Node

from cloud.pricing import PRICES_TAKEN, PriceTable, cost, money

log = logging.getLogger(__name__)


def parse_time(text: object) -> datetime | None:
    """An API date-time (RFC 3339, e.g. 2026-12-06T23:40:00Z) as an aware datetime; None when absent or not one."""
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=timezone.utc)
    if not isinstance(text, str) or not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class NodeCost:
    """One instance: its type, its hourly rate with its disk (None: price unknown), how long it has existed
    (None: the API gave no creation time) and what that cost."""

    name: str
    instance_type: str
    rate: Decimal | None
    uptime_s: float | None
    cost: Decimal | None
    created_at: str = ""


@dataclass(frozen=True)
class ClusterCost:
    """The instances' costs, their sum and the hourly rate of those with a price; `unknown` names the types
    without one (left out of both)."""

    nodes: tuple[NodeCost, ...]
    total: Decimal
    hourly: Decimal
    unknown: tuple[str, ...]
    currency: str

    def summary(self) -> str:
        text = f"cost: {money(self.total, self.currency)} so far, {money(self.hourly, self.currency)}/h"
        if self.unknown:
            text += f" (without {', '.join(self.unknown)}: price unknown)"
        return text + f"; Exoscale's prices of {PRICES_TAKEN}, each node's disk included"


TYPES_CACHE = "instance-types.json"
_CACHE_MARK = "raysweep-instance-types"


def type_names(nodes: Iterable[Node], list_types: Callable[[], Iterable], cache: Path | None = None) -> dict[str, str]:
    """{node id: instance type name}: the name the API gave with the instance, or, for instances whose type came
    as an id alone, the name of that id in `cache` (a file of the toolkit's: {id: name}, Exoscale's type ids
    do not change), else in `list_types()` (ExoscaleV2NodeDriver.ex_list_instance_types), asked for once and
    then kept in `cache`; so a status asks the API what it asked before cost was shown."""
    nodes = list(nodes)
    names = {str(n.id): n.extra.get("instance_type") for n in nodes}
    if all(names.values()):
        return {k: str(v) for k, v in names.items()}
    wanted = {n.extra.get("instance_type_id") or "" for n in nodes if not names[str(n.id)]}
    by_id = _read_cache(cache)
    if not wanted <= by_id.keys():
        by_id = {t.id: t.name for t in list_types()}
        _write_cache(cache, by_id)
    return {
        str(n.id): names[str(n.id)] or by_id.get(n.extra.get("instance_type_id") or "", "") or "unknown" for n in nodes
    }


def _read_cache(path: Path | None) -> dict[str, str]:
    try:
        doc = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    types = doc.get("types") if isinstance(doc, dict) and doc.get(_CACHE_MARK) == 1 else None
    return {str(k): str(v) for k, v in types.items()} if isinstance(types, dict) else {}


def _write_cache(path: Path | None, by_id: Mapping[str, str]) -> None:
    """Replace the cache, unless a file of that name is not the toolkit's (then it is left alone)."""
    if path is None or (path.exists() and not _read_cache(path)):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({_CACHE_MARK: 1, "types": dict(by_id)}, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("instance types not kept in %s: %s", path, e)


def node_costs(
    nodes: Iterable[Node], types: Mapping[str, str], prices: PriceTable, now: datetime | None = None
) -> ClusterCost:
    """The cost of `nodes` from their creation times until `now` (default: this machine's clock, UTC), at
    `prices`' rates (each node's disk at the volume rate)."""
    now = now or datetime.now(timezone.utc)
    rows: list[NodeCost] = []
    total = hourly = Decimal(0)
    unknown: list[str] = []
    for n in nodes:
        itype = types.get(str(n.id)) or "unknown"
        rate = prices.rate(itype)
        disk = n.extra.get("disk_size") or 0
        if rate is not None:
            rate += prices.volume_gb_hour * int(disk)
        created = parse_time(getattr(n, "created_at", None))
        uptime = max(0.0, (now - created).total_seconds()) if created else None
        c = cost(rate, uptime) if rate is not None and uptime is not None else None
        if rate is None:
            if itype not in unknown:
                unknown.append(itype)
        else:
            hourly += rate
            total += c or Decimal(0)
        rows.append(NodeCost(n.name, itype, rate, uptime, c, created.isoformat() if created else ""))
    return ClusterCost(tuple(rows), total, hourly, tuple(unknown), prices.currency)


def duration_text(seconds: float | None) -> str:
    """A duration as a person reads it: 45s, 12m05s, 3h07m, 2d04h; '-' for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def rate_text(rate: Decimal | None, currency: str) -> str:
    """An hourly rate to the digits the price list has; 'price unknown' for None."""
    return "price unknown" if rate is None else f"{rate.normalize():f} {currency}/h"
