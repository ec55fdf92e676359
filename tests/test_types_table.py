"""The `exoscale.py types` table (cloud.types_table): types from the local Exoscale through the driver, prices
from the dated price list, "price unknown" where the list has none, zones as the API lists them."""

from __future__ import annotations

from decimal import Decimal

from cloud.exoscale_driver import ExoscaleInstanceType
from cloud.pricing import PRICES_TAKEN, PriceTable
from cloud.sim.instance_types import ALL_ZONES
from cloud.types_table import HEADER, memory_text, render_types, types_rows

GiB = 1024**3


def test_rows_from_the_api(driver):
    rows = {r[0]: r for r in types_rows(driver.ex_list_instance_types())}
    assert rows["standard.medium"] == ("standard.medium", "2", "4 GiB", "0", "0.04666 EUR", "every zone")
    assert rows["standard.micro"][2] == "0.5 GiB"
    assert rows["gpu3.small *"] == ("gpu3.small *", "12", "56 GiB", "1", "2.13333 EUR", "de-fra-1")  # not authorized


def test_a_type_the_price_list_lacks_is_price_unknown():
    types = [
        ExoscaleInstanceType("1", "gpua30.small", 8, 64 * GiB, 1, ("ch-gva-2",)),
        ExoscaleInstanceType("2", "standard.small", 2, 2 * GiB, 0, ("ch-gva-2", "de-fra-1")),
    ]
    rows = types_rows(types)
    assert rows[0][4] == "price unknown" and rows[1][4] == "0.02333 EUR"
    assert (rows[0][5], rows[1][5]) == ("ch-gva-2", "every zone")  # every zone of the listing
    overridden, _ = PriceTable().with_overrides({"standard.small": "0.02"})
    assert types_rows(types, overridden)[1][4] == "0.02 EUR"
    assert [r[0] for r in types_rows(types, zone="de-fra-1")] == ["standard.small"]


def test_rendered_table_is_aligned_and_says_where_prices_come_from(driver):
    text = render_types(driver.ex_list_instance_types(), zone="de-fra-1")
    lines = text.splitlines()
    assert lines[0].split() == list(HEADER)
    assert lines[-3] == f"prices per hour in EUR, Exoscale's price list of {PRICES_TAKEN}"
    assert lines[-2] == "every zone: " + ", ".join(ALL_ZONES)
    assert lines[-1] == "* needs Exoscale's authorization for this organization"
    body = lines[1:-3]
    assert any(line.startswith("gpu3.small * ") for line in body)
    assert not any(line.startswith("gpu.small ") for line in body)  # gpu: not in de-fra-1
    cpus_end = lines[0].index("CPUS") + len("CPUS")
    assert all(line[cpus_end - 1].isdigit() for line in body)  # numbers right-aligned under their header
    assert render_types([], zone="de-fra-1").splitlines()[1] == "no instance type is offered in de-fra-1"
    standard = [t for t in driver.ex_list_instance_types() if t.authorized]
    assert render_types(standard).splitlines()[-1].startswith("every zone: ")  # no footnote without a mark


def test_memory_text():
    assert [memory_text(m) for m in (512 * 1024**2, GiB, 225 * GiB, int(1.25 * GiB))] == [
        "0.5 GiB",
        "1 GiB",
        "225 GiB",
        "1.2 GiB",
    ]
    assert PriceTable().rate("gpu3.small") == Decimal("2.13333")
