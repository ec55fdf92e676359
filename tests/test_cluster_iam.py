"""The per-cluster restricted key (cloud.iam) as `ray up` makes it through the provider, against the local
Exoscale's IAM: the head's provider works with it alone (its own instance pools, up to max_workers), it can
touch nothing of another cluster in the same account, nothing outside compute, nothing from another address,
and `ray down`'s cleanup deletes key, role, pools, group and SSH key (the deleted key stops working).

The head here is an instance whose address is 127.0.0.1 (a sim hook), so that this test process, which reaches
the local Exoscale from 127.0.0.1, calls the API from the head's address as the head's autoscaler would; a
client bound to 127.0.0.2 is "another address"."""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import pytest
import requests
from libcloud.common.types import InvalidCredsError
from libcloud.compute.base import NodeImage, NodeSize
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND

from cloud import head_credentials, iam
from cloud.exoscale_driver import ExoscaleV2NodeDriver, RetryPolicy
from tests.conftest import SIM_KEY, SIM_SECRET, local_exoscale
from tests.support import HEAD_IP, Cluster, HeadsAtLoopback, make_cluster

ELSEWHERE = "127.0.0.2"


def _prepare(sim, home: Path):
    """A cluster whose head config was prepared on 'the user's machine' (after `ray up` made the head), and
    the head's provider config built from it with the key file where `ray up` puts it (under `home`)."""
    sim.app.model.hooks = HeadsAtLoopback()
    c = Cluster(sim, "iamtest")
    laptop = c.provider()
    laptop.create_node(c.head_node_config, c.head_tags(), 1)
    remote = laptop.prepare_for_head_node(copy.deepcopy(c.config))
    local_file = iam.key_copy_path(laptop._store.dir)
    (home / ".raysweep").mkdir(parents=True)
    head_file = home / head_credentials.HEAD_PATH
    head_file.write_bytes(local_file.read_bytes())
    head_cfg = copy.deepcopy(remote["provider"])
    head_cfg["credentials_file"] = str(head_file)
    head_cfg["state_dir"] = str(home / ".raysweep")
    return c, laptop, remote, local_file, head_cfg


@pytest.fixture
def prepared(sim, sim_env, tmp_path):
    return _prepare(sim, tmp_path / "head-home")


class _From(requests.adapters.HTTPAdapter):
    """Connections from a given local address."""

    def __init__(self, source: str):
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def restricted_driver(sim, creds, source: str | None = None) -> ExoscaleV2NodeDriver:
    drv = ExoscaleV2NodeDriver(
        creds.key, creds.secret, host=sim.host, port=sim.port, secure=False, retry=RetryPolicy(attempts=2, base_s=0.01)
    )
    if source:
        drv.connection.connect()
        drv.connection.connection.session.mount("http://", _From(source))
    return drv


def test_head_config_names_only_the_key_file(prepared):
    c, _, remote, local_file, _ = prepared
    assert stat.S_IMODE(os.stat(local_file).st_mode) == 0o600
    creds = head_credentials.read(local_file)
    text = json.dumps(remote)
    assert creds.secret.reveal() not in text and SIM_SECRET not in text
    assert remote["provider"]["credentials_file"] == "~/" + head_credentials.HEAD_PATH
    assert not any(k.startswith("~/.raysweep") for k in remote["file_mounts"]), "workers would get the key"
    assert any(k.startswith("~/.raysweep") for k in c.config["file_mounts"]), "the head would not get the key"
    assert creds.cluster == "iamtest" and creds.role_id


