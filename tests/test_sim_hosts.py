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
