"""`make cluster-up MAX_WORKERS=1` and `make cluster-down` on the local Exoscale with hosts: the head through
Ray's own `ray up`, `exoscale.py` commands working on it, and nothing left after `down` (key and role too)."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from tests.conftest import ROOT, ClusterCLI, local_exoscale, run_cli

pytestmark = [pytest.mark.root]


def make(target, env, config, timeout=900, **vars_):
    args = ["make", "-C", str(ROOT), target, f"CONFIG={config}"] + [f"{k}={v}" for k, v in vars_.items()]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def test_make_cluster_up_max_workers_then_down(tmp_path):
    name = f"mk{uuid.uuid4().hex[:6]}"
    toml = tmp_path / "cluster.toml"
    toml.write_text(f'name = "{name}"\nray_cpus = 1\nssh_cidr = "0.0.0.0/0"\n')
    with local_exoscale(0.2, hosts=True, needs=("rsync",), offer_packages=True, seed=5) as local:
        env = ClusterCLI(local.server, tmp_path / "state", name).env
        try:
            r = make("cluster-up", env, toml, MAX_WORKERS=1)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            assert "autoscaling cluster" in r.stderr and f"{name}-head" in r.stdout
            r = run_cli("exoscale.py", "--config", str(toml), "cmd", "hostname", env=env, timeout=120)
            assert r.returncode == 0 and f"{name}-head" in r.stdout, r.stderr
            r = run_cli("exoscale.py", "--config", str(toml), "up", "-n", "2", env=env)
            assert r.returncode == 2 and "autoscaling cluster" in r.stderr
        finally:
            r = make("cluster-down", env, toml, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "autoscaler stopped" in r.stderr and "revoked" in r.stderr
        with local.model.lock:
            assert not local.model.instances and not local.model.security_groups and not local.model.ssh_keys
            assert not local.model.instance_pools
        assert local.model.iam.list_api_keys() == [] and local.model.iam.list_roles() == []
