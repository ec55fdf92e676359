"""What a cluster costs (cloud.cost, `exoscale.py status`): each instance's type and its API creation time,
priced by cloud.pricing; against the in-process local Exoscale (no hosts: the instances' addresses answer
nobody, which status survives)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import yaml

from cloud import config, cost, provision
from cloud.config import ConfigError
from cloud.pricing import PRICES, VOLUME_GB_HOUR, PriceTable
from tests.conftest import SIM_KEY, SIM_SECRET, ClusterCLI, run_cli
from tests.support import left_of, make_cluster


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def _age(sim, node_id: str, seconds: float) -> str:
    """Make the local Exoscale say the instance was created `seconds` ago; its created-at as given."""
    at = (datetime.now(timezone.utc) - timedelta(seconds=seconds)).replace(microsecond=0)
    text = at.isoformat().replace("+00:00", "Z")
    sim.app.model.instances[node_id].created_at = text
    return text


def test_the_api_gives_created_at_as_the_spec_says(sim, driver):
    """Exoscale's OpenAPI spec: instance.created-at is a date-time string; the driver keeps it as given."""
    name = unique("c")
    [head] = make_cluster(driver, name, 1)
    [node] = [n for n in driver.list_nodes() if n.id == head.id]
    created = cost.parse_time(node.created_at)
    assert created is not None, node.created_at
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60, node.created_at
    assert node.extra["instance_type"] == "standard.micro" and node.extra["disk_size"] == 50


def test_node_costs_from_types_and_creation_times(sim, driver):
    name = unique("c")
    nodes = make_cluster(driver, name, 2)
    _age(sim, nodes[0].id, 3600)
    _age(sim, nodes[1].id, 1800)
    listed = provision.query_instances(driver, name)
    now = datetime.now(timezone.utc)
    types = cost.type_names(listed, driver.ex_list_instance_types)
    c = cost.node_costs(listed, types, PriceTable(), now=now)
    rate = PRICES["standard.micro"] + VOLUME_GB_HOUR * 50
    assert [n.rate for n in c.nodes] == [rate, rate]
    assert c.hourly == 2 * rate and not c.unknown
    expected = sum(rate * Decimal(round(n.uptime_s)) / 3600 for n in c.nodes)
    assert abs(c.total - expected) < Decimal("0.00001"), (c.total, expected)
    assert sorted(round(n.uptime_s or 0) for n in c.nodes)[-1] in range(3600, 3603)

    # a type the table lacks: price unknown, left out of the total and named, never a guess
    c = cost.node_costs(listed, types, PriceTable(rates={}), now=now)
    assert [n.rate for n in c.nodes] == [None, None] and c.total == 0 and c.unknown == ("standard.micro",)
    assert "price unknown" in c.summary()


def test_types_given_by_id_alone_are_named_from_one_listing_then_from_the_cache(sim, driver, tmp_path):
    """Exoscale's list-instances may reference the type by id only: one listing of the types names them, kept
    in a file of the toolkit's, so later statuses make no more calls than before; a file of that name the
    toolkit did not make is left alone."""
    name = unique("c")
    make_cluster(driver, name, 2)
    listed = provision.query_instances(driver, name)
    for n in listed:
        n.extra["instance_type"] = None
    calls = []

    def listing():
        calls.append(1)
        return driver.ex_list_instance_types()

    cache = tmp_path / cost.TYPES_CACHE
    assert set(cost.type_names(listed, listing, cache).values()) == {"standard.micro"} and calls == [1]
    assert set(cost.type_names(listed, listing, cache).values()) == {"standard.micro"} and calls == [1]
    assert oct(cache.stat().st_mode)[-3:] == "600"
    theirs = tmp_path / "other" / cost.TYPES_CACHE
    theirs.parent.mkdir()
    theirs.write_text("{}")
    assert set(cost.type_names(listed, listing, theirs).values()) == {"standard.micro"} and calls == [1, 1]
    assert theirs.read_text() == "{}"


