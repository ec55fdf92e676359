"""`exoscale.py types` against the local Exoscale, as a user runs it."""

from cloud.sim.local import client_env
from tests.conftest import SIM_KEY, SIM_SECRET, run_cli


def types(sim, tmp_path, *args):
    env = client_env(sim.endpoint, SIM_KEY, SIM_SECRET, tmp_path / "state")
    return run_cli("exoscale.py", "types", *args, env=env, timeout=120)


def test_types_lists_each_type_with_its_price_and_zones(sim, tmp_path):
    r = types(sim, tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    assert "0.04666" in rows["standard.medium"] and "every zone" in rows["standard.medium"]
    assert "de-fra-1" in rows["gpu3.small"] and "ch-gva-2" not in rows["gpu3.small"] and " * " in rows["gpu3.small"]
    assert "Exoscale's price list of" in r.stdout
    assert SIM_SECRET not in r.stdout + r.stderr


def test_types_in_one_zone_leaves_out_what_it_does_not_offer(sim, tmp_path):
    r = types(sim, tmp_path, "--zone", "ch-gva-2")
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert "standard.medium" in names and "gpu3.small" not in names


def test_a_zone_exoscale_does_not_have_is_refused_in_one_line(sim, tmp_path):
    r = types(sim, tmp_path, "--zone", "mars-1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "'mars-1' is not a zone of Exoscale; valid: " in r.stderr
