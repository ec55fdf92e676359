"""The Exoscale v2 libcloud driver against the local API, which checks every request against the spec."""

import base64
import logging
import pickle
import threading
import traceback

import pytest
from libcloud.common.types import InvalidCredsError, LibcloudError
from libcloud.compute.base import NodeAuthPassword, NodeAuthSSHKey
from libcloud.compute.providers import get_driver
from libcloud.compute.types import NodeState

import cloud
from cloud.exoscale_driver import ExoscaleAPIError, ExoscaleOperationError, ExoscaleV2NodeDriver, RetryPolicy
from tests.conftest import SIM_KEY, SIM_SECRET, free_port
from tests.support import PUBKEY, UBUNTU, assert_all_spec_valid


def make_cluster_bits(driver):
    driver.import_key_pair_from_string("k1", PUBKEY)
    sg = driver.ex_create_security_group("grp", "test group")
    driver.ex_add_security_group_rule(sg, "tcp", 22, cidr="0.0.0.0/0")
    driver.ex_add_security_group_rule(sg, "all", source_group=sg)
    return sg


def test_registered_with_libcloud():
    assert get_driver(cloud.PROVIDER) is ExoscaleV2NodeDriver


def test_default_endpoint_is_the_zone_api():
    d = ExoscaleV2NodeDriver("k", "s", zone="de-fra-1")
    assert d.connection.host == "api-de-fra-1.exoscale.com" and d.connection.port == 443 and d.connection.secure
    with pytest.raises(ValueError, match="valid zones: at-vie-1"):
        ExoscaleV2NodeDriver("k", "s", zone="mars-1")


def test_catalogue(driver, sim):
    assert {l.id for l in driver.list_locations()} >= {"ch-gva-2", "de-fra-1"}
    sizes = {s.name: s for s in driver.list_sizes()}
    assert {"standard.micro", "standard.small", "standard.medium", "standard.large"} <= set(sizes)
    assert sizes["standard.medium"].extra["cpus"] == 2 and sizes["standard.medium"].ram == 4096
    images = {i.name: i for i in driver.list_images()}
    for name in ("Linux Ubuntu 22.04 LTS 64-bit", UBUNTU):
        assert images[name].extra["default_user"] == "ubuntu"
    assert {e.query.get("visibility", [""])[0] for e in sim.app.exchanges if e.path == "/v2/template"} == {
        "public",
        "private",
    }
    with pytest.raises(ValueError, match="valid: .*standard.small"):
        driver.ex_get_size("standard.gigantic")
    assert_all_spec_valid(sim)


def test_node_lifecycle(driver, sim):
    sg = make_cluster_bits(driver)
    node = driver.create_node(
        "n1",
        "standard.small",
        UBUNTU,
        ex_ssh_keys=["k1"],
        ex_security_groups=["grp"],
        ex_labels={"cluster": "c1", "role": "head"},
        ex_userdata="#cloud-config\nruncmd: [ls]\n",
        ex_disk_size=20,
    )
    assert (
        node.state == NodeState.RUNNING
        and node.public_ips
        and node.extra["labels"] == {"cluster": "c1", "role": "head"}
    )
    assert node.extra["security_group_ids"] == [sg.id] and node.extra["ssh_keys"] == ["k1"]
    inst = sim.app.model.instances[node.id]
    assert base64.b64decode(inst.user_data).decode() == "#cloud-config\nruncmd: [ls]\n"
    other = driver.create_node("n2", "standard.micro", UBUNTU, ex_labels={"cluster": "c2"})
    assert [n.id for n in driver.list_nodes(ex_labels={"cluster": "c1"})] == [node.id]
    assert {n.id for n in driver.list_nodes()} == {node.id, other.id}
    assert driver.stop_node(node) and driver.ex_get_node(node.id).state == NodeState.STOPPED
    assert driver.start_node(node) and driver.ex_get_node(node.id).state == NodeState.RUNNING
    assert driver.reboot_node(node)
    assert driver.destroy_node(node) and driver.destroy_node(other)
    assert driver.list_nodes() == []
    assert_all_spec_valid(sim)


