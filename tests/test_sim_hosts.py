import json
import subprocess

import pytest

from cloud.sim import hosts
from cloud.sim.hosts import RUN_ROOT, HostHooks, clean_stale_runs, missing_requirements

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(bool(missing_requirements()), reason=f"needs {', '.join(missing_requirements())}"),
]


def test_stale_run_of_a_dead_process_is_cleaned():
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_id = "dead"
    run_dir = RUN_ROOT / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "owner_pid": dead.pid, "subnet": "x"}))
    ns = f"{hosts.PREFIX}-{run_id}-0"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", f"{hosts.PREFIX}br{run_id}", "type", "bridge"], check=True)
    try:
        assert clean_stale_runs() >= 1
        assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert subprocess.run(["ip", "link", "show", f"{hosts.PREFIX}br{run_id}"], capture_output=True).returncode != 0
        assert not run_dir.exists()
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", f"{hosts.PREFIX}br{run_id}"], capture_output=True)


def test_a_live_run_is_left_alone_and_close_removes_it():
    h = HostHooks.create()
    try:
        assert clean_stale_runs() == 0 and (RUN_ROOT / h.run_id).exists()
    finally:
        h.close()
    assert not (RUN_ROOT / h.run_id).exists()
    assert subprocess.run(["ip", "link", "show", h.bridge], capture_output=True).returncode != 0


def test_a_chosen_subnet_is_used_and_an_overlapping_one_refused():
    first = HostHooks.create()
    try:
        again = str(first.subnet)
        with pytest.raises(RuntimeError, match="overlaps a route"):
            HostHooks.create(again)
    finally:
        first.close()
    chosen = HostHooks.create(again)  # free again once the first run is gone
    try:
        assert str(chosen.subnet) == again and chosen.gateway == str(next(chosen.subnet.hosts()))
    finally:
        chosen.close()


def test_a_host_sees_the_os_and_the_package_offer_but_nothing_of_the_machines_users(sim_hosts):
    """The machine's /root (where clusters keep their keys by default), its other homes and the checkout are
    out of a host's sight, even as root on the host; what the host writes in its /root stays there; the
    package offer is there to read, not to write."""
    import shutil
    import uuid
    from pathlib import Path

    from cloud.sim.paths import wheelhouse_dir
    from tests.conftest import ROOT, ClusterCLI

    WHEELHOUSE = wheelhouse_dir()
    mark = uuid.uuid4().hex[:12]
    state = Path(f"/root/.raysweep-hosts-test-{mark}")  # a cluster's state dir where users keep theirs
    state.mkdir(mode=0o700)
    secret = Path(f"/root/raysweep-hosts-test-{mark}.txt")
    secret.write_text(f"machine secret {mark}\n")
    from_host = Path(f"/root/raysweep-from-host-{mark}.txt")
    cli = ClusterCLI(sim_hosts, state)
    try:
        cli("up", "-n", "1", check=0)
        key = state / cli.name / "id_ed25519"
        assert key.exists(), f"the cluster's key is not where this test expected it: {sorted(state.rglob('*'))}"

        def on_host(command):
            return cli("cmd", "--sudo", command, timeout=120)

        seen = " ".join(str(p) for p in (secret, key, state, ROOT / "exoscale.py"))
        r = on_host(f'for p in {seen}; do test -e "$p" && echo "SEEN $p"; done; cat {secret} {key} 2>&1; echo DONE')
        assert "DONE" in r.stdout, f"the command did not run on the host: {r.stdout}\n{r.stderr}"
        assert "SEEN" not in r.stdout, f"the host sees the machine's files:\n{r.stdout}"
        assert "machine secret" not in r.stdout and "PRIVATE KEY" not in r.stdout, f"the host read them:\n{r.stdout}"
        r = on_host(f"echo from-host > {from_host} && cat {from_host}")
        assert "from-host" in r.stdout, f"the host could not write its own /root: {r.stdout}\n{r.stderr}"
        assert not from_host.exists(), "a file the host wrote in its /root appeared in the machine's /root"
        if WHEELHOUSE.is_dir():
            probe = WHEELHOUSE / f".probe-{mark}"
            r = on_host(f"ls {WHEELHOUSE} | head -3; touch {probe} 2>&1 || echo READ-ONLY")
            assert "READ-ONLY" in r.stdout and not probe.exists(), f"the package offer is writable:\n{r.stdout}"
            assert any(p.name in r.stdout for p in WHEELHOUSE.iterdir()), f"the offer is not visible:\n{r.stdout}"
    finally:
        cli("down", "--yes", timeout=300)
        for p in (secret, from_host, WHEELHOUSE / f".probe-{mark}"):
            p.unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)
