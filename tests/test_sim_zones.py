"""Zones of the local Exoscale: which types each zone offers, every zone at its own endpoint (as list-zones
gives them), per-zone per-type capacity and the organization's quotas (list-quotas / get-quota), answered to
the driver, to Exoscale's own SDK and to raw HTTP; every success checked against Exoscale's spec."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

import pytest
import requests
from exoscale_auth import ExoscaleV2Auth
from libcloud.common.types import InvalidCredsError

from cloud.exoscale_driver import (
    ExoscaleCapacityError,
    ExoscaleQuota,
    ExoscaleQuotaError,
    ExoscaleV2NodeDriver,
    RetryPolicy,
)
from cloud.sim.instance_types import ALL_ZONES, FAMILY_ZONES, INSTANCE_TYPES
from cloud.sim.local import start
from cloud.sim.model import Faults, Model, ModelError
from cloud.sim.spec import SpecValidator, spec_path
from tests.conftest import ROOT, SIM_KEY, SIM_SECRET, local_exoscale, run_cli
from tests.exoscale_sdk import client, exceptions
from tests.support import UBUNTU


def assert_spec_valid(app):
    v = SpecValidator.shared()
    assert app.exchanges
    for e in app.exchanges:
        if e.status == 200:
            v.validate_response(e.method, e.path, e.query, e.body, e.status, e.response)


def http(sim, method, path, zone=None, body=None):
    """A signed request to `zone`'s endpoint (the sim's default zone's without one)."""
    prefix = f"/{zone}" if zone else ""
    data = json.dumps(body).encode() if body is not None else None
    return requests.request(
        method,
        f"http://{sim.host}:{sim.port}{prefix}/v2{path}",
        data=data,
        headers={"Content-Type": "application/json"},
        auth=ExoscaleV2Auth(SIM_KEY, SIM_SECRET),
        timeout=10,
    )


def type_id(sim, name):
    family, size = name.split(".")
    return next(t.id for t in sim.app.model.list_instance_types() if (t.family, t.size) == (family, size))


def template_id(sim):
    return next(t.id for t in sim.app.model.list_templates() if t.name == UBUNTU)


def create_body(sim, name, type_name):
    return {
        "name": name,
        "instance-type": {"id": type_id(sim, type_name)},
        "template": {"id": template_id(sim)},
        "disk-size": 10,
    }


# ------------------------------------------------------------------------------------- the type table


def test_zones_of_the_type_table_are_the_specs():
    with open(spec_path()) as f:
        spec_zones = set(json.load(f)["components"]["schemas"]["zone-name"]["enum"])
    assert set(ALL_ZONES) == spec_zones
    assert {family for family, *_ in INSTANCE_TYPES} <= FAMILY_ZONES.keys()
    for family, zones in FAMILY_ZONES.items():
        assert zones and set(zones) <= spec_zones, family
    assert FAMILY_ZONES["gpu3"] == ("de-fra-1",)  # Exoscale's documentation
    assert FAMILY_ZONES["standard"] == ALL_ZONES


def test_instance_types_answer_their_zones(sim):
    listed = http(sim, "GET", "/instance-type").json()["instance-types"]
    by_name = {f"{t['family']}.{t['size']}": t for t in listed}
    assert by_name["gpu3.small"]["zones"] == ["de-fra-1"]
    assert by_name["standard.medium"]["zones"] == list(ALL_ZONES)
    one = http(sim, "GET", f"/instance-type/{by_name['gpu2.small']['id']}", zone="de-fra-1").json()
    assert one["zones"] == list(FAMILY_ZONES["gpu2"])  # the same table from every zone's endpoint
    assert_spec_valid(sim.app)


def test_create_of_a_type_not_offered_in_the_zone_is_refused():
    with start(
        SIM_KEY, SIM_SECRET, faults=Faults(op_delay_s=0.01), record=True, authorized_families=("gpu3",)
    ) as local:
        sim = local.server
        r = http(sim, "POST", "/instance", body=create_body(sim, "g", "gpu3.small"))  # ch-gva-2
        assert r.status_code == 400
        assert r.json()["message"] == "instance type gpu3.small is not available in zone ch-gva-2 (offered in de-fra-1)"
        assert (
            http(sim, "POST", "/instance", zone="de-fra-1", body=create_body(sim, "g", "gpu3.small")).status_code == 200
        )
        assert_spec_valid(local.app)


# ------------------------------------------------------------------------------------------ zones