def test_status_shows_each_nodes_type_rate_uptime_and_the_cost(sim, driver, tmp_path):
    name = unique("s")
    nodes = make_cluster(driver, name, 2)
    _age(sim, nodes[0].id, 2 * 3600 + 60)
    cli = ClusterCLI(sim, tmp_path / "state", name)
    r = cli("status", timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"TYPE\s+RATE\s+UPTIME\s+COST", out), out
    head = next(line for line in out.splitlines() if f"{name}-head " in line)
    assert "standard.micro" in head and "0.01429 EUR/h" in head and "2h01m" in head, out
    # 2 h 1 min at 0.00729 + 50 GB x 0.00014 per hour = 0.01429/h: 0.0290 EUR; the worker a few seconds
    assert re.search(r"cost: 0\.03 EUR so far, 0\.03 EUR/h", out), out


# ----------------------------------------------------------- cluster.toml: [prices] and max_hourly_rate

ENV = {"EXOSCALE_API_KEY": "EXOk", "EXOSCALE_API_SECRET": "s3cret"}


def _load(tmp_path, toml: str, **kw):
    f = tmp_path / "cluster.toml"
    f.write_text(toml)
    return config.load(f, env=ENV, **kw)


def test_price_overrides_quoted_or_dotted_and_a_warning_for_an_unknown_type(tmp_path):
    c = _load(tmp_path, '[prices]\n"standard.medium" = 0.05\ngpu3.small = 1.5\n"gpu9.tiny" = 3\n')
    p = c.cost.prices
    assert (p.rate("standard.medium"), p.rate("gpu3.small"), p.rate("gpu9.tiny")) == (
        Decimal("0.05"),
        Decimal("1.5"),
        Decimal("3"),
    )
    assert p.rate("standard.large") == PRICES["standard.large"]
    [warning] = c.cost.warnings
    assert "prices.gpu9.tiny" in warning and "not an instance type" in warning


@pytest.mark.parametrize(
    "toml, match",
    [
        ("max_hourly_rate = 0", "max_hourly_rate 0: a number > 0"),
        ("max_hourly_rate = -1.5", "a number > 0"),
        ('max_hourly_rate = "lots"', "a number > 0"),
        ("max_hourly_rate = true", "a number > 0"),
        ("max_hourly_rate = nan", "a number > 0"),
        # standard.medium with its 50 GB disk costs 0.05366/h
        ("max_hourly_rate = 0.05", "below one node: standard.medium with a 50 GB disk costs 0.05366 EUR/h"),
        ('instance_type = "gpu9.tiny"\nmax_hourly_rate = 5', "the price of gpu9.tiny is unknown"),
        ('prices = "cheap"', "prices must be a table"),
        ('[prices]\n"standard.medium" = -1', "an hourly rate is a number >= 0"),
    ],
)
def test_bad_cost_settings_one_line(tmp_path, toml, match):
    with pytest.raises(ConfigError, match=match) as ei:
        _load(tmp_path, toml + "\n")
    assert "\n" not in str(ei.value)


def test_up_over_the_hourly_cap_is_refused_before_anything_is_made(sim, driver, tmp_path):
    name = unique("r")
    toml = tmp_path / "cluster.toml"
    toml.write_text('instance_type = "standard.micro"\nmax_hourly_rate = 0.03\n')  # 0.01429/h a node: 2 fit
    cli = ClusterCLI(sim, tmp_path / "state", name)
    r = cli("--config", str(toml), "up", "-n", "3", timeout=60)
    assert r.returncode == 2, r.stderr
    [line] = [line for line in r.stderr.splitlines() if not line.startswith("warning: SSH")]
    assert "3 node(s) of standard.micro would cost 0.04287 EUR/h" in line and "at most 2 node(s)" in line, line
    assert left_of(driver, name) == ([], [], []) and not (tmp_path / "state" / name).exists()


