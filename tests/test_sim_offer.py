"""What the local Exoscale offers its hosts instead of the internet, seen from inside a host over SSH as a
user's tools see it: the API at the same endpoint as from this machine, uv on PATH, and a package index that
resolves the nodes' packages. Needs root (namespace hosts); run under the heavy lock."""

from __future__ import annotations

import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest

from cloud.sim.hosts import missing_requirements
from cloud.sim.offer import PackageIndex, project_name
from tests.conftest import SIM_KEY, SIM_SECRET, local_exoscale
from tests.exoscale_sdk import client
from tests.support import UBUNTU


def test_project_names_are_pep503_normalized():
    assert project_name("Requests_Exoscale_Auth-1.1.2-py3-none-any.whl") == "requests-exoscale-auth"
    assert project_name("ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl") == "ray"
    assert project_name("zope.interface-6.0.tar.gz") == "zope-interface"
    assert project_name(".offered") is None and project_name("uv") is None


def test_package_index_serves_pep503_pages_and_files(tmp_path):
    import requests

    (tmp_path / "Foo_Bar-1.0-py3-none-any.whl").write_bytes(b"wheel")
    (tmp_path / "secret.txt").write_text("not served")
    index = PackageIndex(tmp_path, "127.0.0.1")
    try:
        root = requests.get(index.url, timeout=10)
        assert root.status_code == 200 and 'href="/simple/foo-bar/"' in root.text
        page = requests.get(index.url + "Foo.Bar/", timeout=10)
        assert "Foo_Bar-1.0-py3-none-any.whl#sha256=" in page.text
        href = page.text.split('href="')[1].split("#")[0]
        assert requests.get(index.url.replace("/simple/", "") + href, timeout=10).content == b"wheel"
        head = requests.head(index.url.replace("/simple/", "") + href, timeout=10)  # uv asks HEAD first
        assert head.status_code == 200 and head.headers["Content-Length"] == "5"
        file_url = index.url.replace("/simple/", "") + href
        for asked, status, got in (("bytes=1-2", 206, b"he"), ("bytes=-3", 206, b"eel"), ("bytes=3-", 206, b"el")):
            r = requests.get(file_url, headers={"Range": asked}, timeout=10)  # uv reads a wheel's metadata so
            assert (r.status_code, r.content) == (status, got), asked
        assert requests.get(file_url, headers={"Range": "bytes=9-"}, timeout=10).status_code == 416
        assert requests.get(index.url.replace("/simple/", "/files/secret.txt"), timeout=10).status_code == 404
        assert requests.get(index.url + "nothing/", timeout=10).status_code == 404
    finally:
        index.close()


@pytest.mark.root
@pytest.mark.skipif(bool(missing_requirements()), reason=f"needs {', '.join(missing_requirements())}")
def test_a_host_reaches_the_api_and_installs_from_the_offered_index(tmp_path):
    had_uv = Path("/usr/local/bin/uv").exists()
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with local_exoscale(0.0, hosts=True, record=False, seed=None, offer_packages=True) as sim:
        assert sim.hooks is not None and sim.endpoint.startswith(f"http://{sim.hooks.gateway}:")
        c = client(SIM_KEY, SIM_SECRET, sim.endpoint)  # from this machine, at the gateway URL
        c.wait(c.register_ssh_key(name="k", public_key=(key.with_suffix(".pub")).read_text().strip())["id"])
        sg = c.wait(c.create_security_group(name="ssh")["id"])["reference"]["id"]
        rule = {"flow_direction": "ingress", "protocol": "tcp", "network": "0.0.0.0/0", "start_port": 22}
        c.wait(c.add_rule_to_security_group(id=sg, end_port=22, **rule)["id"])
        itype = next(t["id"] for t in c.list_instance_types()["instance-types"] if t["size"] == "small")
        tmpl = next(t["id"] for t in c.list_templates(visibility="public")["templates"] if t["name"] == UBUNTU)
        op = c.create_instance(
            name="h",
            instance_type={"id": itype},
            template={"id": tmpl},
            disk_size=10,
            ssh_key={"name": "k"},
            security_groups=[{"id": sg}],
        )
        ip = c.get_instance(id=c.wait(op["id"])["reference"]["id"])["public-ip"]
        sim.hooks.wait_ssh(ip, timeout=60)

        def on_host(command: str) -> subprocess.CompletedProcess:
            deadline = time.monotonic() + 30
            while True:
                r = subprocess.run(
                    ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                     "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"ubuntu@{ip}", command],
                    capture_output=True, text=True, timeout=600,
                )  # fmt: skip
                if r.returncode != 255 or time.monotonic() > deadline:  # 255: sshd not ready yet
                    return r
                time.sleep(0.5)

        r = on_host(f"curl -s -o /dev/null -w '%{{http_code}}' {sim.endpoint}/zone; echo; command -v uv")
        assert r.stdout.split() == ["200", "/usr/local/bin/uv"], r.stderr
        assert Path("/usr/local/bin/uv").exists() == had_uv  # laid over in the host only
        ray = f"ray=={metadata.version('ray')}"
        r = on_host(f"uv pip install --dry-run --python python3.11 --target /tmp/t '{ray}' apache-libcloud 2>&1")
        assert r.returncode == 0 and "Would install" in r.stdout, r.stdout[-2000:]
        uv_toml = (sim.hooks.offer_dir / "etc" / "uv" / "uv.toml").read_text()
        cache = Path(next(x for x in uv_toml.splitlines() if x.startswith("cache-dir")).split('"')[1])
        assert cache.is_relative_to(sim.hooks.run_dir) and cache.is_dir(), uv_toml  # this run's, not the machine's
    assert not cache.exists()  # the hosts' unpacked packages (GBs a run) go with the run