def test_create_node_honours_auth_ssh_key(driver, sim):
    """libcloud's deploy_node pattern: auth=NodeAuthSSHKey(public key), since the driver declares ssh_key."""
    assert "ssh_key" in driver.features["create_node"]
    a = driver.create_node("a", "standard.micro", UBUNTU, auth=NodeAuthSSHKey(PUBKEY))
    [registered] = driver.list_key_pairs()
    assert registered.name.startswith("libcloud-") and a.extra["ssh_keys"] == [registered.name]
    b = driver.create_node("b", "standard.micro", UBUNTU, auth=NodeAuthSSHKey(PUBKEY), ex_ssh_keys=[registered.name])
    assert b.extra["ssh_keys"] == [registered.name] and len(driver.list_key_pairs()) == 1  # found by fingerprint
    with pytest.raises(LibcloudError, match="Password provided"):
        driver.create_node("c", "standard.micro", UBUNTU, auth=NodeAuthPassword("pw"))
    assert_all_spec_valid(sim)


def test_key_pairs(driver, sim, tmp_path):
    kp = driver.import_key_pair_from_string("k1", PUBKEY)
    assert kp.fingerprint and kp.public_key == PUBKEY
    f = tmp_path / "id.pub"
    f.write_text(PUBKEY + "\n")
    assert driver.import_key_pair_from_file("k2", str(f)).name == "k2"
    assert sorted(k.name for k in driver.list_key_pairs()) == ["k1", "k2"]
    with pytest.raises(ExoscaleAPIError, match="409|already exists"):
        driver.import_key_pair_from_string("k1", PUBKEY)
    assert driver.delete_key_pair(kp) and driver.delete_key_pair("k2")
    assert driver.list_key_pairs() == []


def test_security_groups_and_rules(driver, sim):
    sg = make_cluster_bits(driver)
    other = driver.ex_create_security_group("other")
    g = driver.ex_add_security_group_rule(sg, "udp", 6000, 6100, source_group=other.id)
    g = driver.ex_add_security_group_rule(g, "icmp", cidr="10.0.0.0/8")
    rules = {(r.protocol, r.start_port, r.end_port, r.cidr, r.source_group_id) for r in g.rules}
    assert {r.direction for r in g.rules} == {"ingress"} and all(isinstance(r.id, str) and r.id for r in g.rules)
    assert rules == {
        ("tcp", 22, 22, "0.0.0.0/0", None),
        ("all", None, None, None, sg.id),
        ("udp", 6000, 6100, None, other.id),
        ("icmp", None, None, "10.0.0.0/8", None),
    }
    with pytest.raises(ValueError, match="exactly one source"):
        driver.ex_add_security_group_rule(sg, "tcp", 22)
    with pytest.raises(ValueError, match="no security group named 'nope'"):
        driver.ex_add_security_group_rule("nope", "tcp", 22, cidr="0.0.0.0/0")
    with pytest.raises(ExoscaleAPIError, match="rule source"):
        driver.ex_delete_security_group(other)  # still a rule source of grp
    assert sorted(g.name for g in driver.ex_list_security_groups()) == ["grp", "other"]
    assert_all_spec_valid(sim)


def test_transient_errors_retried_to_success(driver, sim):
    sim.app.faults.error_rate = 0.4
    make_cluster_bits(driver)
    node = driver.create_node("n1", "standard.small", UBUNTU, ex_ssh_keys=["k1"])
    assert node.state == NodeState.RUNNING
    codes = [e.status for e in sim.app.exchanges]
    assert 429 in codes or 503 in codes
    assert len(sim.app.model.instances) == 1  # retried, never duplicated
    assert_all_spec_valid(sim)


def test_502_on_create_is_not_blindly_retried(driver, sim):
    sim.app.faults.fail_next.append((502, "POST", "/instance"))
    with pytest.raises(ExoscaleAPIError) as ei:
        driver.create_node("n1", "standard.small", UBUNTU)
    assert ei.value.code == 502 and "POST /instance" in str(ei.value)
    assert sum(e.method == "POST" and e.path == "/v2/instance" for e in sim.app.exchanges) == 1


def test_502_on_get_is_retried(driver, sim):
    sim.app.faults.fail_next += [(502, "GET", "/zone"), (504, "GET", "/zone")]
    assert driver.list_locations()


