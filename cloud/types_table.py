"""The table `exoscale.py types` prints: each instance type with its CPUs, memory, GPUs, hourly price and the
zones that offer it. Pure: the types come from the API (ExoscaleV2NodeDriver.ex_list_instance_types), the
prices from cloud.pricing (a type the price list lacks says "price unknown", never a guess)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cloud.exoscale_driver import ExoscaleInstanceType
from cloud.pricing import PRICES_TAKEN, PriceTable

HEADER = ("TYPE", "CPUS", "MEMORY", "GPUS", "PRICE/H", "ZONES")
NEEDS_AUTHORIZATION = " *"
EVERY_ZONE = "every zone"


def all_zones(types: Iterable[ExoscaleInstanceType]) -> list[str]:
    """The zones that offer at least one of `types`, sorted."""
    return sorted({z for t in types for z in t.zones})


GiB = 1024**3


def memory_text(memory: int) -> str:
    """Bytes as GiB, with a fraction only where there is one: 512 MiB is '0.5 GiB', 4 GiB is '4 GiB'."""
    gib = memory / GiB
    return f"{gib:.0f} GiB" if gib == int(gib) else f"{gib:.1f} GiB"


def price_text(instance_type: str, prices: PriceTable) -> str:
    rate = prices.rate(instance_type)
    return "price unknown" if rate is None else f"{rate} {prices.currency}"


def types_rows(
    types: Iterable[ExoscaleInstanceType], prices: PriceTable | None = None, zone: str | None = None
) -> list[tuple[str, ...]]:
    """One row of text per type (HEADER's columns), in the order given; only the types `zone` offers if it
    is given. A type the organization may not use yet (Exoscale's authorization, e.g. for GPU families) has
    its name marked with NEEDS_AUTHORIZATION; a type offered in all the zones of the listing says EVERY_ZONE."""
    prices = prices or PriceTable()
    types = list(types)
    every = all_zones(types)
    return [
        (
            t.name + ("" if t.authorized else NEEDS_AUTHORIZATION),
            str(t.cpus),
            memory_text(t.memory),
            str(t.gpus),
            price_text(t.name, prices),
            EVERY_ZONE if len(every) > 1 and set(t.zones) == set(every) else ", ".join(t.zones),
        )
        for t in types
        if zone is None or zone in t.zones
    ]


def render_types(
    types: Iterable[ExoscaleInstanceType], prices: PriceTable | None = None, zone: str | None = None
) -> str:
    """The table as text, columns aligned (numbers to the right), with a last line saying where the prices
    come from. `zone`: only the types that zone offers."""
    prices = prices or PriceTable()
    types = list(types)
    rows = types_rows(types, prices, zone)
    lines = _aligned([HEADER, *rows], right={1, 2, 3})
    source = f"prices per hour in {prices.currency}, Exoscale's price list of {PRICES_TAKEN}"
    if prices.overridden:
        source += f" (overridden: {', '.join(sorted(prices.overridden))})"
    if not rows:
        lines.append(f"no instance type is offered in {zone}" if zone else "no instance types")
    notes = [source]
    if any(r[5] == EVERY_ZONE for r in rows):
        notes.append(f"{EVERY_ZONE}: {', '.join(all_zones(types))}")
    if any(r[0].endswith(NEEDS_AUTHORIZATION) for r in rows):
        notes.append("* needs Exoscale's authorization for this organization")
    return "\n".join([*lines, *notes])


def _aligned(rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return out
