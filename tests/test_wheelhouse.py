"""The wheelhouse the tests offer the local Exoscale's hosts holds everything a node of any role installs.

The hosts reach no package index but the wheelhouse, so a package missing there fails a cluster's install
only in the test that needs it, and only on a machine where no earlier run (or `make sim`) filled it."""

import subprocess
import sys
from pathlib import Path

import pytest

from cloud.node_install import head_packages, node_packages
from pipeline.requirements import NODE_PACKAGES

UV = Path(sys.executable).parent / "uv"


def resolve_offline(packages: list[str], wheelhouse: Path) -> subprocess.CompletedProcess:
    """Resolve `packages` and their dependencies from the wheelhouse alone, as a host's uv must."""
    return subprocess.run(
        [
            str(UV),
            "pip",
            "compile",
            "--quiet",
            "--no-index",
            "--find-links",
            str(wheelhouse),
            "--python-version",
            f"{sys.version_info[0]}.{sys.version_info[1]}",
            "--no-cache",
            "-",
        ],
        input="\n".join(packages) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("role", ["worker", "head"])
def test_wheelhouse_holds_what_every_node_installs(node_wheelhouse, role):
    extra = list(NODE_PACKAGES) + (head_packages() if role == "head" else [])
    r = resolve_offline(node_packages(extra), node_wheelhouse)
    assert r.returncode == 0, f"a {role}'s packages cannot be installed from {node_wheelhouse}:\n{r.stderr[-1500:]}"


def test_the_tests_and_the_local_exoscale_offer_one_wheelhouse(node_wheelhouse, monkeypatch, tmp_path):
    """One directory, one package set, one stamp: what the fixture made is what the sim's offer finds complete."""
    from cloud.sim.offer import STAMP, offered_packages
    from cloud.sim.paths import wheelhouse_dir

    assert node_wheelhouse == wheelhouse_dir()
    assert (node_wheelhouse / STAMP).read_text().split("\n") == sorted(offered_packages())
    monkeypatch.setenv("RAYSWEEP_WHEELHOUSE", str(tmp_path / "elsewhere"))
    assert wheelhouse_dir() == tmp_path / "elsewhere"


def test_a_wheelhouse_for_another_set_is_completed(tmp_path):
    from cloud.sim.offer import STAMP, fill_wheelhouse

    house = tmp_path / "wheels"
    fill_wheelhouse(["six==1.16.0"], house, timeout=300)
    assert [p.name for p in house.glob("six-*.whl")] == ["six-1.16.0-py2.py3-none-any.whl"]
    fill_wheelhouse(["six==1.16.0", "idna==3.10"], house, timeout=300)
    assert (house / "idna-3.10-py3-none-any.whl").exists()
    assert (house / STAMP).read_text() == "idna==3.10\nsix==1.16.0"


def test_a_failed_download_names_the_package(tmp_path):
    from cloud.sim.offer import STAMP, fill_wheelhouse

    missing = "raysweep-no-such-package-0e9c==1.0"
    with pytest.raises(RuntimeError) as e:
        fill_wheelhouse(["six==1.16.0", missing], tmp_path, timeout=300)
    assert f"no {missing} on the package index" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / STAMP).exists()
