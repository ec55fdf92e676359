"""Instance pools of the local Exoscale, driven by Exoscale's own SDK: create, get, list, scale, evict, update
and delete; members are instances carrying the pool as their manager; every answer checked against the
spec. Then a key confined by CEL rules to one pool; and one pool whose member boots as a local host."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from cloud.sim.hosts import missing_requirements
from cloud.sim.spec import SpecValidator
from tests.conftest import SIM_KEY, SIM_SECRET, local_exoscale
from tests.exoscale_sdk import client, exceptions
from tests.support import UBUNTU, done, sdk_exoscale


@pytest.fixture
def local(monkeypatch):
    with sdk_exoscale(monkeypatch, op_delay_s=0.05, poll_s=0.02, seed=11) as sim:
        yield sim


@pytest.fixture
def c(local):
    return client(SIM_KEY, SIM_SECRET, local.endpoint)


def catalogue(c, size="micro") -> tuple[str, str]:
    itype = next(
        t["id"] for t in c.list_instance_types()["instance-types"] if (t["family"], t["size"]) == ("standard", size)
    )
    tmpl = next(t["id"] for t in c.list_templates(visibility="public")["templates"] if t["name"] == UBUNTU)
    return itype, tmpl


def make_pool(c, name, size, **fields) -> str:
    itype, tmpl = catalogue(c)
    return done(c, c.create_instance_pool(
        name=name, size=size, instance_type={"id": itype}, template={"id": tmpl}, disk_size=10, **fields))  # fmt: skip


def members(c, pool_id) -> list[str]:
    return [i["id"] for i in c.get_instance_pool(id=pool_id)["instances"]]


def wait_running(c, ids, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {i: c.get_instance(id=i)["state"] for i in ids}
        if set(states.values()) == {"running"}:
            return
        time.sleep(0.02)
    raise AssertionError(f"pool members not running within {timeout} s: {states}")


def wait_gone(c, ids, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {i["id"] for i in c.list_instances()["instances"]} & set(ids)
        if not left:
            return
        time.sleep(0.02)
    raise AssertionError(f"instances {sorted(left)} still listed after {timeout} s")


def validate_answers(local) -> None:
    validator = SpecValidator.shared()
    for x in local.app.exchanges:
        if x.status == 200:
            validator.validate_response(x.method, x.path, x.query, x.body, x.status, x.response)


def test_pool_lifecycle(c, local, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    done(c, c.register_ssh_key(name="me", public_key=(tmp_path / "k.pub").read_text().strip()))
    sg = done(c, c.create_security_group(name="workers"))
    labels = {"cluster": "c1", "ray-node-type": "worker"}
    pool = make_pool(c, "c1-workers", 2, labels=labels, ssh_key={"name": "me"}, security_groups=[{"id": sg}])

    got = c.get_instance_pool(id=pool)
    assert (got["name"], got["state"], got["size"], got["labels"]) == ("c1-workers", "running", 2, labels)
    assert got["ssh-key"] == {"name": "me"} and got["security-groups"] == [{"id": sg}]
    first = members(c, pool)
    assert len(first) == 2 and [p["id"] for p in c.list_instance_pools()["instance-pools"]] == [pool]
    wait_running(c, first)
    for iid in first:
        m = c.get_instance(id=iid)
        assert m["manager"] == {"id": pool, "type": "instance-pool"} and m["labels"] == labels
        assert re.fullmatch(rf"pool-{pool[:5]}-[a-z]{{5}}", m["name"]), m["name"]
        assert m["ssh-key"]["name"] == "me" and m["security-groups"][0]["id"] == sg and m["public-ip"]
    assert sorted(i["id"] for i in c.list_instances(labels="ray-node-type=worker")["instances"]) == sorted(first)
    with pytest.raises(exceptions().ExoscaleAPIClientException, match="409.*in use by"):
        c.delete_security_group(id=sg)

    done(c, c.scale_instance_pool(id=pool, size=4))
    grown = members(c, pool)
    assert grown[:2] == first and len(set(grown)) == 4
    wait_running(c, grown)
    done(c, c.scale_instance_pool(id=pool, size=3))  # the newest member goes
    assert members(c, pool) == grown[:3]
    wait_gone(c, grown[3:])

    done(c, c.evict_instance_pool_members(id=pool, instances=[first[0]]))  # a chosen member goes
    assert members(c, pool) == grown[1:3] and c.get_instance_pool(id=pool)["size"] == 2
    wait_gone(c, [first[0]])
    loner = done(c, c.create_instance(name="loner", instance_type={"id": catalogue(c)[0]},
                                      template={"id": catalogue(c)[1]}, disk_size=10))  # fmt: skip
    with pytest.raises(exceptions().ExoscaleAPIClientException, match="400.*not members"):
        c.evict_instance_pool_members(id=pool, instances=[loner])
    assert c.get_instance(id=loner)["state"] == "running" and members(c, pool) == grown[1:3]

    small = catalogue(c, "small")[0]
    done(c, c.update_instance_pool(id=pool, labels={"cluster": "c1", "v": "2"}, instance_type={"id": small}))
    assert c.get_instance_pool(id=pool)["labels"] == {"cluster": "c1", "v": "2"}
    assert c.get_instance(id=grown[1])["labels"] == labels  # existing members stay untouched
    done(c, c.scale_instance_pool(id=pool, size=3))
    newest = c.get_instance(id=members(c, pool)[-1])
    assert newest["labels"] == {"cluster": "c1", "v": "2"} and newest["instance-type"]["size"] == "small"

    done(c, c.delete_instance(id=grown[1]))  # a member deleted directly leaves its pool
    assert c.get_instance_pool(id=pool)["size"] == 2 and grown[1] not in members(c, pool)

    done(c, c.scale_instance_pool(id=pool, size=0))
    assert c.get_instance_pool(id=pool)["size"] == 0 and members(c, pool) == []
    done(c, c.scale_instance_pool(id=pool, size=1))
    last = members(c, pool)
    done(c, c.delete_instance_pool(id=pool))  # deletes its members
    wait_gone(c, last)
    assert c.list_instance_pools()["instance-pools"] == []
    with pytest.raises(exceptions().ExoscaleAPIClientException, match="404"):
        c.get_instance_pool(id=pool)
    done(c, c.delete_security_group(id=sg))  # no longer in use
    validate_answers(local)


def test_pool_requests_refused(c, local):
    itype, tmpl = catalogue(c)
    base = {"instance_type": {"id": itype}, "template": {"id": tmpl}, "disk_size": 10}
    Client = exceptions().ExoscaleAPIClientException
    with pytest.raises(Client, match="400"):
        c.create_instance_pool(name="p", size=0, **base)  # the spec: a pool starts with one member at least
    with pytest.raises(Client, match="400.*not simulated"):
        c.create_instance_pool(name="p", size=1, private_networks=[{"id": itype}], **base)
    with pytest.raises(Client, match="400"):
        c.scale_instance_pool(id=itype, size=-1)
    with pytest.raises(Client, match="404"):
        c.scale_instance_pool(id=itype, size=1)
    pool = make_pool(c, "p", 1)
    local.model.faults.op_delay_s = 60.0  # the deletion stays pending for the rest of the test
    c.delete_instance_pool(id=pool)
    assert c.get_instance_pool(id=pool)["state"] == "destroying"
    with pytest.raises(Client, match="409.*destroying"):
        c.scale_instance_pool(id=pool, size=3)
    validate_answers(local)


def test_a_key_confined_to_one_pool(c, local):
    """A role allowing scale-instance-pool only on one pool id, up to a size, and reads of that pool: scaling
    another pool, or this one past the cap, is refused and changes nothing."""
    mine, theirs = make_pool(c, "mine", 1), make_pool(c, "theirs", 1)
    rules = [
        {"action": "allow", "expression": f"operation == 'scale-instance-pool' && parameters.id == '{mine}' "
                                          "&& parameters.size <= 3"},
        {"action": "allow", "expression": f"operation == 'get-instance-pool' && parameters.id == '{mine}'"},
    ]  # fmt: skip
    policy = {
        "default-service-strategy": "deny",
        "services": {"compute": {"type": "rules", "rules": rules}, "general": {"type": "allow"}},
    }
    role = done(c, c.create_iam_role(name="pool-only", policy=policy))
    key = c.create_api_key(name="head", role_id=role)
    head = client(key["key"], key["secret"], local.endpoint)

    done(head, head.scale_instance_pool(id=mine, size=3))
    assert head.get_instance_pool(id=mine)["size"] == 3
    Auth = exceptions().ExoscaleAPIAuthException
    theirs_before = c.get_instance_pool(id=theirs)
    for refused in (
        lambda: head.scale_instance_pool(id=theirs, size=2),  # another pool
        lambda: head.scale_instance_pool(id=mine, size=4),  # past the cap
        lambda: head.get_instance_pool(id=theirs),
        lambda: head.delete_instance_pool(id=theirs),
        lambda: head.evict_instance_pool_members(id=theirs, instances=members(c, theirs)),
        lambda: head.delete_instance(id=members(c, theirs)[0]),
        lambda: head.create_instance(name="x", instance_type={"id": catalogue(c)[0]},
                                     template={"id": catalogue(c)[1]}, disk_size=10),
    ):  # fmt: skip
        with pytest.raises(Auth, match="403"):
            refused()
    assert c.get_instance_pool(id=theirs) == theirs_before and c.get_instance_pool(id=mine)["size"] == 3


@pytest.mark.root
@pytest.mark.skipif(bool(missing_requirements()), reason=f"needs {', '.join(missing_requirements())}")
def test_a_pool_member_boots_as_a_host_and_goes_with_the_pool(tmp_path):
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with local_exoscale(0.0, hosts=True, record=False, seed=None) as sim:
        assert sim.hooks is not None
        c = client(SIM_KEY, SIM_SECRET, sim.endpoint)
        done(c, c.register_ssh_key(name="k", public_key=key.with_suffix(".pub").read_text().strip()))
        sg = done(c, c.create_security_group(name="ssh"))
        rule = {"flow_direction": "ingress", "protocol": "tcp", "network": "0.0.0.0/0", "start_port": 22}
        done(c, c.add_rule_to_security_group(id=sg, end_port=22, **rule))
        pool = make_pool(c, "p", 1, ssh_key={"name": "k"}, security_groups=[{"id": sg}])
        member = c.get_instance(id=members(c, pool)[0])
        sim.hooks.wait_ssh(member["public-ip"], timeout=60)
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(
                ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"ubuntu@{member['public-ip']}", "hostname"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if r.returncode != 255 or time.monotonic() > deadline:  # 255: sshd not ready yet
                break
            time.sleep(0.5)
        assert r.stdout.strip() == member["name"], r.stderr
        host = sim.hooks.hosts[member["id"]]
        done(c, c.delete_instance_pool(id=pool))
        deadline = time.monotonic() + 30
        while (
            member["id"] in sim.hooks.hosts
            or subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True).returncode == 0
        ):
            assert time.monotonic() < deadline, f"the member's host {host.netns} still there after 30 s"
            time.sleep(0.2)
