"""Zones tried in order: make something in the first zone that can, moving on only when a zone says it has no
capacity for it or a quota is reached (SkyPilot's failover across regions, for Exoscale's zones).

Pure of any cluster logic: `create(zone)` does the work (a driver's create_node, a pool's creation, `up`'s
whole first node) and raises the driver's ExoscaleCapacityError (or ExoscaleOperationCapacityError, when the
zone says it in the create's operation) or ExoscaleQuotaError when the zone refuses for those reasons. Any other error is not a zone's answer (bad credentials, a bad template, a network
failure) and ends the search at once, as trying the next zone would only repeat it. What `create` left
behind in a refused zone is its own to clean up: a refused create makes nothing on Exoscale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cloud.exoscale_driver import (
    ExoscaleAPIError,
    ExoscaleCapacityError,
    ExoscaleInstanceType,
    ExoscaleOperationCapacityError,
    ExoscaleQuotaError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The refusals after which the next zone is tried.
FAILOVER_ERRORS: tuple[type[Exception], ...] = (
    ExoscaleCapacityError,
    ExoscaleOperationCapacityError,
    ExoscaleQuotaError,
)


@dataclass(frozen=True)
class ZoneAnswer:
    """Why a zone did not make it: its zone and its answer, in a few words."""

    zone: str
    answer: str

    def __str__(self) -> str:
        return f"{self.zone}: {self.answer}"


class NoZoneError(Exception):
    """No zone of the list could make it; `answers` holds each zone's refusal, in the order tried."""

    def __init__(self, what: str, answers: Sequence[ZoneAnswer]):
        self.what = what
        self.answers = tuple(answers)
        super().__init__(f"{what}: no zone could: " + "; ".join(str(a) for a in self.answers))


def answer_of(error: Exception) -> str:
    """A zone's refusal in a few words and the API's own message (one line)."""
    kinds: dict[type[Exception], str] = {
        ExoscaleCapacityError: "no capacity",
        ExoscaleOperationCapacityError: "no capacity",
        ExoscaleQuotaError: "quota exceeded",
    }
    kind = kinds.get(type(error), "refused")
    message = error.message if isinstance(error, ExoscaleAPIError) else str(error)
    code = f"HTTP {error.code}: " if isinstance(error, ExoscaleAPIError) else ""
    return f"{kind} ({code}{' '.join(str(message).split())})"


def first_zone(
    zones: Sequence[str],
    create: Callable[[str], T],
    what: str = "create",
    retry_on: tuple[type[Exception], ...] = FAILOVER_ERRORS,
) -> tuple[str, T]:
    """(zone, what `create(zone)` returned) for the first zone, in `zones`' order, whose create is not refused
    with one of `retry_on`. NoZoneError naming every zone and its answer when all refuse; ValueError for an
    empty list or a zone named twice. `what` names the thing made in the messages, e.g. "create gpu3.small"."""
    if not zones:
        raise ValueError(f"{what}: no zone to try; name at least one")
    twice = sorted({z for z in zones if list(zones).count(z) > 1})
    if twice:
        raise ValueError(f"{what}: zone(s) named more than once: {', '.join(twice)}")
    answers: list[ZoneAnswer] = []
    for zone in zones:
        try:
            result = create(zone)
        except retry_on as e:
            answers.append(ZoneAnswer(zone, answer_of(e)))
            log.info(
                "%s in %s: %s%s", what, zone, answers[-1].answer, "; trying the next zone" if zone != zones[-1] else ""
            )
            continue
        if answers:
            log.info("%s: made in %s after %s", what, zone, "; ".join(str(a) for a in answers))
        return zone, result
    raise NoZoneError(what, answers)


def zones_offering(
    types: Iterable[ExoscaleInstanceType], type_name: str, zones: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(the zones of `zones` that offer `type_name`, in order; those that do not), from a listing of the
    instance types (ExoscaleV2NodeDriver.ex_list_instance_types). ValueError naming the valid types when
    `type_name` is not one of them."""
    by_name = {t.name: t for t in types}
    wanted = by_name.get(type_name.lower())
    if wanted is None:
        raise ValueError(f"unknown instance type {type_name!r}; valid: {', '.join(sorted(by_name))}")
    offered = [z for z in zones if z in wanted.zones]
    return offered, [z for z in zones if z not in wanted.zones]


# ------------------------------------------------------------------------ the node provider's hook


def _has_instances(driver, labels: dict[str, str]) -> bool:
    return any(all(n.extra["labels"].get(k) == v for k, v in labels.items()) for n in driver.list_nodes())


def home_driver(driver, zones: Sequence[str], labels: dict[str, str]):
    """The driver of the zone of `zones` whose instances carry `labels` (the cluster's: where it lives), or
    `driver` when it has none yet or `zones` names fewer than two."""
    if len(zones) < 2:
        return driver
    for zone in [driver.zone, *(z for z in zones if z != driver.zone)]:
        zd = driver.ex_zone_driver(zone)
        if _has_instances(zd, labels):
            return zd
    return driver


def create_in_zones(driver, zones: Sequence[str], labels: dict[str, str], create: Callable[[object], T], what: str):
    """(the driver of the zone used, what `create(that driver)` returned): the zone where the cluster (`labels`)
    has instances, or, while it has none, the first of `zones` whose create is not refused for capacity or quota
    (NoZoneError naming each zone's answer when all refuse). A cluster lives in one zone: it moves only while
    it has no node."""
    if len(zones) < 2:
        return driver, create(driver)
    home = home_driver(driver, zones, labels)
    if _has_instances(home, labels):
        return home, create(home)
    zone, made = first_zone(zones, lambda z: create(driver.ex_zone_driver(z)), what)
    return driver.ex_zone_driver(zone), made
