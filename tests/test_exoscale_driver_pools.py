"""The driver's instance pools against the local Exoscale: create, get, list, scale, evict, delete; members
as Nodes naming their pool; every request and answer as the spec has them; and a driver holding a key
confined to one pool."""

from __future__ import annotations

import time

import pytest
from libcloud.common.types import InvalidCredsError
from libcloud.compute.types import NodeState

from cloud.exoscale_driver import ExoscaleInstancePool, ExoscaleV2NodeDriver, RetryPolicy
from tests.support import PUBKEY, UBUNTU, assert_all_spec_valid


def running_members(driver, pool: ExoscaleInstancePool, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        nodes = [driver.ex_get_node(i) for i in pool.node_ids]
        if all(n.state == NodeState.RUNNING for n in nodes):
            return nodes
        assert time.monotonic() < deadline, f"members of {pool.name} not running after {timeout} s: {nodes}"
        time.sleep(0.05)


def test_instance_pool_lifecycle(driver, sim):
    driver.import_key_pair_from_string("k1", PUBKEY)
    sg = driver.ex_create_security_group("workers")
    labels = {"cluster": "c1", "ray-node-type": "worker"}
    pool = driver.ex_create_instance_pool(
        "c1-workers", "standard.small", UBUNTU, 2, ex_disk_size=20, ex_ssh_keys=["k1"],
        ex_security_groups=["workers"], ex_labels=labels, ex_userdata="#cloud-config\n",
    )  # fmt: skip
    assert (pool.name, pool.size, pool.state, pool.labels) == ("c1-workers", 2, "running", labels)
    assert pool.security_group_ids == [sg.id] and pool.ssh_keys == ["k1"] and pool.disk_size == 20
    assert len(pool.node_ids) == 2 and [p.id for p in driver.ex_list_instance_pools()] == [pool.id]
    nodes = running_members(driver, pool)
    assert all(n.extra["instance_pool_id"] == pool.id and n.extra["labels"] == labels for n in nodes)
    assert sorted(n.id for n in driver.list_nodes(ex_labels={"cluster": "c1"})) == sorted(pool.node_ids)

    grown = driver.ex_scale_instance_pool(pool, 4)
    assert grown.size == 4 and grown.node_ids[:2] == pool.node_ids
    running_members(driver, grown)
    chosen = driver.ex_get_node(grown.node_ids[1])
    after = driver.ex_evict_instance_pool_members(grown, [chosen])
    assert after.size == 3 and chosen.id not in after.node_ids
    assert driver.ex_scale_instance_pool(after.id, 0).node_ids == []
    with pytest.raises(ValueError, match="count >= 1"):
        driver.ex_create_instance_pool("empty", "standard.small", UBUNTU, 0)
    with pytest.raises(ValueError, match=">= 0"):
        driver.ex_scale_instance_pool(pool, -1)

    back = driver.ex_scale_instance_pool(pool, 1)
    assert driver.ex_delete_instance_pool(back)
    assert driver.ex_list_instance_pools() == []
    deadline = time.monotonic() + 10
    while driver.list_nodes(ex_labels={"cluster": "c1"}):
        assert time.monotonic() < deadline, "the pool's members outlived it"
        time.sleep(0.05)
    assert_all_spec_valid(sim)


def test_a_driver_with_a_key_confined_to_its_pool(driver, sim):
    mine = driver.ex_create_instance_pool("mine", "standard.micro", UBUNTU, 1, ex_disk_size=10)
    theirs = driver.ex_create_instance_pool("theirs", "standard.micro", UBUNTU, 1, ex_disk_size=10)
    rule = f"operation in ['scale-instance-pool', 'evict-instance-pool-members', 'get-instance-pool'] && parameters.id == '{mine.id}'"
    policy = {
        "default-service-strategy": "deny",
        "services": {
            "compute": {"type": "rules", "rules": [{"action": "allow", "expression": rule}]},
            "general": {"type": "allow"},
        },
    }
    role = driver.ex_call("POST", "/iam-role", {"name": "pool-only", "policy": policy}, what="create role")
    key = driver.ex_call("POST", "/api-key", {"name": "head", "role-id": role["reference"]["id"]})
    head = ExoscaleV2NodeDriver(
        key["key"], key["secret"], host=sim.host, port=sim.port, secure=False,
        retry=RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05),
    )  # fmt: skip
    assert head.ex_scale_instance_pool(mine, 2).size == 2
    assert head.ex_evict_instance_pool_members(mine, [mine.node_ids[0]]).size == 1
    for refused in (
        lambda: head.ex_scale_instance_pool(theirs, 3),
        lambda: head.ex_evict_instance_pool_members(theirs, theirs.node_ids),
        lambda: head.ex_delete_instance_pool(mine),
        lambda: head.destroy_node(driver.ex_get_node(theirs.node_ids[0])),
    ):
        with pytest.raises(InvalidCredsError, match="403"):
            refused()
    assert driver.ex_get_instance_pool(theirs.id).node_ids == theirs.node_ids
