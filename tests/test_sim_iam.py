"""IAM of the local Exoscale, driven by Exoscale's own SDK: roles with policies, API keys bound to them (the
secret shown once), the policy enforced on every request signed with such a key, deletion; the CEL rules
(order, invalid expressions skipped, each binding, `source_ip`); and update-instance's label replacement,
and the labels-filter fault."""

from __future__ import annotations

import base64
from datetime import datetime, timezone

import pytest

from cloud.sim.api import SpecValidator
from cloud.sim.iam import Policy, RequestContext, operation_services, request_parameters
from cloud.sim.model import Faults, Model, ModelError
from tests.conftest import SIM_KEY, SIM_SECRET, local_exoscale
from tests.exoscale_sdk import client, exceptions
from tests.support import UBUNTU


@pytest.fixture
def sim_fast():
    """A local Exoscale whose operations finish at once, so the SDK's own wait() polls once."""
    with local_exoscale(0.0, seed=3) as local:
        yield local.server


@pytest.fixture
def owner(sim_fast):
    return client(SIM_KEY, SIM_SECRET, sim_fast.endpoint)


def make_role(c, name, policy):
    op = c.wait(c.create_iam_role(name=name, policy=policy)["id"])
    return op["reference"]["id"]


def restricted(c, sim, role_id, name="k"):
    key = c.create_api_key(name=name, role_id=role_id)
    return key, client(key["key"], key["secret"], sim.endpoint)


COMPUTE_ONLY = {
    "default-service-strategy": "deny",
    "services": {
        "compute": {
            "type": "rules",
            "rules": [
                {"action": "deny", "expression": "operation == 'delete-instance'"},
                {"action": "allow", "expression": "operation in ['list-instances', 'get-instance', 'list-templates']"},
            ],
        },
        "general": {"type": "allow"},
    },
}


def test_role_and_key_lifecycle(owner, sim_fast):
    role_id = make_role(owner, "cluster-c1", COMPUTE_ONLY)
    role = owner.get_iam_role(id=role_id)
    assert role["name"] == "cluster-c1" and role["policy"] == COMPUTE_ONLY
    assert [r["id"] for r in owner.list_iam_roles()["iam-roles"]] == [role_id]
    key, _ = restricted(owner, sim_fast, role_id)
    assert key["secret"] and key["role-id"] == role_id and key["key"].startswith("EXO")
    listed = owner.list_api_keys()["api-keys"]
    assert listed == [{"key": key["key"], "name": "k", "role-id": role_id}]  # the secret is shown once only
    assert "secret" not in owner.get_api_key(id=key["key"])
    with pytest.raises(exceptions().ExoscaleAPIClientException, match="409"):
        owner.delete_iam_role(id=role_id)  # still used by a key
    owner.wait(owner.delete_api_key(id=key["key"])["id"])
    owner.wait(owner.delete_iam_role(id=role_id)["id"])
    assert owner.list_iam_roles()["iam-roles"] == [] and owner.list_api_keys()["api-keys"] == []
    validator = SpecValidator.shared()
    for x in sim_fast.app.exchanges:  # every answer as the spec describes it
        if x.status == 200:
            validator.validate_response(x.method, x.path, x.query, x.body, x.status, x.response)


def test_policy_enforced_on_every_request_of_a_restricted_key(owner, sim_fast):
    sg = owner.wait(owner.create_security_group(name="g")["id"])["reference"]["id"]
    role_id = make_role(owner, "r", COMPUTE_ONLY)
    key, limited = restricted(owner, sim_fast, role_id)
    assert limited.list_instances() == {"instances": []}  # allowed by a rule
    assert limited.list_zones()["zones"]  # unsigned, as the SDK sends it
    Auth = exceptions().ExoscaleAPIAuthException
    for call in (
        lambda: limited.list_security_groups(),  # compute, but no rule allows it
        lambda: limited.delete_security_group(id=sg),  # compute, no rule
        lambda: limited.list_api_keys(),  # iam: not named, default deny
        lambda: limited.create_iam_role(name="escalate", policy={"default-service-strategy": "allow", "services": {}}),
    ):
        with pytest.raises(Auth, match="403.*does not allow"):
            call()
    assert owner.get_security_group(id=sg)["name"] == "g"  # nothing happened
    owner.wait(owner.delete_api_key(id=key["key"])["id"])
    with pytest.raises(Auth, match="unknown API key"):
        limited.list_instances()  # a deleted key stops working


