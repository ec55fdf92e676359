"""Helpers the test modules share (fixtures live in conftest.py): the suite's constants, waiting with a
bounded timeout, clusters made directly through the driver, and checks of what a test left behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import uuid

import pytest
from ray.autoscaler._private.providers import _get_node_provider
from ray.autoscaler.tags import (
    TAG_RAY_LAUNCH_CONFIG,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from cloud import config, provision, ray_config
from cloud.exoscale_driver import ExoscaleV2NodeDriver
from cloud.names import cluster_labels, resource_name
from cloud.ray_provider import ExoscaleNodeProvider
from cloud.sim.api import SpecValidator
from cloud.sim.local import client_env
from cloud.sim.model import InstanceHooks
from tests.conftest import SIM_KEY, SIM_SECRET, local_exoscale

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEx4T9rWfyvyDnXcx2ZpUGJ6ck9xeSBzw1xP9tBMwdl1 test@host"


UBUNTU = "Linux Ubuntu 24.04 LTS 64-bit"


def assert_all_spec_valid(sim):
    """No request broke the spec (400) or the signature (403); every success matches the spec's schema.
    (Other refusals, such as 409 for a group still in use, are the model's rules, tested where made.)"""
    v = SpecValidator.shared()
    assert sim.app.exchanges
    for e in sim.app.exchanges:
        assert e.status not in (400, 403), f"{e.method} {e.path} -> {e.status} {e.response[:300]!r}"
        if e.status == 200:
            v.validate_response(e.method, e.path, e.query, e.body, e.status, e.response)


def done(c, operation) -> str:
    """Wait with the SDK's own wait(); the id of the resource the operation refers to."""
    result = c.wait(operation["id"], max_wait_time=30)
    assert result["state"] == "success", result
    return result.get("reference", {}).get("id", "")


def api(sim):
    return ExoscaleV2NodeDriver(SIM_KEY, SIM_SECRET, host=sim.host, port=sim.port, secure=False)


def hosts_of(sim, name):
    """The namespace hosts of a cluster's instances: {instance id: netns name}."""
    ids = [n.id for n in api(sim).list_nodes(ex_labels={"cluster": name})]
    return {i: sim.app.model.hooks.hosts[i].netns for i in ids if i in sim.app.model.hooks.hosts}


def assert_nothing_left(sim, name, hosts):
    d = api(sim)
    assert d.list_nodes(ex_labels={"cluster": name}) == []
    assert f"raysweep-{name}" not in {g.name for g in d.ex_list_security_groups()}
    assert f"raysweep-{name}" not in {k.name for k in d.list_key_pairs()}
    assert hosts, "no hosts were recorded for this cluster"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        netns = {
            line.split()[0]
            for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
            if line
        }
        alive = [i for i in hosts if i in sim.app.model.hooks.hosts]
        if not alive and not netns & set(hosts.values()):
            return
        time.sleep(0.3)
    pytest.fail(f"hosts or namespaces left: {alive}, {netns & set(hosts.values())}")


def cli_env(sim, tmp_path, endpoint=None):
    return client_env(endpoint or sim.endpoint, SIM_KEY, SIM_SECRET, tmp_path / "state")


class Events:
    """A progress callback that keeps what it was told."""

    def __init__(self):
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, name, what):
        with self.lock:
            self.lines.append(f"{name}: {what}")

    def text(self):
        return "\n".join(self.lines)


def cfg_for(name, tmp_path, **kw):
    env = {"EXOSCALE_API_KEY": SIM_KEY, "EXOSCALE_API_SECRET": SIM_SECRET}
    c = config.load(env=env, name=name, instance_type="standard.micro", **kw)
    return c.with_state_root(tmp_path / "state")


