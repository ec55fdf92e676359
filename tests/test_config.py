import pytest

from cloud import config
from cloud.config import ConfigError

ENV = {"EXOSCALE_API_KEY": "EXOk", "EXOSCALE_API_SECRET": "s3cret"}


def test_defaults_from_environment_alone():
    c = config.load(env=ENV)
    assert (c.name, c.zone, c.spec.nodes, c.spec.ssh_cidr, c.ssh_cidr_given) == (
        "default",
        "ch-gva-2",
        3,
        "0.0.0.0/0",
        False,
    )
    assert "s3cret" not in repr(c)
    assert c.driver_kwargs() == {"zone": "ch-gva-2"}


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "cluster.toml"
    f.write_text(
        'name = "exp1"\nzone = "de-fra-1"\nnodes = 4\nssh-cidr = "203.0.113.7/32"\n'
        'labels = { team = "ml" }\nsetup_commands = ["echo hi"]\n'
    )
    c = config.load(f, env=ENV, nodes=2)
    assert (c.name, c.zone, c.spec.nodes, c.spec.ssh_cidr, c.ssh_cidr_given) == (
        "exp1",
        "de-fra-1",
        2,
        "203.0.113.7/32",
        True,
    )
    assert c.spec.labels == {"team": "ml"} and c.install.setup_commands == ("echo hi",)


def test_endpoint_points_at_another_api():
    c = config.load(env={**ENV, "EXOSCALE_API_ENDPOINT": "http://127.0.0.1:8080/v2"})
    assert c.driver_kwargs() == {"zone": "ch-gva-2", "host": "127.0.0.1", "port": 8080, "secure": False}


@pytest.mark.parametrize(
    "toml, match",
    [
        ('zone = "mars-1"', "valid: at-vie-1, at-vie-2"),
        ('name = "Bad Name"', "lower-case"),
        ("nodes = 0", "from 1 to 100"),
        ("nodes = true", "nodes True: a whole number"),
        ("disk_size = true", "a whole number of GiB"),
        ("ray_cpus = true", "a whole number >= 1"),
        ("disk_size = 5", "from 10"),
        ('ssh_cidr = "everyone"', "not a CIDR"),
        ('colour = "blue"', "unknown setting"),
        ('labels = { cluster = "x" }', "reserved"),
        ('ssh_key = "/no/such/key"', "needs the private key"),
        ("nodes = [", "not valid TOML"),
    ],
)
def test_bad_settings_one_line(tmp_path, toml, match):
    f = tmp_path / "c.toml"
    f.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=match) as ei:
        config.load(f, env=ENV)
    assert "\n" not in str(ei.value)


def test_credentials_required_unless_only_ssh():
    with pytest.raises(ConfigError, match="EXOSCALE_API_KEY and EXOSCALE_API_SECRET"):
        config.load(env={})
    assert config.load(env={}, require_credentials=False).credentials.api_secret is None


def test_bad_endpoint():
    with pytest.raises(ConfigError, match="EXOSCALE_API_ENDPOINT"):
        config.load(env={**ENV, "EXOSCALE_API_ENDPOINT": "ftp://x/v9"})


def test_unreachable_api_is_one_line_from_the_cli():
    from tests.conftest import free_port, run_cli

    env = {
        "EXOSCALE_API_KEY": "EXOk",
        "EXOSCALE_API_SECRET": "s3cret",
        "EXOSCALE_API_ENDPOINT": f"http://127.0.0.1:{free_port()}/v2",
        "RAYSWEEP_STATE_DIR": "/nonexistent-state",
    }
    r = run_cli("exoscale.py", "--name", "x", "down", env=env, timeout=120)
    assert r.returncode == 1
    assert (
        r.stderr.strip() == f"exoscale.py: error: GET /instance: ConnectionError: cannot reach the Exoscale API at "
        f"127.0.0.1:{env['EXOSCALE_API_ENDPOINT'].split(':')[2].split('/')[0]}"
    )
    assert "s3cret" not in r.stderr