def test_the_autoscalers_max_workers_is_capped_in_the_yaml(sim, tmp_path):
    from cloud.sim.local import client_env

    toml = tmp_path / "cluster.toml"
    # a head and workers of standard.small (0.03033/h with 50 GB) and two gpu3.small at most (4.27366/h)
    toml.write_text('instance_type = "standard.small"\nmax_hourly_rate = 4.5\n')
    cli_env = client_env(sim.endpoint, SIM_KEY, SIM_SECRET, tmp_path / "state")
    args = ["--max-workers", "20", "--worker-type", "gpu=gpu3.small,max=2"]
    r = run_cli("exoscale.py", "--config", str(toml), "--name", "rc", "ray-config", *args, env=cli_env)
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    # 4.5 - 0.03033 (head) - 4.27366 (gpus) = 0.19601 of room: 6 workers of 0.03033
    assert doc["available_node_types"]["ray.worker.default"]["max_workers"] == 6, doc["available_node_types"]
    [said] = [line for line in r.stderr.splitlines() if "max_hourly_rate" in line]
    assert "max_workers 20 -> 6" in said, r.stderr
    r = run_cli(
        "exoscale.py", "--config", str(toml), "--name", "rc", "ray-config", "--min-workers", "7", *args, env=cli_env
    )
    assert r.returncode == 2 and "--min-workers 7: only 6 worker(s)" in r.stderr, r.stderr


# ------------------------------------------------------------------------------- cost-report (history)


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_cost_report_lists_ended_and_running_clusters_and_survives_down(sim, driver, tmp_path):
    state = tmp_path / "state"
    ended, running = unique("e"), unique("r")
    toml = tmp_path / "cluster.toml"
    toml.write_text('instance_type = "standard.micro"\nssh_cidr = "10.0.0.0/8"\n')
    a = ClusterCLI(sim, state, ended)
    r = a("--config", str(toml), "up", "-n", "2", "--timeout", "2", timeout=120)  # nobody answers SSH: exit 1
    assert r.returncode == 1 and "not ready" in r.stderr, r.stderr
    for n in provision.query_instances(driver, ended):
        _age(sim, n.id, 3600)
    assert a("--config", str(toml), "status", timeout=120).returncode == 0
    r = a("--config", str(toml), "down", "--yes", timeout=120)
    assert r.returncode == 0 and left_of(driver, ended) == ([], [], []), r.stderr
    assert not (state / ended).exists()  # the cluster's own state went; its history stays

    [n] = make_cluster(driver, running, 1)
    _age(sim, n.id, 3 * 3600)
    b = ClusterCLI(sim, state, running)
    assert b("status", timeout=120).returncode == 0

    r = a("cost-report")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    # two standard.micro with 50 GB disks (0.01429/h each) for an hour (and the seconds of the test)
    assert re.search(r"\b2\s.*\b1h0\dm\s+0\.03 EUR$", rows[ended]), r.stdout
    assert "last seen" not in rows[ended], r.stdout
    # make_cluster's standard.micro, 0.01429/h for 3 hours; not ended by down
    assert "last seen" in rows[running] and re.search(r"\b3h00m\s+0\.04 EUR$", rows[running]), r.stdout
    assert "total: 0.07 EUR" in r.stdout, r.stdout
    history = (state / "cost-history.jsonl").read_text().splitlines()
    assert (
        history[0] == '{"raysweep-cost-history": 1}'
        and oct((state / "cost-history.jsonl").stat().st_mode)[-3:] == "600"
    )
    assert SIM_SECRET not in "".join(history)


