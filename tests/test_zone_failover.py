"""Zones tried in order (cloud.zone_failover) against the local Exoscale through the driver: a zone without
capacity or past a quota is passed over, any other error ends the search, and when every zone refuses one
line names each zone and its answer, with nothing left behind in any of them."""

from __future__ import annotations

import pytest

from cloud.exoscale_driver import (
    ExoscaleAPIError,
    ExoscaleCapacityError,
    ExoscaleInstanceType,
    ExoscaleOperationCapacityError,
)
from cloud.sim.spec import SpecValidator
from cloud.zone_failover import NoZoneError, first_zone, zones_offering
from tests.support import UBUNTU


def create_in(driver, name, size="standard.small"):
    """create(zone) for first_zone: a node `name` of `size` in that zone, through the zone's driver."""

    def create(zone):
        return driver.ex_zone_driver(zone).create_node(name, size, UBUNTU, ex_labels={"test": name})

    return create


def nodes_named(driver, zones, name):
    return {z: [n.name for n in driver.ex_zone_driver(z).list_nodes(ex_labels={"test": name})] for z in zones}


def test_the_next_zone_when_the_first_has_no_capacity(sim, driver):
    sim.app.model.faults.capacity["standard.small@ch-gva-2"] = 0
    zones = ["ch-gva-2", "at-vie-2", "de-fra-1"]
    zone, node = first_zone(zones, create_in(driver, "head"), "create head")
    assert zone == "at-vie-2" and node.extra["zone"] == "at-vie-2"
    assert nodes_named(driver, zones, "head") == {"ch-gva-2": [], "at-vie-2": ["head"], "de-fra-1": []}


def test_the_first_zone_when_it_can(sim, driver):
    zone, _ = first_zone(["de-fra-1", "at-vie-2"], create_in(driver, "w"))
    assert zone == "de-fra-1"
    assert nodes_named(driver, ["de-fra-1", "at-vie-2"], "w") == {"de-fra-1": ["w"], "at-vie-2": []}


def test_a_quota_passes_to_the_next_zone_too(sim, driver):
    sim.app.model.faults.capacity["standard.small@ch-gva-2"] = 0
    sim.app.model.quotas["instance"] = 0
    with pytest.raises(NoZoneError) as e:
        first_zone(["ch-gva-2", "at-vie-2"], create_in(driver, "q"), "create q")
    assert [a.zone for a in e.value.answers] == ["ch-gva-2", "at-vie-2"]
    assert e.value.answers[0].answer.startswith("no capacity (HTTP 500: POST /instance: Insufficient capacity")
    assert e.value.answers[1].answer.startswith("quota exceeded (HTTP 403: POST /instance: Quota exceeded")


def test_all_zones_out_of_capacity_one_line_nothing_left(sim, driver):
    zones = ["ch-gva-2", "at-vie-2", "de-fra-1"]
    for z in zones:
        sim.app.model.faults.capacity[f"standard.small@{z}"] = 0
    with pytest.raises(NoZoneError) as e:
        first_zone(zones, create_in(driver, "x"), "create x")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("create x: no zone could: ch-gva-2: no capacity (HTTP 500: ")
    for z in zones:
        assert f"{z}: no capacity (HTTP 500: POST /instance: Insufficient capacity: zone {z} cannot provide" in message
    assert nodes_named(driver, zones, "x") == {z: [] for z in zones}
    assert all(driver.ex_zone_driver(z).list_nodes() == [] for z in zones)


def test_other_errors_end_the_search_at_once(sim, driver):
    tried = []

    def create(zone):
        tried.append(zone)
        return driver.ex_zone_driver(zone).create_node("y", "standard.small", UBUNTU, ex_ssh_keys=["no-such-key"])

    with pytest.raises(ExoscaleAPIError) as e:
        first_zone(["ch-gva-2", "at-vie-2"], create)
    assert e.value.code == 404 and not isinstance(e.value, ExoscaleCapacityError)
    assert tried == ["ch-gva-2"]


def test_bad_zone_lists():
    with pytest.raises(ValueError, match="no zone to try"):
        first_zone([], lambda z: z)
    with pytest.raises(ValueError, match="more than once: de-fra-1"):
        first_zone(["de-fra-1", "at-vie-2", "de-fra-1"], lambda z: z)


def test_zones_offering_a_type(driver):
    types = driver.ex_list_instance_types()
    assert zones_offering(types, "gpu3.small", ["at-vie-2", "de-fra-1"]) == (["de-fra-1"], ["at-vie-2"])
    assert zones_offering(types, "standard.small", ["at-vie-2", "de-fra-1"]) == (["at-vie-2", "de-fra-1"], [])
    with pytest.raises(ValueError, match="unknown instance type 'gpu9.small'; valid: cpu.extra-large"):
        zones_offering(types, "gpu9.small", ["de-fra-1"])
    assert zones_offering(
        [ExoscaleInstanceType("i", "gpua5000.small", 1, 1, 1, ("at-vie-2",))], "GPUA5000.small", ["at-vie-2"]
    )[0] == ["at-vie-2"]


def test_capacity_said_by_the_create_operation_passes_to_the_next_zone_too(sim, driver):
    """Exoscale does not document whether a zone without capacity refuses the request or fails the create's
    operation: the failover copes with both, and the refused zone keeps nothing."""
    sim.app.model.faults.capacity_answer = "operation"
    sim.app.model.faults.capacity["standard.small@ch-gva-2"] = 0
    with pytest.raises(ExoscaleOperationCapacityError, match="unavailable: Insufficient capacity") as e:
        driver.create_node("lone", "standard.small", UBUNTU)
    assert e.value.reason == "unavailable" and e.value.reference_id
    zones = ["ch-gva-2", "at-vie-2"]
    zone, node = first_zone(zones, create_in(driver, "op"), "create op")
    assert zone == "at-vie-2" and node.name == "op"
    assert nodes_named(driver, zones, "op") == {"ch-gva-2": [], "at-vie-2": ["op"]}
    assert driver.list_nodes() == []  # the instance whose operation failed is gone
    sim.app.model.faults.capacity["standard.small@at-vie-2"] = 1
    with pytest.raises(NoZoneError, match=r"ch-gva-2: no capacity \(create instance 'x' failed: unavailable: "):
        first_zone(zones, create_in(driver, "x"), "create x")
    for x in sim.app.exchanges:
        if x.status == 200 and x.path.startswith("/v2/operation/"):
            SpecValidator.shared().validate_response(x.method, x.path, x.query, x.body, x.status, x.response)
