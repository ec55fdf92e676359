"""cluster.toml's `max_hourly_rate`: what the cluster's instances may cost per hour together, in the price
table's currency, disks included. `up -n N` refuses a cluster that would pass it, before anything is made; an
autoscaling cluster's max_workers is lowered to what fits when its YAML is written. Pure: rates from
cloud.pricing, no API call.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal

from cloud.pricing import PriceTable


class RateCapError(ValueError):
    """A cluster the cap does not allow, or a cap that cannot be applied; one line for the user."""


def node_rate(prices: PriceTable, instance_type: str, disk_gb: int) -> Decimal | None:
    """One node's hourly rate with its disk; None when the type has no price."""
    rate = prices.rate(instance_type)
    return None if rate is None else rate + prices.volume_gb_hour * disk_gb


def _rate_of(prices: PriceTable, instance_type: str, disk_gb: int, cap: Decimal) -> Decimal:
    rate = node_rate(prices, instance_type, disk_gb)
    if rate is None:
        raise RateCapError(
            f"max_hourly_rate {cap} {prices.currency}: the price of {instance_type} is unknown, so the cap cannot be "
            f'kept; give its hourly rate in cluster.toml\'s [prices] (e.g. "{instance_type}" = 0.05)'
        )
    return rate


def check_one_node(cap: Decimal, prices: PriceTable, instance_type: str, disk_gb: int) -> None:
    """RateCapError when not even one node fits under the cap (a bad setting), or its price is unknown."""
    rate = _rate_of(prices, instance_type, disk_gb, cap)
    if rate > cap:
        raise RateCapError(
            f"max_hourly_rate {cap} {prices.currency} is below one node: {instance_type} with a {disk_gb} GB disk "
            f"costs {rate.normalize():f} {prices.currency}/h; raise it to at least that, or remove it"
        )


def check_nodes(cap: Decimal, prices: PriceTable, instance_type: str, disk_gb: int, n: int) -> None:
    """RateCapError, one line, when `n` nodes of `instance_type` would pass the cap."""
    rate = _rate_of(prices, instance_type, disk_gb, cap)
    total = rate * n
    if total > cap:
        fits = int((cap / rate).to_integral_value(ROUND_FLOOR))
        raise RateCapError(
            f"{n} node(s) of {instance_type} would cost {total.normalize():f} {prices.currency}/h, more than "
            f"max_hourly_rate {cap} {prices.currency}: at most {fits} node(s) fit under it"
        )


def rate_of(cap: Decimal, prices: PriceTable, nodes: dict[str, int], disk_gb: int) -> Decimal:
    """The hourly rate of `nodes` ({instance type: count}) with their disks; RateCapError for a type without a
    price (the cap could not be kept)."""
    return sum((_rate_of(prices, t, disk_gb, cap) * n for t, n in nodes.items()), Decimal(0))


def cap_workers(
    cap: Decimal,
    prices: PriceTable,
    instance_type: str,
    disk_gb: int,
    max_workers: int,
    fixed: Decimal,
) -> int:
    """The most workers of `instance_type`, at most `max_workers`, that fit under the cap beside `fixed` (the
    hourly rate of the nodes that are there anyway: the head, other worker types at their maximum).
    RateCapError when those alone pass it."""
    rate = _rate_of(prices, instance_type, disk_gb, cap)
    room = cap - fixed
    if room < 0:
        raise RateCapError(
            f"the head and any other worker types ({fixed.normalize():f} {prices.currency}/h at their maximum) "
            f"pass max_hourly_rate {cap} {prices.currency}"
        )
    return min(max_workers, int((room / rate).to_integral_value(ROUND_FLOOR)))