def test_the_head_scales_with_the_restricted_key_alone(sim, prepared, monkeypatch):
    c, _, _, _, head_cfg = prepared
    monkeypatch.delenv("EXOSCALE_API_KEY")
    monkeypatch.delenv("EXOSCALE_API_SECRET")
    from cloud.ray_provider import ExoscaleNodeProvider

    head = ExoscaleNodeProvider(head_cfg, c.name)
    [head_id] = head.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})
    created = head.create_node(c.node_config, c.tags(), 2)
    [first, second] = created
    head.set_node_tags(first, {"ray-node-status": "up-to-date"})
    assert head.node_tags(first)["ray-node-status"] == "up-to-date"
    assert sorted(head.non_terminated_nodes({TAG_RAY_NODE_KIND: "worker"})) == sorted(created)
    assert sorted(head.non_terminated_nodes({})) == sorted([head_id, *created])
    fresh = ExoscaleNodeProvider(head_cfg, c.name)  # a restarted autoscaler: the tag file is read back
    assert fresh.node_tags(first)["ray-node-status"] == "up-to-date"
    head.terminate_nodes([first, second])
    assert head.non_terminated_nodes({}) == [head_id]


def test_the_restricted_key_cannot_leave_compute_instances(sim, prepared):
    _, _, _, local_file, _ = prepared
    creds = head_credentials.read(local_file)
    drv = restricted_driver(sim, creds)
    [pool_id] = creds.pools.values()
    drv.ex_get_instance_pool(pool_id)  # allowed
    for attempt in (
        lambda: drv.ex_call("POST", "/api-key", {"name": "escalate", "role-id": drv.ex_call("GET", "/iam-role")}),
        lambda: drv.ex_call("GET", "/api-key"),
        lambda: drv.ex_call("GET", "/iam-role"),
        lambda: drv.ex_list_security_groups(),
        lambda: drv.list_key_pairs(),
        lambda: drv.ex_call("GET", "/dbaas-service"),
        lambda: drv.ex_call("GET", "/sos-buckets-usage"),
    ):
        with pytest.raises(InvalidCredsError, match="403"):
            attempt()


def test_cleanup_deletes_key_role_group_and_ssh_key(sim, prepared):
    c, laptop, _, local_file, _ = prepared
    creds = head_credentials.read(local_file)
    laptop.cleanup_cluster_resources()
    assert iam.find_keys(laptop.driver, c.name) == [] and iam.find_role(laptop.driver, c.name) is None
    assert not local_file.exists()
    assert laptop.driver.ex_list_security_groups() == [] and laptop.driver.list_key_pairs() == []
    with pytest.raises(InvalidCredsError):
        restricted_driver(sim, creds).list_nodes()
    laptop.cleanup_cluster_resources()  # idempotent


def test_a_kept_key_is_reused_and_a_lost_one_replaced(sim, prepared):
    c, laptop, _, local_file, _ = prepared
    first = head_credentials.read(local_file)
    laptop.prepare_for_head_node(copy.deepcopy(c.config))
    assert head_credentials.read(local_file).key == first.key
    local_file.unlink()  # the local copy of the secret is lost: a new key, the old one deleted
    laptop.prepare_for_head_node(copy.deepcopy(c.config))
    second = head_credentials.read(local_file)
    assert second.key != first.key
    assert [k.key for k in iam.find_keys(laptop.driver, c.name)] == [second.key]


# ------------------------------------------------- the head's key against another cluster of the account


