"""Conformance of cloud.ray_provider.ExoscaleNodeProvider to Ray's NodeProvider contract, against the local
Exoscale API (real HTTP, signatures, spec checks): as the v1 autoscaler and the cluster launcher call it
(directly), and as autoscaler v2 does (through Ray's NodeProviderAdapter). Workers are members of the node
type's instance pool. No hosts needed."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import (
    TAG_RAY_CLUSTER_NAME,
    TAG_RAY_LAUNCH_REQUEST,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from cloud import ray_config
from cloud.ray_provider import ExoscaleNodeProvider
from tests.conftest import SIM_SECRET
from tests.support import Cluster, wait_for


@pytest.fixture
def cluster(sim, sim_env):
    return Cluster(sim, f"c{uuid.uuid4().hex[:6]}")


def instances(sim):
    with sim.app.model.lock:
        return list(sim.app.model.instances.values())


def test_loaded_by_ray_and_bootstrap_holds_no_secret(cluster):
    p = cluster.provider()
    assert isinstance(p, ExoscaleNodeProvider)
    text = yaml.safe_dump(cluster.config)
    assert SIM_SECRET not in text
    assert cluster.node_config["instance_type_id"] and cluster.node_config["template_id"]
    assert cluster.config["provider"]["security_group_id"]


def test_scoped_to_the_cluster_name(sim, sim_env):
    a, b = Cluster(sim, "scope-a"), Cluster(sim, "scope-b")
    pa, pb = a.provider(), b.provider()
    [na] = pa.create_node(a.node_config, a.tags(), 1)
    [nb] = pb.create_node(b.node_config, b.tags(), 1)
    assert pa.non_terminated_nodes({}) == [na]
    assert pb.non_terminated_nodes({}) == [nb]
    assert pb.non_terminated_nodes({TAG_RAY_NODE_KIND: "worker"}) == [nb]
    assert pa.non_terminated_nodes({TAG_RAY_NODE_KIND: "head"}) == []
    labels = {i.id: i.labels for i in instances(sim)}
    assert labels[na]["cluster"] == "scope-a" and labels[na]["role"] == "worker"
    assert labels[na]["managed-by"] == "raysweep" and labels[na][TAG_RAY_CLUSTER_NAME] == "scope-a"


def test_tags_round_trip_through_a_fresh_provider(cluster):
    p = cluster.provider()
    [nid] = p.create_node(cluster.node_config, cluster.tags(), 1)
    p.set_node_tags(nid, {TAG_RAY_NODE_STATUS: "up-to-date"})
    want = cluster.tags(**{TAG_RAY_NODE_STATUS: "up-to-date", TAG_RAY_CLUSTER_NAME: cluster.name})
    assert p.node_tags(nid) == want
    fresh = cluster.provider()  # a new process: the API and the cluster's tag file know
    assert fresh.non_terminated_nodes({TAG_RAY_NODE_STATUS: "up-to-date"}) == [nid]
    assert fresh.node_tags(nid) == want
    assert fresh.is_running(nid) and not fresh.is_terminated(nid)


def test_ip_is_none_while_pending_then_present_without_a_new_listing(sim, cluster):
    p = cluster.provider()
    [nid] = p.create_node(cluster.node_config, cluster.tags(), 1)
    inst = sim.app.model.instances[nid]
    ip = inst.public_ip
    with sim.app.model.lock:  # as Exoscale shows a booting instance: starting, no address yet
        inst.state, inst.public_ip = "starting", None
    fresh = cluster.provider()
    assert fresh.non_terminated_nodes({}) == [nid]
    assert not fresh.is_running(nid) and not fresh.is_terminated(nid)
    assert fresh.external_ip(nid) is None and fresh.internal_ip(nid) is None
    with sim.app.model.lock:
        inst.state, inst.public_ip = "running", ip
    assert fresh.external_ip(nid) == ip  # asked again: refreshed, not the stale cached None
    assert fresh.internal_ip(nid) == ip


def test_concurrent_tag_updates_lose_nothing(cluster):
    p = cluster.provider()
    [nid] = p.create_node(cluster.node_config, cluster.tags(), 1)
    with ThreadPoolExecutor(8) as pool:  # each sets another tag on the same node at once
        list(pool.map(lambda i: p.set_node_tags(nid, {f"ray-test-{i}": str(i)}), range(8)))
    tags = cluster.provider().node_tags(nid)
    assert {f"ray-test-{i}": str(i) for i in range(8)}.items() <= tags.items()
    assert cluster.tags().items() <= tags.items()


def test_terminate_twice_is_harmless(sim, cluster):
    p = cluster.provider()
    ids = list(p.create_node(cluster.node_config, cluster.tags(), 2))
    p.terminate_node(ids[0])
    p.terminate_node(ids[0])
    p.terminate_nodes(ids)
    p.terminate_nodes(ids)
    deadline = time.monotonic() + 30
    while p.non_terminated_nodes({}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert p.non_terminated_nodes({}) == [], "nodes still listed 30 s after terminate"
    assert all(p.is_terminated(i) for i in ids)
    assert not [i for i in instances(sim) if i.labels.get("cluster") == cluster.name]


def test_three_workers_are_one_scale_of_the_pool(sim, cluster):
    sim.app.model.faults.op_delay_s = 0.5
    p = cluster.provider()
    p.ensure_pools(cluster.config)
    created = p.create_node(cluster.node_config, cluster.tags(), 3)
    assert len(created) == 3 and len({n.name for n in created.values()}) == 3
    assert sorted(p.non_terminated_nodes({TAG_RAY_NODE_KIND: "worker"})) == sorted(created)
    ex = [(e.method, e.path) for e in sim.app.exchanges]
    assert not [x for x in ex if x == ("POST", "/v2/instance")], "a worker was made with create-instance"
    scales = [path for m, path in ex if m == "PUT" and path.endswith(":scale")]
    assert len(scales) == 2, scales  # the new pool's scale to 0, then one scale-out by 3
    with sim.app.model.lock:
        [pool] = [q for q in sim.app.model.instance_pools.values() if q.labels.get("cluster") == cluster.name]
        assert sorted(pool.instance_ids) == sorted(created) and pool.size == 3


def test_faults_are_retried_and_leave_no_broken_instance(sim, cluster):
    p = cluster.provider()
    p.ensure_pools(cluster.config)
    sim.app.faults.fail_next += [(503, "PUT", "/instance-pool"), (429, "GET", "/instance")]
    sim.app.model.faults.fail_next_ops, sim.app.model.faults.fail_ops_matching = 1, "scale-instance-pool"
    created = p.create_node(cluster.node_config, cluster.tags(), 2)
    assert len(created) == 2
    deadline = time.monotonic() + 30
    while len(instances(sim)) != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    mine = instances(sim)
    assert sorted(i.id for i in mine) == sorted(created), [(i.name, i.state) for i in mine]
    assert all(i.labels.get("cluster") == cluster.name and i.labels.get(TAG_RAY_NODE_KIND) for i in mine)


def test_a_refused_create_is_reported_and_leaves_nothing(sim, cluster):
    p = cluster.provider()
    p.ensure_pools(cluster.config)
    sim.app.model.faults.fail_next_ops, sim.app.model.faults.fail_ops_matching = 10, "scale-instance-pool"
    with pytest.raises(NodeLaunchException) as e:
        p.create_node(cluster.node_config, cluster.tags(), 1)
    assert e.value.category == "operation-failed"
    deadline = time.monotonic() + 30
    while instances(sim) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert instances(sim) == [], "a failed create left an instance behind"


# ------------------------------------------------------------------- autoscaler v2's adapter


@pytest.fixture
def adapter(cluster, tmp_path):
    from ray.autoscaler.v2.instance_manager.config import FileConfigReader
    from ray.autoscaler.v2.instance_manager.node_provider import NodeProviderAdapter

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster.config))
    return NodeProviderAdapter(cluster.provider(), FileConfigReader(str(path)))


def test_v2_adapter_launches_and_terminates(adapter, cluster):
    adapter.launch({ray_config.WORKER_TYPE: 2}, "req-1")
    nodes = wait_for(
        "2 launched instances", lambda: len(adapter.get_non_terminated()) == 2 and adapter.get_non_terminated()
    )
    assert {n.node_type for n in nodes.values()} == {ray_config.WORKER_TYPE}
    assert {n.request_id for n in nodes.values()} == {"req-1"}
    assert adapter.poll_errors() == []
    fresh = cluster.provider()
    assert all(fresh.node_tags(i)[TAG_RAY_LAUNCH_REQUEST] == "req-1" for i in nodes)
    adapter.terminate(list(nodes), "req-2")
    wait_for("no instance left", lambda: not adapter.get_non_terminated())
    assert adapter.poll_errors() == []


def test_v2_adapter_reports_a_failed_launch(sim, adapter, cluster):
    cluster.provider().ensure_pools(cluster.config)
    sim.app.model.faults.fail_next_ops, sim.app.model.faults.fail_ops_matching = 10, "scale-instance-pool"
    adapter.launch({ray_config.WORKER_TYPE: 1}, "req-3")
    [err] = wait_for("a launch error", adapter.poll_errors)
    assert err.node_type == ray_config.WORKER_TYPE and err.request_id == "req-3"
    assert isinstance(err.__cause__, NodeLaunchException)
    wait_for("the failed instances removed", lambda: not instances(sim))


def test_a_lost_tag_file_leaves_each_member_its_pools_tags(cluster):
    """Pool members' tags are in the cluster's tag file; without it a member keeps what its pool's labels
    say (kind, node type, cluster) and is still listed under those tags."""
    from cloud.ray_provider import TAGS_FILE_NAME

    p = cluster.provider()
    [nid] = p.create_node(cluster.node_config, cluster.tags(), 1)
    p.set_node_tags(nid, {TAG_RAY_NODE_STATUS: "up-to-date"})
    (p._store.dir / TAGS_FILE_NAME).unlink()
    fresh = cluster.provider()
    assert fresh.node_tags(nid) == {
        TAG_RAY_NODE_KIND: "worker",
        TAG_RAY_USER_NODE_TYPE: ray_config.WORKER_TYPE,
        TAG_RAY_CLUSTER_NAME: cluster.name,
    }
    assert fresh.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: ray_config.WORKER_TYPE}) == [nid]
    assert fresh.non_terminated_nodes({TAG_RAY_NODE_STATUS: "up-to-date"}) == []