def test_default_allow_with_a_denied_service(owner, sim_fast):
    role_id = make_role(owner, "no-iam", {"default-service-strategy": "allow", "services": {"iam": {"type": "deny"}}})
    _, limited = restricted(owner, sim_fast, role_id)
    assert limited.list_security_groups() == {"security-groups": []}
    with pytest.raises(exceptions().ExoscaleAPIAuthException):
        limited.create_api_key(name="more", role_id=role_id)


def deny_all_but(service: str, *rules: tuple[str, str], strategy: str = "deny") -> dict:
    """A policy whose `service` has these (action, expression) rules and whose `general` service (get-operation,
    for the SDK's wait) is allowed."""
    return {
        "default-service-strategy": strategy,
        "services": {
            service: {"type": "rules", "rules": [{"action": a, "expression": e} for a, e in rules]},
            "general": {"type": "allow"},
        },
    }


def test_invalid_expressions_are_skipped_and_no_decision_refuses(owner, sim_fast):
    """Exoscale's guide: an invalid expression concludes nothing, the next rule is evaluated; when no rule
    decides, the request is refused whatever the default strategy."""
    policy = deny_all_but(
        "compute",
        ("allow", "operation =="),  # does not parse
        ("deny", "parameters.no_such_field == 'x'"),  # fails to evaluate: skipped, even as a deny
        ("allow", "1 + 1"),  # not a boolean
        ("allow", "operation in ['a', b]"),  # an undeclared name
        ("allow", "operation == 'list-instances'"),
        strategy="allow",
    )
    _, limited = restricted(owner, sim_fast, make_role(owner, "skips", policy))
    assert limited.list_instances() == {"instances": []}  # the first valid rule decided
    with pytest.raises(exceptions().ExoscaleAPIAuthException, match="403.*list-security-groups"):
        limited.list_security_groups()  # no rule decided: refused although the default strategy is allow
    assert limited.list_iam_roles()["iam-roles"]  # a service the policy does not name: the default, allow


def test_source_ip_conditions(owner, sim_fast):
    """The sim's clients here come from 127.0.0.1: a rule on another address refuses them."""
    here = deny_all_but("compute", ("allow", "source_ip == '127.0.0.1' && operation == 'list-instances'"))
    elsewhere = deny_all_but("compute", ("allow", "source_ip == '192.0.2.10'"))
    in_range = deny_all_but("compute", ("allow", "source_ip.inIpRange('127.0.0.0/8')"))
    _, from_here = restricted(owner, sim_fast, make_role(owner, "here", here), "k1")
    _, from_elsewhere = restricted(owner, sim_fast, make_role(owner, "elsewhere", elsewhere), "k2")
    _, from_range = restricted(owner, sim_fast, make_role(owner, "range", in_range), "k3")
    assert from_here.list_instances() == {"instances": []}
    assert from_range.list_instances() == {"instances": []}
    with pytest.raises(exceptions().ExoscaleAPIAuthException, match="403"):
        from_elsewhere.list_instances()


def test_operation_only_rules_of_today_still_work():
    request = RequestContext("get-instance", "EXOk", "127.0.0.1", "ch-gva-2")
    allow = Policy.parse(deny_all_but("compute", ("allow", "operation in ['get-instance', 'list-instances']")))
    assert allow.allows(request)
    assert not allow.allows(RequestContext("delete-instance", "EXOk", "127.0.0.1", "ch-gva-2"))
    assert Policy.parse(deny_all_but("compute", ("allow", "operation == 'get-instance'"))).allows(request)