def _others(sim, prepared):
    """Two other clusters in the same account, made with the user's key: a static one (`zz`, its head an
    instance) and an autoscaling one (`victim`, one worker in its instance pool); and the head's key."""

    c, laptop, _, local_file, _ = prepared
    [zz] = make_cluster(laptop.driver, "zz", 1)
    victim = Cluster(sim, "victim")
    vc, vpc = victim.node_config, victim.config["provider"]
    pool = laptop.driver.ex_create_instance_pool(
        "raysweep-victim-workers",
        vc["instance_type_id"],
        vc["template_id"],
        1,
        ex_ssh_keys=[vpc["ssh_key_name"]],
        ex_security_groups=[vpc["security_group_id"]],
        ex_labels={"cluster": "victim", "managed-by": "raysweep", "role": "worker"},
    )
    [member], victim_pool = pool.node_ids, pool.id
    creds = head_credentials.read(local_file)
    own_pool = next(iter(getattr(creds, "pools", {}).values()), None)
    return {
        "zz": zz.id,
        "member": member,
        "victim_pool": victim_pool,
        "own_pool": own_pool,
        "victim": victim,
        "creds": creds,
        "max": c.config["available_node_types"]["ray.worker.default"]["max_workers"],
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One account for the tests that only try what the head's key must not do (each asserts that nothing of
    the account changed): the local Exoscale, the prepared cluster and the two others, made once."""
    with local_exoscale(0.05, seed=1) as local:
        sim = local.server
        with pytest.MonkeyPatch.context() as mp:  # the user's key for the setup only, as sim_env gives it
            mp.setenv("EXOSCALE_API_KEY", SIM_KEY)
            mp.setenv("EXOSCALE_API_SECRET", SIM_SECRET)
            mp.setenv("RAYSWEEP_STATE_DIR", str(tmp_path_factory.mktemp("state")))
            made = _others(sim, _prepare(sim, tmp_path_factory.mktemp("head-home")))
        yield sim, made


def account(sim):
    """Everything of the account an attack could change: instances (name, labels, state, pool) and pools."""
    m = sim.app.model
    with m.lock:
        return (
            {i.id: (i.name, dict(i.labels), i.state, i.manager_id) for i in m.instances.values()},
            {p.id: (p.name, p.size, list(p.instance_ids), dict(p.labels)) for p in m.instance_pools.values()},
        )


ATTACKS = {
    "delete another cluster's instance": lambda d, o: d.destroy_node(d.ex_get_node(o["zz"])),
    "delete another cluster's pool member": lambda d, o: d.destroy_node(d.ex_get_node(o["member"])),
    "relabel another cluster's instance": lambda d, o: d.ex_update_node(
        d.ex_get_node(o["zz"]), labels={"cluster": "mine"}
    ),
    "rename another cluster's instance": lambda d, o: d.ex_update_node(d.ex_get_node(o["zz"]), name="hijacked"),
    "create an instance in another cluster's group with its key": lambda d, o: d.create_node(
        "intruder",
        NodeSize(o["victim"].node_config["instance_type_id"], "", 0, 0, 0, 0.0, d),
        NodeImage(o["victim"].node_config["template_id"], "", d),
        ex_security_groups=[o["victim"].config["provider"]["security_group_id"]],
        ex_ssh_keys=[o["victim"].config["provider"]["ssh_key_name"]],
    ),
    "scale another cluster's pool": lambda d, o: d.ex_scale_instance_pool(o["victim_pool"], 3),
    "evict another cluster's pool member": lambda d, o: d.ex_evict_instance_pool_members(
        o["victim_pool"], [o["member"]]
    ),
    "scale its own pool past max_workers": lambda d, o: d.ex_scale_instance_pool(o["own_pool"], o["max"] + 1),
    "delete its own pool": lambda d, o: d.ex_delete_instance_pool(o["own_pool"]),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_heads_key_cannot_touch_another_cluster(world, attack):
    """From the head's address, with the head's key: each attack is refused and nothing of the account changes."""
    sim, others = world
    drv = restricted_driver(sim, others["creds"])
    before = account(sim)
    with pytest.raises(InvalidCredsError, match="403"):
        ATTACKS[attack](drv, others)
    assert account(sim) == before, f"{attack}: refused, yet the account changed"


def test_the_heads_key_is_refused_from_another_address(world):
    sim, others = world
    creds, pool = others["creds"], others["own_pool"]
    assert restricted_driver(sim, creds).ex_get_instance_pool(pool).id == pool  # from the head's address
    elsewhere = restricted_driver(sim, creds, source=ELSEWHERE)
    for call in (
        lambda: elsewhere.ex_get_instance_pool(pool),
        lambda: elsewhere.ex_scale_instance_pool(pool, 1),
        lambda: elsewhere.ex_get_node(creds.head_id),
    ):
        with pytest.raises(InvalidCredsError, match="403"):
            call()
    assert sim.app.model.instance_pools[pool].size == 0


def test_the_head_scales_to_max_workers_and_no_further(sim, prepared, monkeypatch):
    c, _, _, _, head_cfg = prepared
    monkeypatch.delenv("EXOSCALE_API_KEY")
    monkeypatch.delenv("EXOSCALE_API_SECRET")
    from cloud.ray_provider import ExoscaleNodeProvider

    head = ExoscaleNodeProvider(head_cfg, c.name)
    most = c.config["available_node_types"]["ray.worker.default"]["max_workers"]
    created = head.create_node(c.node_config, c.tags(), most)
    assert len(created) == most
    with pytest.raises(NodeLaunchException) as e:
        head.create_node(c.node_config, c.tags(), 1)
    assert e.value.category == "forbidden"
    assert sorted(head.non_terminated_nodes({TAG_RAY_NODE_KIND: "worker"})) == sorted(created)


# ------------------------------------------------------------------ a static cluster's key (autostop)


def test_a_static_heads_key_deletes_only_its_own_instances(sim, driver):
    """The key `start` gives a static cluster's head (cloud.iam.static_head_policy, as autostop_control makes
    it): from the head's address it lists instances and deletes the cluster's own, nothing of another cluster,
    no create, no relabel; from another address nothing."""

    own = make_cluster(driver, "st", 2)
    [other] = make_cluster(driver, "zz", 1)
    policy = iam.static_head_policy([str(n.id) for n in own], HEAD_IP, "ch-gva-2")
    creds = iam.create_key(driver, "st", "ch-gva-2", sim.endpoint, policy)
    drv, elsewhere = restricted_driver(sim, creds), restricted_driver(sim, creds, source=ELSEWHERE)
    before = account(sim)
    for attempt in (
        lambda: drv.destroy_node(other),
        lambda: drv.ex_update_node(own[0], labels={"cluster": "zz"}),
        lambda: drv.ex_update_node(other, name="hijacked"),
        lambda: drv.create_node(
            "intruder",
            NodeSize(own[0].extra["instance_type_id"], "", 0, 0, 0, 0.0, drv),
            NodeImage(own[0].extra["template_id"], "", drv),
        ),
        lambda: elsewhere.list_nodes(),
        lambda: elsewhere.destroy_node(own[1]),
    ):
        with pytest.raises(InvalidCredsError, match="403"):
            attempt()
    assert account(sim) == before
    assert {n.name for n in drv.list_nodes({"cluster": "st"})} == {n.name for n in own}
    drv.destroy_node(own[1])  # autostop's teardown: a worker, then the head
    drv.destroy_node(own[0])
    assert sim.app.model.instances[other.id].state == "running"


def test_autostops_teardown_works_with_the_heads_key_alone(sim, prepared, monkeypatch):
    """What the autostop daemon does on an autoscaling cluster's head (after stopping Ray there, which this
    test must not do on this machine): the pools scaled to 0 and the head deleted, with the head's key."""
    from cloud import autostop_daemon
    from cloud.ray_provider import ExoscaleNodeProvider

    c, _, _, _, head_cfg = prepared
    monkeypatch.delenv("EXOSCALE_API_KEY")
    monkeypatch.delenv("EXOSCALE_API_SECRET")
    head = ExoscaleNodeProvider(head_cfg, c.name)
    head.create_node(c.node_config, c.tags(), 2)
    creds = head_credentials.read(Path(head_cfg["credentials_file"]))
    said: list[str] = []
    autostop_daemon._teardown_pools(head.driver, creds, said.append)
    assert "nothing of the cluster's instances left" in said, said
    m = sim.app.model
    with m.lock:
        assert [p.size for p in m.instance_pools.values()] == [0]
        live = [i.name for i in m.instances.values() if i.labels.get("cluster") == c.name and i.state != "destroying"]
    assert live == [], live