def test_every_zone_at_the_endpoint_list_zones_gives(sim, driver):
    zones = {z["name"]: z["api-endpoint"] for z in http(sim, "GET", "/zone").json()["zones"]}
    assert zones == {z: f"http://{sim.host}:{sim.port}/{z}/v2" for z in ALL_ZONES}
    vienna = driver.ex_zone_driver("at-vie-2")
    assert (vienna.zone, vienna.api_path) == ("at-vie-2", "/at-vie-2/v2")
    assert driver.ex_zone_driver("ch-gva-2") is driver
    key = driver.import_key_pair_from_string(
        "k1", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEx4T9rWfyvyDnXcx2ZpUGJ6ck9xeSBzw1xP9tBMwdl1 t"
    )
    node = vienna.create_node("v1", "standard.micro", UBUNTU, ex_ssh_keys=[key.name])  # keys are the organization's
    assert [n.name for n in vienna.list_nodes()] == ["v1"]
    assert driver.list_nodes() == []  # instances are the zone's own
    assert http(sim, "GET", f"/instance/{node.id}").status_code == 404
    assert http(sim, "GET", f"/instance/{node.id}", zone="at-vie-2").json()["name"] == "v1"
    assert {e.zone for e in sim.app.exchanges} >= {"ch-gva-2", "at-vie-2"}
    with pytest.raises(ValueError, match="unknown Exoscale zone 'mars-1'"):
        driver.ex_zone_driver("mars-1")
    assert_spec_valid(sim.app)


def test_model_views_share_the_organization_not_the_instances():
    model = Model(faults=Faults(op_delay_s=0))
    vienna = model.in_zone("at-vie-1")
    tmpl = next(t.id for t in model.list_templates() if t.name == UBUNTU)
    micro = next(t.id for t in model.list_instance_types() if t.name == "standard.micro")
    vienna.create_instance("v", micro, tmpl, 10)
    assert [i.zone for i in vienna.list_instances()] == ["at-vie-1"] and model.list_instances() == []
    assert model.quota_usage("instance") == 1  # quotas count every zone
    with pytest.raises(ValueError, match="unknown zone"):
        model.in_zone("xx-yyy-1")


# --------------------------------------------------------------------------------------- capacity


def test_no_capacity_answered_as_an_error_the_driver_names(sim, driver):
    sim.app.model.faults.capacity["standard.small@ch-gva-2"] = 1
    driver.create_node("a", "standard.small", UBUNTU)
    r = http(sim, "POST", "/instance", body=create_body(sim, "b", "standard.small"))
    assert r.status_code == 500
    assert r.json()["message"].startswith("Insufficient capacity: zone ch-gva-2 cannot provide 1 more standard.small")
    with pytest.raises(ExoscaleCapacityError, match="Insufficient capacity") as e:
        driver.create_node("b", "standard.small", UBUNTU)
    assert e.value.code == 500
    assert [n.name for n in driver.list_nodes()] == ["a"]  # nothing half-made
    driver.create_node("c", "standard.medium", UBUNTU)  # other types have room
    driver.ex_zone_driver("de-fra-1").create_node("b", "standard.small", UBUNTU)  # other zones too
    del sim.app.model.faults.capacity["standard.small@ch-gva-2"]
    driver.create_node("b", "standard.small", UBUNTU)


def test_a_pool_grows_only_within_capacity(sim, driver):
    sim.app.model.faults.capacity["standard.micro@ch-gva-2"] = 2
    with pytest.raises(ExoscaleCapacityError):
        driver.ex_create_instance_pool("p3", "standard.micro", UBUNTU, 3)
    assert driver.ex_list_instance_pools() == []
    pool = driver.ex_create_instance_pool("p", "standard.micro", UBUNTU, 2)
    with pytest.raises(ExoscaleCapacityError, match="cannot provide 1 more standard.micro"):
        driver.ex_scale_instance_pool(pool, 3)
    assert driver.ex_get_instance_pool(pool.id).size == 2 and len(driver.list_nodes()) == 2
    sim.app.model.quotas["instance"] = 2
    sim.app.model.faults.capacity.clear()
    with pytest.raises(ExoscaleQuotaError):
        driver.ex_scale_instance_pool(pool, 3)
    assert driver.ex_scale_instance_pool(pool, 1).size == 1


