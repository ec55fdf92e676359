from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cloud.sim.local import LocalExoscale

ROOT = Path(__file__).resolve().parent.parent


#: Fixtures that put a test out of `make test-fast`'s tier: namespace hosts need root; the wheelhouse is ~0.5 GB
#: of downloads on a new machine. A test using one gets the marker even where its module forgot it.
TIER_MARKERS = {"sim_hosts": "root", "node_wheelhouse": "slow"}


#: The modules that take longest, longest first (measured with --durations=0): `make test` hands whole modules to
#: its workers in collection order, so these start first and the workers end at about the same time.
LONGEST_FIRST = (
    "test_ray_cluster_e2e",
    "test_autostop_e2e",
    "test_elastic_e2e",
    "test_sweep_cli",
    "test_mnist_cli",
    "test_adaptive",
    "test_provision",
    "test_daemons",
    "test_cluster_e2e",
    "test_node_commands",
    "test_elastic_make_e2e",
    "test_clusters",
    "test_autostop",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in set(getattr(item, "fixturenames", ())) & TIER_MARKERS.keys():
            item.add_marker(TIER_MARKERS[fixture])
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module's own order is kept


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the session, with its own node cache directory (workers inherit the env)."""
    import ray

    cache = tmp_path_factory.mktemp("node-cache")
    os.environ["PIPELINE_CACHE_DIR"] = str(cache)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", namespace=f"test-{uuid.uuid4().hex[:8]}")
    yield cache
    from pipeline import tasks

    tasks.stop_local_ray()  # and remove the task directories its workers leave (Ray kills them)


def free_port() -> int:
    """A loopback TCP port nobody listens on (right now)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_cli(*args, cwd=None, timeout=600, env=None):
    """Run `python -m ...` as a user would; return CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


SIM_KEY = "EXOtest0123456789abcdef01"
SIM_SECRET = "sim-secret-" + uuid.uuid4().hex  # unique per run: a leak is found by searching for it


@contextlib.contextmanager
def local_exoscale(
    op_delay_s: float = 0.05,
    *,
    hosts: bool = False,
    record: bool = True,
    seed: int | None = 1,
    needs: tuple[str, ...] = (),
    **options,
) -> Iterator[LocalExoscale]:
    """The one way the tests start a local Exoscale (cloud.sim.local.start), with the suite's key pair and
    operations taking `op_delay_s`. `hosts`: its instances boot as namespace hosts (root), the test skipped
    where this machine lacks what they (and the programs in `needs`) require, the hosts' shared uv cache made
    first. Other options go to start(): offer_packages, quotas, http_faults, ..."""
    from cloud.sim.local import start
    from cloud.sim.model import Faults

    if hosts:
        from cloud.sim.hosts import missing_requirements

        missing = missing_requirements() + [p for p in needs if not shutil.which(p)]
        if missing:
            pytest.skip(f"local VM hosts need {', '.join(missing)}")
        hosts_uv_cache()  # made before any host boots: a host sees only what was there then (hosts.machine_paths)
    with start(
        SIM_KEY, SIM_SECRET, faults=Faults(op_delay_s=op_delay_s), hosts=hosts, record=record, seed=seed, **options
    ) as local:
        yield local


@pytest.fixture
def sim():
    """A fresh local Exoscale API recording every exchange."""
    with local_exoscale(0.05, seed=1) as local:
        yield local.server


@pytest.fixture
def sim_env(monkeypatch, tmp_path):
    """The local Exoscale's key pair, and a state directory of the test's own, in this process's environment."""
    monkeypatch.setenv("EXOSCALE_API_KEY", SIM_KEY)
    monkeypatch.setenv("EXOSCALE_API_SECRET", SIM_SECRET)
    monkeypatch.setenv("RAYSWEEP_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def driver(sim):
    from cloud.exoscale_driver import ExoscaleV2NodeDriver, RetryPolicy

    return ExoscaleV2NodeDriver(
        SIM_KEY,
        SIM_SECRET,
        host=sim.host,
        port=sim.port,
        secure=False,
        retry=RetryPolicy(attempts=6, base_s=0.01, cap_s=0.05),
    )


@pytest.fixture(scope="module")
def sim_hosts():
    """A local Exoscale whose instances boot as namespace hosts (needs root), one per test module. Starting it
    also cleans stale hosts of crashed runs; its endpoint is the hosts' gateway, reachable from both sides."""
    with local_exoscale(0.2, hosts=True, seed=7) as local:
        yield local.server


class ClusterCLI:
    """Runs `python exoscale.py --name NAME ...` as a user would, against the sim."""

    def __init__(self, sim, state_dir, name=None):
        from cloud.sim.local import client_env

        self.sim, self.state_dir = sim, state_dir
        self.name = name or f"t{uuid.uuid4().hex[:8]}"
        self.env = client_env(sim.endpoint, SIM_KEY, SIM_SECRET, state_dir)

    def __call__(self, *args, timeout=300, check=None):
        r = run_cli("exoscale.py", "--name", self.name, *args, timeout=timeout, env=self.env)
        if check is not None:
            assert r.returncode == check, f"exoscale.py {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r


@pytest.fixture(scope="session")
def node_wheelhouse():
    """What the sim offers its hosts instead of the internet: every package a node may install, as local wheels
    (downloaded once per machine from the package index; hosts have no route out). The same directory, package
    set and stamp as the local Exoscale's own offer (cloud.sim.offer), so neither can leave a partial one that
    the other trusts."""
    from cloud.sim.offer import fill_wheelhouse

    try:
        return fill_wheelhouse()
    except RuntimeError as e:
        pytest.skip(str(e))


def uv_for_hosts(directory=None) -> Path:
    """This venv's uv, copied where the sim's hosts can run it: of this machine's files they see only the OS and
    the few paths of cloud.sim.hosts.machine_paths (the wheelhouse among them), not a checkout or its venv."""
    from cloud.sim.paths import wheelhouse_dir

    directory = Path(directory) if directory is not None else wheelhouse_dir()
    directory.mkdir(parents=True, exist_ok=True)
    uv = directory / "uv"
    src = Path(sys.executable).parent / "uv"
    if not uv.exists() or uv.stat().st_size != src.stat().st_size:
        tmp = uv.with_suffix(f".tmp{os.getpid()}")
        shutil.copy2(src, tmp)
        os.replace(tmp, uv)
    return uv


HOSTS_UV_CACHE = Path(f"/var/tmp/raysweep-test-uv-{os.getpid()}")


def hosts_uv_cache() -> Path:
    """uv's cache for the sim hosts' installs in this test session: shared by its hosts (the nodes' packages
    are unpacked once, not once per host), where they see it (cloud.sim.hosts.machine_paths), and removed when the session
    ends (pytest_sessionfinish), or by the next session if this one was killed. Kept for good, it would grow
    by GBs a run."""
    if not HOSTS_UV_CACHE.exists():
        HOSTS_UV_CACHE.mkdir(parents=True, exist_ok=True)
        os.chmod(HOSTS_UV_CACHE, 0o1777)  # the hosts' login users share it
    return HOSTS_UV_CACHE


def pytest_sessionstart(session):
    for stale in HOSTS_UV_CACHE.parent.glob("raysweep-test-uv-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(HOSTS_UV_CACHE, ignore_errors=True)


def sim_cluster_toml(path, name, wheelhouse, **extra):
    """cluster.toml for a sim cluster whose nodes install from the offered wheelhouse and uv (copied beside
    the wheels: the hosts see only the OS and cloud.sim.hosts.machine_paths of this machine's files)."""
    from cloud.sim.local import cluster_toml

    uv = uv_for_hosts(wheelhouse)
    return cluster_toml(
        path,
        name,
        f'uv_path = "{uv}"',
        f'install_options = "--no-index --find-links {wheelhouse}"',
        f'install_env = {{ UV_CACHE_DIR = "{hosts_uv_cache()}", UV_LINK_MODE = "copy" }}',
        **extra,
    )
