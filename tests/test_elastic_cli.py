"""exoscale.py's side of autoscaling clusters against the local Exoscale (no hosts): `ray-config` writes only
a complete YAML to stdout, wrong combinations are refused in one line, and `down` removes everything while
an autoscaler keeps creating workers with the cluster's restricted key."""

from __future__ import annotations

import copy
import subprocess
import threading
import time

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cloud import iam
from tests.conftest import ROOT, SIM_KEY, SIM_SECRET, run_cli
from tests.support import Cluster, HeadsAtLoopback, cli_env

SECTIONS = (
    "cluster_name max_workers upscaling_speed idle_timeout_minutes provider auth available_node_types head_node_type "
    "file_mounts cluster_synced_files file_mounts_sync_continuously rsync_exclude rsync_filter initialization_commands "
    "setup_commands head_setup_commands worker_setup_commands head_start_ray_commands worker_start_ray_commands"
).split()


def test_ray_config_writes_only_a_complete_yaml(sim, tmp_path):
    e = cli_env(sim, tmp_path, endpoint="http://10.0.0.1:8080/v2")
    r = run_cli("exoscale.py", "--name", "rc1", "ray-config", "--max-workers", "3", "--idle-minutes", "0.5", env=e)
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(r.stdout)
    assert [k for k in SECTIONS if k not in config] == []
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own schema, as `ray up` checks it
    assert config["provider"]["endpoint"] == "http://10.0.0.1:8080/v2"
    assert config["provider"]["module"] == "cloud.ray_provider.ExoscaleNodeProvider"
    assert config["idle_timeout_minutes"] == 0.5 and config["max_workers"] == 3
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert any(k.startswith("~/raysweep/cloud") for k in config["file_mounts"])
    assert SIM_SECRET not in r.stdout + r.stderr and "ray up" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--worker-type", "gpu"], "NAME=INSTANCE_TYPE"),
        (["--worker-type", "gpu=gpua5000.small,max=x"], "KEY=WHOLE_NUMBER"),
        (["--min-workers", "3", "--max-workers", "2"], "min <= max"),
        (["--idle-minutes", "0"], "positive number"),
    ],
)
def test_ray_config_refuses_bad_options_in_one_line(sim, tmp_path, args, message):
    r = run_cli("exoscale.py", "--name", "rc2", "ray-config", *args, env=cli_env(sim, tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_nodes_and_max_workers_exclude_each_other(sim, tmp_path):
    r = subprocess.run(
        ["make", "-C", str(ROOT), "cluster-up", "NODES=3", "MAX_WORKERS=2"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "NODES and MAX_WORKERS exclude each other" in r.stderr
    r = run_cli("exoscale.py", "up", "-n", "2", "--max-workers", "2", env=cli_env(sim, tmp_path))
    assert r.returncode == 2 and "exclude each other" in r.stderr


def test_up_max_workers_refuses_an_api_the_head_cannot_reach(sim, tmp_path):
    r = run_cli("exoscale.py", "--name", "rc3", "up", "--max-workers", "2", env=cli_env(sim, tmp_path))
    assert r.returncode == 2 and "loopback" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture
def autoscaling(sim, sim_env, tmp_path):
    """An autoscaling cluster as `ray up` leaves it (head key made, head labelled by Ray's tags), and the
    head's provider on its restricted key."""
    from cloud.ray_provider import ExoscaleNodeProvider

    sim.app.model.hooks = HeadsAtLoopback()  # the head's key works from the head's address: this process's
    c = Cluster(sim, "asc")
    laptop = c.provider()
    laptop.create_node(c.head_node_config, c.head_tags(), 1)
    laptop.prepare_for_head_node(copy.deepcopy(c.config))
    head_cfg = dict(c.config["provider"], credentials_file=str(iam.key_copy_path(laptop._store.dir)))
    return c, ExoscaleNodeProvider(head_cfg, c.name)


def test_up_n_on_an_autoscaling_cluster_is_refused(sim, tmp_path, autoscaling):
    r = run_cli("exoscale.py", "--name", "asc", "up", "-n", "3", env=cli_env(sim, tmp_path))
    assert r.returncode == 2 and "autoscaling cluster" in r.stderr, r.stderr


@pytest.mark.timeout(180)
def test_down_removes_everything_while_the_autoscaler_keeps_creating(sim, tmp_path, autoscaling):
    c, head = autoscaling
    outcome: list[str] = []

    def autoscaler():  # adds a worker and removes it, again and again, until its key stops working
        while True:
            try:
                head.terminate_nodes(list(head.create_node(c.node_config, c.tags(), 1)))
            except Exception as e:
                outcome.append(type(e).__name__ + ": " + str(e))
                return
            time.sleep(0.05)

    key_copy = iam.key_copy_path(tmp_path / "state" / "asc")
    assert key_copy.exists()
    t = threading.Thread(target=autoscaler, daemon=True)
    t.start()
    time.sleep(1)
    r = run_cli("exoscale.py", "--name", "asc", "down", "--yes", env=cli_env(sim, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    t.join(60)
    assert outcome and ("forbidden" in outcome[0].lower() or "403" in outcome[0]), outcome
    with sim.app.model.lock:
        assert list(sim.app.model.instances.values()) == [] and list(sim.app.model.instance_pools) == []
        assert list(sim.app.model.security_groups.values()) == [] and list(sim.app.model.ssh_keys) == []
    assert sim.app.model.iam.list_api_keys() == [] and sim.app.model.iam.list_roles() == []
    assert "revoked" in r.stderr and "IAM role" in r.stderr
    assert not key_copy.exists()
    assert iam.find_keys(c.provider().driver, "asc") == []


def test_down_does_not_try_ssh_on_a_head_that_is_gone(tmp_path, monkeypatch):
    """An autoscaling cluster that autostopped (or whose head is unreachable): stopping its autoscaler skips
    the SSH attempt (and its timeout) once the head does not greet; the key's revocation stops it anyway."""
    from cloud import config, elastic
    from cloud.state import ClusterState, NodeRecord, StateStore

    monkeypatch.setenv("RAYSWEEP_STATE_DIR", str(tmp_path))
    cfg = config.load(env={"EXOSCALE_API_KEY": SIM_KEY, "EXOSCALE_API_SECRET": SIM_SECRET}, name="gone")
    StateStore(cfg.state_dir).save(ClusterState("gone", [NodeRecord("gone-head", "head", "127.0.0.1")]))  # no sshd
    said: list[tuple[str, str]] = []
    elastic.stop_autoscaler(cfg, lambda who, what: said.append((who, what)))
    assert said == [("gone-head", said[0][1])] and "does not answer on SSH" in said[0][1], said


def test_an_autoscaling_cluster_refuses_the_users_own_ssh_key(sim, tmp_path):
    """The head of an autoscaling cluster holds the private key its autoscaler reaches new workers with (Ray
    copies it there), and a node never gets the user's own key: ssh_key in cluster.toml is refused."""
    own = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(own)], check=True)
    toml = tmp_path / "cluster.toml"
    toml.write_text(f'name = "rc3"\nssh_key = "{own}"\n')
    r = run_cli("exoscale.py", "--config", str(toml), "ray-config", "--max-workers", "2", env=cli_env(sim, tmp_path))
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert "ssh_key" in r.stderr and "own key" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