def test_capacity_is_checked_at_construction():
    with pytest.raises(ValueError, match="not offered in ch-gva-2, only in de-fra-1"):
        Faults(capacity={"gpu3.small@ch-gva-2": 0})
    with pytest.raises(ValueError, match="unknown instance type 'gpu3.tiny'"):
        Faults(capacity={"gpu3.tiny@de-fra-1": 0})
    with pytest.raises(ValueError, match="expected TYPE@ZONE"):
        Faults(capacity={"gpu3.small": 0})
    with pytest.raises(ValueError, match=">= 0"):
        Faults(capacity={"gpu3.small@de-fra-1": -1})
    with pytest.raises(ValueError, match="expected one of request, operation"):
        Faults(capacity_answer="later")


def test_sim_cli_refuses_bad_capacity_and_quota_in_one_line():
    for args, expected in (
        (["--capacity", "gpu3.small@ch-gva-2=0"], "gpu3.small is not offered in ch-gva-2, only in de-fra-1"),
        (["--capacity", "standard.small@de-fra-1=many"], "expected KEY=N with N a whole number"),
        (["--quota", "cpus=4"], "unknown resource 'cpus'; valid: instance, gpu,"),
        (["--quota", "instance=-2"], "-1 for unlimited"),
    ):
        r = run_cli("-m", "cloud.sim", "api", "--port", "0", *args, timeout=60)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------- quotas


def test_quotas_through_exoscales_sdk():
    with local_exoscale(0.01, seed=None, quotas={"instance": 1}) as local:
        c = client(SIM_KEY, SIM_SECRET, local.endpoint)
        quotas = {q["resource"]: q for q in c.list_quotas()["quotas"]}
        assert quotas["instance"] == {"resource": "instance", "usage": 0, "limit": 1}
        assert quotas["gpu3"]["limit"] == -1  # unlimited unless set
        sim = local.server
        assert c.create_instance(**{k.replace("-", "_"): v for k, v in create_body(sim, "a", "standard.micro").items()})
        assert c.get_quota(entity="instance") == {"resource": "instance", "usage": 1, "limit": 1}
        errors = exceptions()
        with pytest.raises(errors.ExoscaleAPIAuthException, match="403") as e:
            c.create_instance(**{k.replace("-", "_"): v for k, v in create_body(sim, "b", "standard.micro").items()})
        assert "Quota exceeded for resource instance: limit 1, in use 1" in str(e.value)
        with pytest.raises(errors.ExoscaleAPIClientException, match="404"):
            c.get_quota(entity="no-such-resource")
        other_zone = client(SIM_KEY, SIM_SECRET, f"http://{sim.host}:{sim.port}/de-fra-1/v2")
        assert other_zone.get_quota(entity="instance")["usage"] == 1  # the organization's, in every zone
        assert_spec_valid(local.app)


def test_quota_refusal_is_an_error_the_driver_names(sim, driver):
    sim.app.model.quotas["instance"] = 1
    driver.create_node("a", "standard.micro", UBUNTU)
    other = driver.ex_zone_driver("at-vie-1")
    with pytest.raises(ExoscaleQuotaError, match="Quota exceeded for resource instance") as e:
        other.create_node("b", "standard.micro", UBUNTU)
    assert e.value.code == 403
    assert {q.resource: (q.usage, q.limit) for q in driver.ex_list_quotas()}["instance"] == (1, 1)
    assert driver.ex_get_quota("instance").usage == 1 and not driver.ex_get_quota("instance").unlimited


def test_gpu_quotas_count_gpus_of_the_family():
    with start(
        SIM_KEY, SIM_SECRET, faults=Faults(op_delay_s=0.01), quotas={"gpu3": 2}, authorized_families=("gpu3",)
    ) as local:
        fra = ExoscaleV2NodeDriver(
            SIM_KEY, SIM_SECRET, host=local.server.host, port=local.server.port, secure=False,
            retry=RetryPolicy(attempts=2, base_s=0.01),
        ).ex_zone_driver("de-fra-1")  # fmt: skip
        fra.create_node("g2", "gpu3.medium", UBUNTU)  # 2 GPUs
        with pytest.raises(ExoscaleQuotaError, match="resource gpu3: limit 2, in use 2, requested 1 more"):
            fra.create_node("g1", "gpu3.small", UBUNTU)
        assert (fra.ex_get_quota("gpu").usage, fra.ex_get_quota("gpu3").usage) == (2, 2)


def test_instance_types_of_the_driver(driver):
    types = {t.name: t for t in driver.ex_list_instance_types()}
    g = types["gpu3.small"]
    assert (g.cpus, g.memory, g.gpus, g.zones, g.authorized, g.family) == (
        12,
        56 * 1024**3,
        1,
        ("de-fra-1",),
        False,
        "gpu3",
    )
    assert types["standard.medium"].zones == ALL_ZONES and types["standard.medium"].gpus == 0
    assert len(types) == len(INSTANCE_TYPES)