def test_a_history_file_raysweep_did_not_make_is_left_alone(sim, driver, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    theirs = state / "cost-history.jsonl"
    theirs.write_text("my own notes\n")
    name = unique("n")
    make_cluster(driver, name, 1)
    cli = ClusterCLI(sim, state, name)
    assert cli("status", timeout=120).returncode == 0
    assert theirs.read_text() == "my own notes\n"
    r = cli("cost-report")
    assert r.returncode == 0 and "no clusters made from this machine yet" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------------------ zones tried in order


def _zone_toml(tmp_path, zones):
    f = tmp_path / "cluster.toml"
    f.write_text(f'instance_type = "standard.micro"\nssh_cidr = "10.0.0.0/8"\nzones = {json.dumps(zones)}\n')
    return f


def _in_zone(driver, zone, name):
    return sorted(n.name for n in provision.query_instances(driver.ex_zone_driver(zone), name))


@pytest.mark.slow  # over 15 s: in make test, not in the edit loop
def test_up_moves_to_the_next_zone_when_the_first_has_no_capacity(sim, driver, tmp_path):
    name = unique("z")
    sim.app.model.faults.capacity = {"standard.micro@ch-gva-2": 0}
    toml = _zone_toml(tmp_path, ["ch-gva-2", "de-fra-1"])
    cli = ClusterCLI(sim, tmp_path / "state", name)
    r = cli("--config", str(toml), "up", "-n", "2", "--timeout", "2", timeout=120)  # nobody answers SSH: exit 1
    assert r.returncode == 1 and "not ready" in r.stderr, r.stderr
    assert "ch-gva-2: no capacity" in r.stderr and f"{name}: lives in de-fra-1" in r.stderr, r.stderr
    assert _in_zone(driver, "de-fra-1", name) == [f"{name}-head", f"{name}-worker-1"]
    assert _in_zone(driver, "ch-gva-2", name) == []
    # it lives there now: a second up completes it there even with room in the first zone again
    sim.app.model.faults.capacity = {}
    r = cli("--config", str(toml), "up", "-n", "3", "--timeout", "2", timeout=120)
    assert _in_zone(driver, "de-fra-1", name) == [f"{name}-head", f"{name}-worker-1", f"{name}-worker-2"], r.stderr
    assert _in_zone(driver, "ch-gva-2", name) == []
    r = cli("--config", str(toml), "status", timeout=120)
    assert r.returncode == 0 and f"{name}-worker-2" in r.stdout, r.stdout + r.stderr
    (tmp_path / "state" / name / "zone").unlink()  # the local record lost: down finds the zone through the API
    r = cli("--config", str(toml), "down", "--yes", timeout=120)
    assert r.returncode == 0, r.stderr
    assert _in_zone(driver, "de-fra-1", name) == [] and left_of(driver, name) == ([], [], [])


def test_all_zones_out_is_one_line_naming_each_and_nothing_is_left(sim, driver, tmp_path):
    name = unique("o")
    sim.app.model.faults.capacity = {"standard.micro@ch-gva-2": 0, "standard.micro@de-fra-1": 0}
    toml = _zone_toml(tmp_path, ["ch-gva-2", "de-fra-1"])
    r = ClusterCLI(sim, tmp_path / "state", name)("--config", str(toml), "up", "-n", "2", timeout=120)
    assert r.returncode == 2, r.stderr
    [line] = [l for l in r.stderr.splitlines() if "error:" in l]
    assert f"no zone could make {name}-head: ch-gva-2: no capacity" in line and "; de-fra-1: no capacity" in line
    assert line.endswith("nothing is left behind"), line
    assert left_of(driver, name) == ([], [], []) and _in_zone(driver, "de-fra-1", name) == []


@pytest.mark.parametrize(
    "toml, match",
    [
        ('zones = ["de-fra-1", "mars-1"]', "zones: 'mars-1' is not an Exoscale zone; valid: at-vie-1"),
        ('zones = ["de-fra-1", "de-fra-1"]', "de-fra-1 named more than once"),
        ('zones = "de-fra-1"', "zones must be a list"),
        ('zone = "at-vie-2"\nzones = ["de-fra-1", "at-vie-2"]', "leave zone out"),
    ],
)
def test_bad_zones_one_line(tmp_path, toml, match):
    with pytest.raises(ConfigError, match=match) as ei:
        _load(tmp_path, toml + "\n")
    assert "\n" not in str(ei.value)


def test_a_sweeps_node_prices_come_from_one_listing_of_the_cluster(sim, driver, tmp_path):
    """What pipeline.cli_common prices a cluster sweep's trials with (cloud.connect.node_prices): each instance's
    address, type and rate with its disk, cluster.toml's [prices] applied."""
    from cloud.connect import node_prices
    from cloud.sim.local import client_env

    name = unique("p")
    nodes = make_cluster(driver, name, 2)
    cfg = config.load(env=client_env(sim.endpoint, SIM_KEY, SIM_SECRET), name=name).with_state_root(tmp_path)
    cfg = replace(cfg, cost=replace(cfg.cost, prices=cfg.cost.prices.with_overrides({"standard.micro": 0.01})[0]))
    got = node_prices(cfg)
    assert got.currency == "EUR" and "[prices]" in got.source
    assert got.nodes == {n.public_ips[0]: ("standard.micro", pytest.approx(0.01 + 0.00014 * 50)) for n in nodes}


def test_the_node_provider_creates_in_the_next_zone_and_stays_there(sim, driver, sim_env):
    from ray.autoscaler._private.providers import _get_node_provider
    from ray.autoscaler.node_launch_exception import NodeLaunchException
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

    from cloud import ray_config
    from cloud.ray_provider import ExoscaleNodeProvider
    from cloud.sim.local import client_env
    from tests.support import FAST_RETRY

    def bootstrapped(name):
        cfg = config.load(
            None, env=client_env(sim.endpoint, SIM_KEY, SIM_SECRET), name=name, zones=["ch-gva-2", "de-fra-1"]
        )
        raw = ray_config.build(cfg, 0, 3, 0.1)
        raw["provider"]["retry"] = FAST_RETRY
        conf = ExoscaleNodeProvider.bootstrap_config(raw)
        return conf, conf["available_node_types"][ray_config.WORKER_TYPE]["node_config"]

    name = unique("np")
    conf, node_config = bootstrapped(name)
    assert conf["provider"]["zones"] == ["ch-gva-2", "de-fra-1"]
    sim.app.model.faults.capacity = {"standard.medium@ch-gva-2": 0}
    p = _get_node_provider(conf["provider"], name, use_cache=False)
    p.create_node(node_config, {TAG_RAY_NODE_KIND: "head"}, 1)
    assert _in_zone(driver, "de-fra-1", name) == [f"{name}-head"] and _in_zone(driver, "ch-gva-2", name) == []
    # a fresh provider (the autoscaler on the head) finds where the cluster lives, and stays there
    sim.app.model.faults.capacity = {}
    p2 = _get_node_provider(conf["provider"], name, use_cache=False)
    assert len(p2.non_terminated_nodes({})) == 1
    p2.create_node(node_config, {TAG_RAY_NODE_KIND: "worker", TAG_RAY_USER_NODE_TYPE: ray_config.WORKER_TYPE}, 2)
    assert len(_in_zone(driver, "de-fra-1", name)) == 3 and _in_zone(driver, "ch-gva-2", name) == []
    assert [p.name for p in driver.ex_zone_driver("de-fra-1").ex_list_instance_pools()], "the workers' pool"
    assert [p for p in driver.ex_list_instance_pools() if name in p.name] == []

    # a new cluster with every zone out: the launch fails naming each zone's answer, nothing made
    other = unique("nq")
    conf, node_config = bootstrapped(other)
    sim.app.model.faults.capacity = {"standard.medium@ch-gva-2": 0, "standard.medium@de-fra-1": 0}
    p3 = _get_node_provider(conf["provider"], other, use_cache=False)
    with pytest.raises(NodeLaunchException) as ei:
        p3.create_node(node_config, {TAG_RAY_NODE_KIND: "head"}, 1)
    text = ei.value.description
    assert "ch-gva-2: no capacity" in text and "de-fra-1: no capacity" in text, text
    assert _in_zone(driver, "ch-gva-2", other) == [] and _in_zone(driver, "de-fra-1", other) == []
