"""What Exoscale charges for an instance: a dated snapshot of its public price list, and the arithmetic.

Exoscale's API v2 has no pricing operation. Its public price list is what its portal serves; Exoscale's own
Karpenter provider embeds a snapshot of it (`karpenter-provider-exoscale`, `pkg/cloudprovider/
cloudprovider_prices.go`, commit 26d3234), and PRICES below is that snapshot, transcribed on PRICES_TAKEN.
In it the CHF, EUR and USD figures are the same numbers, so one table serves the three currencies.
Instances are billed by the second of their existence (running or not, until deleted); a volume by the
GB-hour. Types the list lacks have no price: `rate()` returns None and callers say "price unknown", never a
guess. cluster.toml's `[prices]` overrides a rate (a negotiated one, say); an override for a type Exoscale
does not have is a warning, not a failure (see PriceTable.with_overrides).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

PRICES_TAKEN = "2026-12-06"
PRICES_SOURCE = "Exoscale's public price list, as embedded in karpenter-provider-exoscale (commit 26d3234)"
CURRENCIES = ("EUR", "CHF", "USD")
DEFAULT_CURRENCY = "EUR"

#: Per hour, by instance type (family.size, as the API names them).
PRICES: Mapping[str, Decimal] = {
    name: Decimal(price)
    for name, price in {
        "standard.micro": "0.00729",
        "standard.tiny": "0.01458",
        "standard.small": "0.02333",
        "standard.medium": "0.04666",
        "standard.large": "0.09333",
        "standard.extra-large": "0.18667",
        "standard.huge": "0.37334",
        "standard.mega": "0.74667",
        "standard.titan": "1.49333",
        "standard.jumbo": "2.24",
        "standard.colossus": "2.98666",
        "cpu.extra-large": "0.23333",
        "cpu.huge": "0.46666",
        "cpu.mega": "0.93333",
        "cpu.titan": "1.86667",
        "memory.extra-large": "0.14",
        "memory.huge": "0.28",
        "memory.mega": "0.56",
        "memory.titan": "1.12",
        "storage.extra-large": "0.14",
        "storage.huge": "0.28",
        "storage.mega": "0.56",
        "storage.titan": "1.12",
        "storage.jumbo": "1.86667",
        "gpu.small": "1.16806",
        "gpu.medium": "1.71111",
        "gpu.large": "2.25417",
        "gpu.huge": "2.82083",
        "gpu2.small": "1.375",
        "gpu2.medium": "2.01389",
        "gpu2.large": "2.65278",
        "gpu2.huge": "3.31944",
        "gpu3.small": "2.13333",
        "gpu3.medium": "4.26667",
        "gpu3.large": "8.53333",
        "gpu3.huge": "17.06667",
        "gpua5000.small": "1.34028",
        "gpua5000.medium": "2.47951",
        "gpua5000.large": "4.55694",
        "gpu3080ti.small": "0.92361",
        "gpu3080ti.medium": "1.70868",
        "gpu3080ti.large": "3.14028",
    }.items()
}
#: A volume (an instance's disk), per GB and hour.
VOLUME_GB_HOUR = Decimal("0.00014")

CENT = Decimal("0.01")


class PriceError(ValueError):
    """A price override that cannot be used (not a number, negative); the message names it."""


@dataclass(frozen=True)
class PriceTable:
    """Hourly rates by instance type, in one currency, and where they came from."""

    rates: Mapping[str, Decimal] = field(default_factory=lambda: dict(PRICES))
    currency: str = DEFAULT_CURRENCY
    volume_gb_hour: Decimal = VOLUME_GB_HOUR
    overridden: frozenset[str] = frozenset()

    def rate(self, instance_type: str) -> Decimal | None:
        """The hourly rate of `instance_type` (family.size), or None when the price list lacks it."""
        return self.rates.get(instance_type.lower())

    def with_overrides(self, overrides: Mapping[str, object]) -> tuple[PriceTable, list[str]]:
        """This table with some rates replaced (cluster.toml's `[prices]`: type = hourly rate), and a warning
        for each type the price list does not know (kept: it may be newer than the list). PriceError for a
        rate that is not a non-negative number."""
        rates = dict(self.rates)
        warnings = []
        for name, value in overrides.items():
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise PriceError(f"prices.{name} = {value!r}: give an hourly rate, e.g. 0.04666")
            try:
                price = Decimal(str(value))
            except ArithmeticError:
                raise PriceError(f"prices.{name} = {value!r}: give an hourly rate, e.g. 0.04666") from None
            if not price.is_finite() or price < 0:
                raise PriceError(f"prices.{name} = {value!r}: an hourly rate is a number >= 0")
            key = name.lower()
            if key not in self.rates:
                warnings.append(
                    f"prices.{name}: not an instance type of the price list of {PRICES_TAKEN}; its rate is used as given"
                )
            rates[key] = price
        overridden = self.overridden | {name.lower() for name in overrides}
        return PriceTable(rates, self.currency, self.volume_gb_hour, overridden), warnings


def cost(hourly: Decimal, seconds: float) -> Decimal:
    """What `seconds` of a resource billed by the second at `hourly` cost (unrounded; a started second counts
    whole)."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be a finite number >= 0, not {seconds!r}")
    return hourly * Decimal(math.ceil(seconds)) / Decimal(3600)


def money(amount: Decimal | None, currency: str = DEFAULT_CURRENCY) -> str:
    """An amount as a person reads it: cents, with sub-cent amounts shown as such; None is 'price unknown'."""
    if amount is None:
        return "price unknown"
    if 0 < amount < CENT:
        return f"< 0.01 {currency}"
    return f"{amount.quantize(CENT, rounding=ROUND_HALF_EVEN)} {currency}"


@dataclass(frozen=True)
class Usage:
    """One node's use: its type, how long it existed, its disk."""

    instance_type: str
    seconds: float
    disk_gb: int = 0


@dataclass(frozen=True)
class Bill:
    """The cost of some usages; `unknown` lists the types without a price (left out of `total`)."""

    total: Decimal
    hourly: Decimal
    node_seconds: Mapping[str, float]
    unknown: tuple[str, ...]
    currency: str

    def __str__(self) -> str:
        text = f"{money(self.total, self.currency)} ({money(self.hourly, self.currency)}/h)"
        if self.unknown:
            text += f"; price unknown for {', '.join(self.unknown)}"
        return text


def bill(usages: Iterable[Usage], table: PriceTable | None = None) -> Bill:
    """The cost of the usages at the table's rates (instances and their disks), the hourly rate of all of
    them together, and node-seconds per instance type."""
    table = table or PriceTable()
    total = hourly = Decimal(0)
    node_seconds: dict[str, float] = {}
    unknown: list[str] = []
    for u in usages:
        node_seconds[u.instance_type] = node_seconds.get(u.instance_type, 0.0) + u.seconds
        rate = table.rate(u.instance_type)
        if rate is None:
            if u.instance_type not in unknown:
                unknown.append(u.instance_type)
            continue
        node_hourly = rate + table.volume_gb_hour * u.disk_gb
        total += cost(node_hourly, u.seconds)
        hourly += node_hourly
    return Bill(total, hourly, node_seconds, tuple(unknown), table.currency)