def make_cluster(driver, name, n):
    """A cluster as raysweep makes it (labels, marked group, key), made directly through the driver."""
    group = driver.ex_create_security_group(resource_name(name), provision.group_description(name))
    driver.import_key_pair_from_string(resource_name(name), PUBKEY)
    return [
        driver.create_node(
            nm,
            "standard.micro",
            UBUNTU,
            ex_security_groups=[group],
            ex_labels={**cluster_labels(name), "role": role},
        )
        for nm, role in provision.node_names(name, n)
    ]


def left_of(driver, name):
    return (
        sorted(nd.name for nd in driver.list_nodes() if nd.extra["labels"].get("cluster") == name),
        [g.name for g in driver.ex_list_security_groups() if g.name == resource_name(name)],
        [k.name for k in driver.list_key_pairs() if k.name == resource_name(name)],
    )


@contextlib.contextmanager
def small_tmpfs(parent, size="16k"):
    """A tmpfs of `size` of our own under `parent` (needs root; skips otherwise), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = parent / f"full-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def wait_for(what, fn, timeout=60, every=0.2):
    """fn()'s first true value, asked every `every` seconds; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


FAST_RETRY = {"attempts": 6, "base_s": 0.01, "cap_s": 0.05}


class Cluster:
    """A bootstrapped Ray cluster config for one cluster name on the sim, and providers made from it."""

    def __init__(self, sim, name: str):
        self.sim, self.name = sim, name
        cfg = config.load(
            None,
            env=client_env(sim.endpoint, SIM_KEY, SIM_SECRET),
            name=name,
            ray_cpus=1,
        )
        raw = ray_config.build(cfg, 0, 3, 0.1)
        raw["provider"]["retry"] = FAST_RETRY
        self.config = ExoscaleNodeProvider.bootstrap_config(raw)
        self.node_config = self.config["available_node_types"][ray_config.WORKER_TYPE]["node_config"]
        self.head_node_config = self.config["available_node_types"][ray_config.HEAD_TYPE]["node_config"]

    def provider(self) -> ExoscaleNodeProvider:
        """A fresh provider, loaded the way Ray loads it (type external, module path)."""
        return _get_node_provider(self.config["provider"], self.name, use_cache=False)

    def head_tags(self) -> dict[str, str]:
        """The head's tags as `ray up` gives them."""
        return {
            TAG_RAY_NODE_KIND: "head",
            TAG_RAY_NODE_NAME: f"ray-{self.name}-head",
            TAG_RAY_NODE_STATUS: "uninitialized",
            TAG_RAY_USER_NODE_TYPE: ray_config.HEAD_TYPE,
            TAG_RAY_LAUNCH_CONFIG: "hash0",
        }

    def tags(self, **extra) -> dict[str, str]:
        return {
            TAG_RAY_NODE_KIND: "worker",
            TAG_RAY_NODE_NAME: f"ray-{self.name}-worker",
            TAG_RAY_NODE_STATUS: "uninitialized",
            TAG_RAY_USER_NODE_TYPE: ray_config.WORKER_TYPE,
            TAG_RAY_LAUNCH_CONFIG: "hash1",
            **extra,
        }


HEAD_IP = "127.0.0.1"  # where a test's requests to the local Exoscale come from


class HeadsAtLoopback(InstanceHooks):
    """Heads get 127.0.0.1 (this process's address towards the local Exoscale); other instances the sim's own."""

    def allocate_ip(self, instance):
        return HEAD_IP if instance.name.endswith("-head") else None


@contextlib.contextmanager
def sdk_exoscale(monkeypatch, op_delay_s: float, poll_s: float, seed: int):
    """A local Exoscale for Exoscale's own SDK: operations stay pending `op_delay_s`, so that the SDK's wait()
    really polls; its poll interval (3 s at least, meant for real clouds) is shortened to `poll_s`, its logic
    is the SDK's own."""
    from tests.exoscale_sdk import sdk  # Exoscale's SDK, loaded only by the modules that use it

    monkeypatch.setattr(sdk(), "_poll_interval", lambda run_time: poll_s)
    with local_exoscale(op_delay_s, seed=seed) as sim:
        yield sim
