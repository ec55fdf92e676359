"""The per-cluster restricted key (cloud.iam) as `ray up` makes it through the provider, against the local
Exoscale's IAM: the head's provider works with it alone, it can do nothing outside compute instances,
and `ray down`'s cleanup deletes key, role, group and SSH key (the deleted key stops working)."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
from libcloud.common.types import InvalidCredsError

from cloud import head_credentials, iam
from cloud.exoscale_driver import ExoscaleV2NodeDriver, RetryPolicy
from tests.conftest import SIM_SECRET
from tests.test_ray_provider import Cluster, env  # noqa: F401  (the env fixture)


@pytest.fixture
def prepared(sim, env, tmp_path):  # noqa: F811
    """A cluster whose head config was prepared on 'the user's machine', and the head's provider built
    from that config with the key file where `ray up` puts it."""
    c = Cluster(sim, "iamtest")
    laptop = c.provider()
    remote = laptop.prepare_for_head_node(copy.deepcopy(c.config))
    local_file = iam.key_copy_path(laptop._store.dir)
    head_home = tmp_path / "head-home"
    (head_home / ".raysweep").mkdir(parents=True)
    head_file = head_home / head_credentials.HEAD_PATH
    head_file.write_bytes(local_file.read_bytes())
    head_cfg = copy.deepcopy(remote["provider"])
    head_cfg["credentials_file"] = str(head_file)
    head_cfg["state_dir"] = str(head_home / ".raysweep")
    return c, laptop, remote, local_file, head_cfg


def restricted_driver(sim, creds) -> ExoscaleV2NodeDriver:
    return ExoscaleV2NodeDriver(
        creds.key, creds.secret, host=sim.host, port=sim.port, secure=False, retry=RetryPolicy(attempts=2, base_s=0.01)
    )


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
    created = head.create_node(c.node_config, c.tags(), 2)
    [first, second] = created
    head.set_node_tags(first, {"ray-node-status": "up-to-date"})
    assert head.node_tags(first)["ray-node-status"] == "up-to-date"
    assert sorted(head.non_terminated_nodes({})) == sorted(created)
    head.terminate_nodes([first, second])
    assert head.non_terminated_nodes({}) == []


def test_the_restricted_key_cannot_leave_compute_instances(sim, prepared):
    _, _, _, local_file, _ = prepared
    drv = restricted_driver(sim, head_credentials.read(local_file))
    drv.list_nodes()  # allowed
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