@pytest.mark.parametrize(
    "expression, allowed",
    [
        ("service == 'compute' && zone == 'ch-gva-2'", True),
        ("zone == 'de-fra-1'", False),
        ("api_key == 'EXOk'", True),
        ("timestamp(now) > timestamp('2026-01-01T00:00:00Z')", True),
        ("timestamp(now) < timestamp('2026-01-01T00:00:00Z')", False),
        ("parameters.id == 'p1' && parameters.size <= 3", True),
        ("parameters.size > 3", False),
        ("parameters.public_ip_assignment == 'none'", True),  # sent as public-ip-assignment
        ("parameters.has('size') && !parameters.has('labels')", True),
        ("parameters.instance_type.id == 't1'", True),  # nested names as sent
        ("resource.instance_pool.name == 'workers'", True),
        ("resource.instance.name == 'workers'", False),  # no such resource: invalid, skipped
        ("source_ip.inIpRange('10.0.0.0/8')", True),
        ("source_ip.inIpRange('192.168.0.0/16')", False),
        ("source_ip.inIpRange('not a network')", False),  # an error: skipped
    ],
)
def test_bindings(expression, allowed):
    request = RequestContext(
        "scale-instance-pool",
        "EXOk",
        "10.1.2.3",
        "ch-gva-2",
        request_parameters(
            {"id": "p1"}, {}, {"size": 3, "public-ip-assignment": "none", "instance-type": {"id": "t1"}, "id": "x"}
        ),
        {"instance_pool": {"id": "p1", "name": "workers"}},
        now=datetime(2026, 12, 6, 20, 0, tzinfo=timezone.utc),
    )
    assert request.bindings()["now"] == "2026-12-06T20:00:00Z"
    assert Policy.parse(deny_all_but("compute", ("allow", expression))).allows(request) is allowed


def test_first_deciding_rule_wins_and_rules_with_resources_are_refused():
    request = RequestContext("delete-instance", "EXOk", "127.0.0.1", "ch-gva-2", {"id": "i1"})
    policy = deny_all_but("compute", ("deny", "parameters.id == 'i1'"), ("allow", "true"))
    assert not Policy.parse(policy).allows(request)
    assert Policy.parse(policy).allows(RequestContext("delete-instance", "EXOk", "127.0.0.1", "ch-gva-2", {"id": "i2"}))
    with pytest.raises(ModelError, match="resources are not supported"):
        Policy.parse(
            {"default-service-strategy": "deny", "services": {"compute": {"type": "rules", "rules": [
                {"action": "allow", "expression": "true", "resources": ["x"]}]}}}
        )  # fmt: skip


def test_service_table():
    services = operation_services()
    assert services["create-instance"] == "compute" and services["create-api-key"] == "iam"
    assert services["get-operation"] == "general" and services["list-zones"] == "general"
    assert services["add-rule-to-security-group"] == "compute"
    assert services["scale-instance-pool"] == "compute"


def test_update_instance_replaces_labels_and_renames(owner):
    itype = next(t for t in owner.list_instance_types()["instance-types"] if t["size"] == "micro")
    tmpl = next(t for t in owner.list_templates(visibility="public")["templates"] if t["name"] == UBUNTU)
    op = owner.create_instance(
        name="a",
        instance_type={"id": itype["id"]},
        template={"id": tmpl["id"]},
        disk_size=10,
        labels={"cluster": "c1", "role": "head"},
        user_data=base64.b64encode(b"#cloud-config\n").decode(),
    )
    iid = owner.wait(op["id"])["reference"]["id"]
    owner.wait(owner.update_instance(id=iid, labels={"cluster": "c1", "ray-node-status": "up-to-date"})["id"])
    got = owner.get_instance(id=iid)
    assert got["labels"] == {"cluster": "c1", "ray-node-status": "up-to-date"}  # replaced, not merged
    owner.wait(owner.update_instance(id=iid, name="b")["id"])
    got = owner.get_instance(id=iid)
    assert got["name"] == "b" and got["labels"] == {"cluster": "c1", "ray-node-status": "up-to-date"}
    owner.wait(owner.update_instance(id=iid, labels={})["id"])
    assert owner.get_instance(id=iid)["labels"] == {}


@pytest.mark.parametrize("mode, expected", [("exact", {"a"}), ("ignore", {"a", "b", "c"}), ("any", {"a", "b"})])
def test_labels_filter_fault(mode, expected):
    model = Model(faults=Faults(op_delay_s=0.0, labels_filter=mode))
    itype = next(t.id for t in model.list_instance_types() if t.size == "micro")
    tmpl = next(t.id for t in model.list_templates() if t.name == UBUNTU)
    for name, labels in (("a", {"cluster": "c1", "role": "head"}), ("b", {"cluster": "c1"}), ("c", {"cluster": "c2"})):
        model.create_instance(name, itype, tmpl, 10, labels=labels)
    got = {i.name for i in model.list_instances({"cluster": "c1", "role": "head"})}
    assert got == expected
    with pytest.raises(ValueError, match="labels_filter"):
        Faults(labels_filter="fuzzy")