def test_retries_are_bounded(sim):
    d = ExoscaleV2NodeDriver(
        SIM_KEY,
        SIM_SECRET,
        host=sim.host,
        port=sim.port,
        secure=False,
        retry=RetryPolicy(attempts=3, base_s=0.01, cap_s=0.02),
    )
    sim.app.faults.error_rate = 1.0
    with pytest.raises(ExoscaleAPIError) as ei:
        d.list_nodes()
    assert ei.value.code in (429, 503) and len(sim.app.exchanges) == 3


def test_other_4xx_raise_at_once_with_the_api_message(driver, sim):
    with pytest.raises(ExoscaleAPIError) as ei:
        driver.create_node("n1", "standard.small", UBUNTU, ex_ssh_keys=["no-such-key"])
    assert ei.value.code == 404 and "no-such-key" in str(ei.value)
    assert sum(e.path == "/v2/instance" for e in sim.app.exchanges) == 1


def test_failed_operation_reports_the_half_made_instance(driver, sim):
    sim.app.model.faults.fail_next_ops = 1
    sim.app.model.faults.fail_ops_matching = "create-instance"
    with pytest.raises(ExoscaleOperationError) as ei:
        driver.create_node("n1", "standard.small", UBUNTU, ex_labels={"cluster": "c"})
    e = ei.value
    assert e.reason == "fault" and "create instance 'n1' failed" in str(e) and e.reference_id
    [left] = driver.list_nodes(ex_labels={"cluster": "c"})
    assert left.id == e.reference_id and left.state == NodeState.ERROR
    assert driver.destroy_node(left) and driver.list_nodes() == []


def test_unreachable_api_is_one_clear_error():
    d = ExoscaleV2NodeDriver(
        SIM_KEY,
        SIM_SECRET,
        host="127.0.0.1",
        port=free_port(),
        secure=False,
        retry=RetryPolicy(attempts=2, base_s=0.01),
    )
    with pytest.raises(LibcloudError, match="cannot reach the Exoscale API"):
        d.list_nodes()


def test_safe_from_many_threads(driver, sim):
    sim.app.model.faults.op_delay_s = 0.3
    driver.import_key_pair_from_string("k1", PUBKEY)
    nodes, errors = [], []

    def make(i):
        try:
            nodes.append(
                driver.create_node(
                    f"n{i}", "standard.small", UBUNTU, ex_ssh_keys=["k1"], ex_labels={"cluster": "t", "i": str(i)}
                )
            )
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(n.name for n in nodes) == [f"n{i}" for i in range(8)]
    assert len({n.id for n in nodes}) == 8 and all(n.state == NodeState.RUNNING for n in nodes)
    assert_all_spec_valid(sim)


def test_secret_never_shows(sim, caplog):
    caplog.set_level(logging.DEBUG)
    texts = []
    good = ExoscaleV2NodeDriver(
        SIM_KEY, SIM_SECRET, host=sim.host, port=sim.port, secure=False, retry=RetryPolicy(attempts=2, base_s=0.01)
    )
    wrong = ExoscaleV2NodeDriver(SIM_KEY, SIM_SECRET + "x", host=sim.host, port=sim.port, secure=False)
    node = good.create_node("n1", "standard.micro", UBUNTU)
    texts += [
        repr(good),
        str(good),
        repr(good.connection),
        repr(node),
        repr(node.driver),
        repr(vars(good)),
        repr(vars(good.connection)),
    ]
    failures = [
        lambda: wrong.list_nodes(),
        lambda: good.create_node("n", "standard.small", UBUNTU, ex_ssh_keys=["missing"]),
        lambda: (setattr(sim.app.faults, "error_rate", 1.0), good.list_nodes()),
        lambda: pickle.dumps(good.connection.key),
    ]
    for fail in failures:
        try:
            fail()
        except Exception as e:
            texts += [str(e), repr(e), "".join(traceback.format_exception(e))]
        else:
            pytest.fail("expected a failure")
    texts.append(caplog.text)
    for t in texts:
        assert SIM_SECRET not in t
    sim.app.faults.error_rate = 0.0
    with pytest.raises(InvalidCredsError, match="invalid request signature"):
        wrong.list_nodes()
