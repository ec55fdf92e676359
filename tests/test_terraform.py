"""terraform/ describes the same cluster as exoscale.py up. Providers cannot be downloaded here, so the
HCL is parsed and checked, and `terraform fmt -check` runs where the binary exists."""

import json
import shutil
import subprocess

import hcl2
import pytest

from cloud.cli import state_from_terraform
from tests.conftest import ROOT

TF = ROOT / "terraform"


def unquote(x):
    if isinstance(x, str):
        return x[1:-1] if len(x) >= 2 and x[0] == x[-1] == '"' else x
    if isinstance(x, dict):
        return {unquote(k): unquote(v) for k, v in x.items() if k != "__is_block__"}
    if isinstance(x, list):
        return [unquote(v) for v in x]
    return x


def load(name):
    with open(TF / name) as f:
        return unquote(hcl2.load(f))


def resources():
    out = {}
    for block in load("main.tf")["resource"]:
        for rtype, named in block.items():
            for rname, body in named.items():
                out[(rtype, rname)] = body
    return out


def test_provider_and_variables():
    v = load("versions.tf")
    assert v["terraform"][0]["required_providers"][0]["exoscale"]["source"] == "exoscale/exoscale"
    names = {k for block in load("variables.tf")["variable"] for k in block}
    assert {"name", "zone", "nodes", "instance_type", "template", "disk_size", "ssh_public_key", "ssh_cidr"} <= names


def test_security_group_allows_only_ssh_from_outside_and_all_between_members():
    r = resources()
    rules = [body for (t, _), body in r.items() if t == "exoscale_security_group_rule"]
    assert len(rules) == 2
    ssh = next(x for x in rules if "cidr" in x)
    assert (ssh["type"], ssh["protocol"], ssh["start_port"], ssh["end_port"], ssh["cidr"]) == (
        "INGRESS",
        "TCP",
        22,
        22,
        "${var.ssh_cidr}",
    )
    members = next(x for x in rules if "user_security_group_id" in x)
    assert (members["type"], members["protocol"]) == ("INGRESS", "ALL")
    assert members["user_security_group_id"] == members["security_group_id"] == "${exoscale_security_group.cluster.id}"
    assert r[("exoscale_security_group", "cluster")]["name"] == "raysweep-${var.name}"
    assert r[("exoscale_ssh_key", "cluster")]["name"] == "raysweep-${var.name}"


def test_instances_carry_the_same_labels_as_exoscale_py():
    inst = resources()[("exoscale_compute_instance", "node")]
    assert inst["count"] == "${var.nodes}"
    assert inst["security_group_ids"] == ["${exoscale_security_group.cluster.id}"]
    assert inst["ssh_key"] == "${exoscale_ssh_key.cluster.name}"
    labels = inst["labels"]
    assert "local.labels" in labels and "role" in labels and "head" in labels and "worker" in labels
    local_labels = load("main.tf")["locals"][0]["labels"]
    assert local_labels == {"cluster": "${var.name}", "managed-by": "raysweep"}


def test_outputs_feed_import_terraform():
    outs = {k for block in load("outputs.tf")["output"] for k in block}
    assert {"nodes", "ssh_user"} <= outs
    sample = {
        "nodes": {
            "value": [
                {"name": "c-head", "role": "head", "public_ip": "198.51.100.2", "id": "i1"},
                {"name": "c-worker-1", "role": "worker", "public_ip": "198.51.100.3", "id": "i2"},
            ]
        },
        "ssh_user": {"value": "ubuntu"},
    }
    st = state_from_terraform(json.loads(json.dumps(sample)), "c")
    assert [(n.name, n.role, n.ip, n.user) for n in st.ordered()] == [
        ("c-head", "head", "198.51.100.2", "ubuntu"),
        ("c-worker-1", "worker", "198.51.100.3", "ubuntu"),
    ]


@pytest.mark.skipif(shutil.which("terraform") is None, reason="no terraform binary on this machine")
def test_terraform_fmt_check():
    r = subprocess.run(["terraform", "fmt", "-check", "-diff", str(TF)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
