"""The price table and the cost arithmetic (pure: no cloud, no Ray)."""

from decimal import Decimal

import pytest

from cloud import pricing
from cloud.pricing import PriceError, PriceTable, Usage, bill, cost, money
from cloud.sim.instance_types import INSTANCE_TYPES


def test_the_price_list_has_the_published_sample_rates():
    t = PriceTable()
    assert t.rate("standard.medium") == Decimal("0.04666")
    assert t.rate("gpu3.small") == Decimal("2.13333")
    assert t.rate("gpua5000.small") == Decimal("1.34028")
    assert t.rate("Standard.Medium") == Decimal("0.04666")  # the API's names are case-insensitive


def test_every_type_the_local_exoscale_offers_has_a_price():
    missing = [f"{f}.{s}" for f, s, *_ in INSTANCE_TYPES if PriceTable().rate(f"{f}.{s}") is None]
    assert missing == []


def test_an_unknown_type_has_no_price_and_is_never_guessed():
    t = PriceTable()
    assert t.rate("gpub300.small") is None
    b = bill([Usage("standard.small", 3600), Usage("gpub300.small", 3600)], t)
    assert b.unknown == ("gpub300.small",)
    assert b.total == Decimal("0.02333")
    assert "price unknown for gpub300.small" in str(b)
    assert money(None) == "price unknown"


def test_billing_is_per_started_second():
    rate = Decimal("0.04666")
    assert cost(rate, 3600) == rate
    assert cost(rate, 1) == rate / 3600
    assert cost(rate, 0.2) == cost(rate, 1)
    assert cost(rate, 0) == 0
    with pytest.raises(ValueError, match="seconds"):
        cost(rate, float("nan"))


def test_a_bill_sums_nodes_disks_and_node_seconds_by_type():
    b = bill([Usage("standard.medium", 1800, disk_gb=50), Usage("standard.medium", 900, 50), Usage("gpu3.small", 60)])
    medium = Decimal("0.04666") + Decimal("0.00014") * 50
    assert b.total == medium * 2700 / 3600 + Decimal("2.13333") * 60 / 3600
    assert b.hourly == 2 * medium + Decimal("2.13333")
    assert b.node_seconds == {"standard.medium": 2700, "gpu3.small": 60}
    assert str(b) == "0.08 EUR (2.24 EUR/h)"


def test_money_rounds_to_cents_and_shows_sub_cent_amounts():
    assert money(Decimal("0.125")) == "0.12 EUR"  # half to even
    assert money(Decimal("0.135")) == "0.14 EUR"
    assert money(Decimal("0.0004"), "CHF") == "< 0.01 CHF"
    assert money(Decimal(0)) == "0.00 EUR"


def test_overrides_replace_rates_and_warn_for_unknown_types():
    t, warnings = PriceTable().with_overrides({"standard.medium": 0.03, "gpu9.small": "1.5"})
    assert t.rate("standard.medium") == Decimal("0.03")
    assert t.rate("gpu9.small") == Decimal("1.5")
    assert len(warnings) == 1 and "prices.gpu9.small" in warnings[0] and pricing.PRICES_TAKEN in warnings[0]
    assert t.overridden == {"standard.medium", "gpu9.small"}
    assert PriceTable().rate("standard.medium") == Decimal("0.04666")  # the shipped table is left alone


@pytest.mark.parametrize("bad", [-1, "cheap", True, float("inf"), [1]])
def test_a_bad_override_is_refused_in_one_line(bad):
    with pytest.raises(PriceError) as e:
        PriceTable().with_overrides({"standard.medium": bad})
    assert "prices.standard.medium" in str(e.value) and "\n" not in str(e.value)
