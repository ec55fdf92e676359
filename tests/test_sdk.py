"""Exoscale's own Python SDK (`exoscale.api.v2.Client`, a client nobody here wrote) through the compute
lifecycle against the local Exoscale, operations waited on with the SDK's own `wait`; every answer it got is
then checked against Exoscale's published spec."""

from __future__ import annotations

import base64
import subprocess
import uuid

import pytest

from cloud.sim.spec import SpecValidator
from tests.conftest import SIM_KEY, SIM_SECRET
from tests.exoscale_sdk import client, exceptions
from tests.support import UBUNTU, done, sdk_exoscale


@pytest.fixture
def local(monkeypatch):
    with sdk_exoscale(monkeypatch, op_delay_s=0.1, poll_s=0.05, seed=5) as sim:
        yield sim


@pytest.fixture
def c(local):
    return client(SIM_KEY, SIM_SECRET, local.endpoint)


def public_key(tmp_path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    return (tmp_path / "k.pub").read_text().strip()


def test_compute_lifecycle(c, local, tmp_path):
    anonymous = client("EXOnobody", "wrong", local.endpoint)
    assert "ch-gva-2" in [z["name"] for z in anonymous.list_zones()["zones"]]  # sent without credentials

    types = c.list_instance_types()["instance-types"]
    small = next(t for t in types if (t["family"], t["size"]) == ("standard", "small"))
    assert c.get_instance_type(id=small["id"])["cpus"] == 2
    templates = c.list_templates(visibility="public")["templates"]
    ubuntu = next(t for t in templates if t["name"] == UBUNTU)
    assert c.get_template(id=ubuntu["id"])["default-user"] == "ubuntu"

    done(c, c.register_ssh_key(name="me", public_key=public_key(tmp_path)))
    assert [k["name"] for k in c.list_ssh_keys()["ssh-keys"]] == ["me"]
    assert c.get_ssh_key(name="me")["fingerprint"]

    web = done(c, c.create_security_group(name="web", description="front"))
    db = done(c, c.create_security_group(name="db"))
    done(c, c.add_rule_to_security_group(id=web, flow_direction="ingress", protocol="tcp",
                                         network="0.0.0.0/0", start_port=443, end_port=443))  # fmt: skip
    done(c, c.add_rule_to_security_group(id=db, flow_direction="ingress", protocol="tcp",
                                         security_group={"id": web}, start_port=5432, end_port=5432))  # fmt: skip
    done(c, c.add_rule_to_security_group(id=db, flow_direction="ingress", protocol="icmp",
                                         security_group={"name": "web"}, icmp={"type": 8, "code": 0}))  # fmt: skip
    rules = c.get_security_group(id=db)["rules"]
    assert [(r["protocol"], r["security-group"]["id"]) for r in rules] == [("tcp", web), ("icmp", web)]
    assert c.get_security_group(id=web)["rules"][0]["network"] == "0.0.0.0/0"
    assert {g["name"] for g in c.list_security_groups()["security-groups"]} == {"web", "db"}

    user_data = base64.b64encode(b"#cloud-config\nruncmd: [echo hi]\n").decode()
    ids = []
    for name, role in (("a", "head"), ("b", "worker")):
        ids.append(done(c, c.create_instance(
            name=name, instance_type={"id": small["id"]}, template={"id": ubuntu["id"]}, disk_size=20,
            ssh_key={"name": "me"}, security_groups=[{"id": web}], labels={"cluster": "c1", "role": role},
            user_data=user_data,
        )))  # fmt: skip
    a, b = ids
    got = c.get_instance(id=a)
    assert (got["name"], got["state"], got["labels"]) == ("a", "running", {"cluster": "c1", "role": "head"})
    assert got["ssh-key"]["name"] == "me" and got["security-groups"][0]["id"] == web and got["public-ip"]
    assert sorted(i["id"] for i in c.list_instances()["instances"]) == sorted(ids)
    assert [i["id"] for i in c.list_instances(labels="role=worker")["instances"]] == [b]

    done(c, c.update_instance(id=b, name="b2", labels={"cluster": "c1", "role": "spare"}))
    got = c.get_instance(id=b)
    assert (got["name"], got["labels"]) == ("b2", {"cluster": "c1", "role": "spare"})

    done(c, c.reboot_instance(id=a))
    done(c, c.stop_instance(id=a))
    assert c.get_instance(id=a)["state"] == "stopped"
    done(c, c.start_instance(id=a))  # the SDK sends no body here (the spec marks one required)
    assert c.get_instance(id=a)["state"] == "running"

    for i in ids:
        done(c, c.delete_instance(id=i))
    assert c.list_instances()["instances"] == []
    rule_ids = [r["id"] for r in c.get_security_group(id=db)["rules"]]
    done(c, c.delete_rule_from_security_group(id=db, rule_id=rule_ids[0]))
    for g in (db, web):
        done(c, c.delete_security_group(id=g))
    done(c, c.delete_ssh_key(name="me"))
    assert c.list_security_groups()["security-groups"] == [] and c.list_ssh_keys()["ssh-keys"] == []

    validator = SpecValidator.shared()
    for x in local.app.exchanges:
        if x.status == 200:
            validator.validate_response(x.method, x.path, x.query, x.body, x.status, x.response)


def test_errors_as_the_sdk_expects_them(c, local):
    errors = exceptions()
    with pytest.raises(errors.ExoscaleAPIAuthException, match="403"):
        client(SIM_KEY, "not-the-secret", local.endpoint).list_instances()
    with pytest.raises(errors.ExoscaleAPIAuthException, match="403"):
        client("EXOunknown", SIM_SECRET, local.endpoint).list_instances()
    unknown = str(uuid.uuid4())
    for call in (
        lambda: c.get_instance(id=unknown),
        lambda: c.delete_instance(id=unknown),
        lambda: c.start_instance(id=unknown),
        lambda: c.get_security_group(id=unknown),
        lambda: c.get_ssh_key(name="nobody"),
        lambda: c.get_operation(id=unknown),
        lambda: c.get_template(id=unknown),
    ):
        with pytest.raises(errors.ExoscaleAPIClientException, match="404"):
            call()
    with pytest.raises(errors.ExoscaleAPIClientException, match="400"):
        c.create_security_group(description="no name")