def test_unsigned_zone_path_is_still_refused(sim):
    r = requests.get(f"http://{sim.host}:{sim.port}/de-fra-1/v2/instance", timeout=10)
    assert r.status_code == 403
    r = requests.get(f"http://{sim.host}:{sim.port}/de-fra-1/v2/zone", timeout=10)  # public, as list-zones is
    assert r.status_code == 200


def test_model_error_kinds_for_capacity_and_quota():
    model = Model(faults=Faults(op_delay_s=0, capacity={"standard.micro@ch-gva-2": 0}), quotas={"instance": 0})
    tmpl = next(t.id for t in model.list_templates() if t.name == UBUNTU)
    micro = next(t for t in model.list_instance_types() if t.name == "standard.micro")
    with pytest.raises(ModelError) as e:
        model.create_instance(f"x{uuid.uuid4().hex[:6]}", micro.id, tmpl, 10)
    assert e.value.kind == "capacity"
    with pytest.raises(ModelError) as e:
        model.in_zone("at-vie-1").create_instance("y", micro.id, tmpl, 10)
    assert e.value.kind == "quota"


def test_sim_cli_capacity_and_quota_apply(tmp_path):
    """`python -m cloud.sim api --capacity ... --quota ...`, as a user starts it, answers creates accordingly."""
    env_file = tmp_path / "sim.env"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud.sim", "api", "--port", "0", "--op-delay", "0", "--env-file", str(env_file),
         "--capacity", "standard.small@ch-gva-2=0", "--capacity", "standard.small@at-vie-2=1", "--quota", "instance=2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (env_file.exists() and env_file.read_text().count("export ") == 3):
            assert proc.poll() is None, f"the sim exited: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"the sim wrote no env file {env_file} within 60 s"
            time.sleep(0.1)
        exports = dict(line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines() if line)
        url = urlsplit(exports["EXOSCALE_API_ENDPOINT"])
        d = ExoscaleV2NodeDriver(
            exports["EXOSCALE_API_KEY"], exports["EXOSCALE_API_SECRET"], host=url.hostname, port=url.port, secure=False
        )
        with pytest.raises(ExoscaleCapacityError):
            d.create_node("a", "standard.small", UBUNTU)
        vienna = d.ex_zone_driver("at-vie-2")
        vienna.create_node("a", "standard.small", UBUNTU)
        with pytest.raises(ExoscaleCapacityError):
            vienna.create_node("b", "standard.small", UBUNTU)
        d.create_node("b", "standard.micro", UBUNTU)
        with pytest.raises(ExoscaleQuotaError):
            d.create_node("c", "standard.micro", UBUNTU)
        assert d.ex_get_quota("instance") == ExoscaleQuota("instance", 2, 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read()


def test_an_iam_refusal_naming_quotas_is_not_a_quota_refusal(sim):
    """A restricted key refused get-quota by its role is a credentials error, not "quota exceeded" (the
    refusal names the operation get-quota and the service quotas)."""
    role = sim.app.model.iam.create_role("no-quotas", {"default-service-strategy": "deny", "services": {}})
    key = sim.app.model.iam.create_api_key("k", role.id)
    limited = ExoscaleV2NodeDriver(key.key, key.secret, host=sim.host, port=sim.port, secure=False)
    with pytest.raises(InvalidCredsError, match="does not allow get-quota"):
        limited.ex_get_quota("instance")


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (403, "Quota exceeded for resource instance: limit 1, in use 1, requested 1 more", ExoscaleQuotaError),
        (422, "instance limit reached", ExoscaleQuotaError),
        (400, "this would exceed your GPU quota", ExoscaleQuotaError),
        (500, "Insufficient capacity: zone de-fra-1 cannot provide 1 more gpu3.small", ExoscaleCapacityError),
        (409, "no GPU capacity left in this zone", ExoscaleCapacityError),
        (500, "capacity exhausted for gpu3", ExoscaleCapacityError),
        (403, "Forbidden: the IAM role of API key EXOx does not allow get-quota (service quotas)", None),
        (400, "capacity must be a number", None),
        (503, "no capacity", None),  # 503 is retried as a transient refusal, never a zone's answer
    ],
)
def test_which_refusals_the_driver_reads_as_quota_or_capacity(status, message, kind):
    from cloud.exoscale_driver import ExoscaleAPIError, _api_error

    error = _api_error(status, message)
    assert type(error) is (kind or ExoscaleAPIError)
