"""What the toolkit sends to nodes and keeps locally, checked without nodes: a state without a head, the
install script's quoting and packages, the Ray token's one owner."""

import shlex
import stat
import subprocess

import pytest

from cloud import config as config_mod
from cloud.state import ClusterState, NodeRecord, NoHeadError, StateStore
from tests.conftest import run_cli

WORKERS_ONLY = [NodeRecord("w-1", "worker", "192.0.2.11"), NodeRecord("w-2", "worker", "192.0.2.12")]


def test_require_head_names_the_cluster_and_its_nodes():
    st = ClusterState("tf", list(WORKERS_ONLY))
    with pytest.raises(NoHeadError, match=r"cluster 'tf' has no head node.*w-1, w-2"):
        st.require_head()
    head = NodeRecord("h", "head", "192.0.2.10")
    assert ClusterState("tf", [*WORKERS_ONLY, head]).require_head() is head


@pytest.mark.parametrize("command", [["fetch", "results"], ["dashboard"], ["status"], ["start"]])
def test_commands_on_a_state_without_head_say_so_in_one_line(tmp_path, command):
    StateStore(tmp_path / "tf").save(ClusterState("tf", list(WORKERS_ONLY)))
    env = {"RAYSWEEP_STATE_DIR": str(tmp_path), "EXOSCALE_API_KEY": "", "EXOSCALE_API_SECRET": ""}
    r = run_cli("exoscale.py", "--name", "tf", *command, timeout=60, env=env)
    assert "Traceback" not in r.stderr and "AttributeError" not in r.stderr, r.stderr
    assert "cluster 'tf' has no head node" in r.stdout + r.stderr


def _cfg(tmp_path, text):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return config_mod.load(path, env={}, require_credentials=False)


def test_install_options_are_split_as_a_shell_would_and_each_word_quoted(tmp_path):
    from cloud import node_install

    cfg = _cfg(tmp_path, "install_options = \"--index-url 'http://mirror/a b' --no-cache;touch INJECTED\"\n")
    words = node_install.install_options(cfg)
    assert words == ["--index-url", "http://mirror/a b", "--no-cache;touch", "INJECTED"]
    # the words reach a shell as exactly these words (printf prints each on its own line)
    out = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + " ".join(shlex.quote(w) for w in words)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == words and not (tmp_path / "INJECTED").exists()


def test_unbalanced_install_options_are_refused_in_one_line(tmp_path):
    from cloud import node_install

    cfg = _cfg(tmp_path, 'install_options = "--index-url \'http://mirror"\n')
    with pytest.raises(config_mod.ConfigError, match="install_options"):
        node_install.install_options(cfg)


def test_packages_come_from_the_configuration_pinned_to_this_machine(tmp_path):
    import numpy

    from cloud import node_install

    cfg = _cfg(tmp_path, 'packages = ["numpy", "requests>=2"]\n')
    pkgs = node_install.node_packages(cfg.install.packages)
    assert pkgs[0].startswith("ray[default]==")
    assert pkgs[1:] == [f"numpy=={numpy.__version__}", "requests>=2"]
    script = node_install.install_script(cfg, pkgs)
    assert "tensorflow" not in script and "mlxtend" not in script
    assert script.startswith("set -euo pipefail\n")


def test_packages_setting_is_checked(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="packages"):
        _cfg(tmp_path, 'packages = "numpy"\n')


def test_the_ray_token_has_one_owner(tmp_path):
    store = StateStore(tmp_path / "c")
    assert store.ray_token() is None
    token = store.ensure_ray_token()
    assert len(token) == 64 and store.ray_token() == token == store.ensure_ray_token()
    assert stat.S_IMODE(store.ray_token_path.stat().st_mode) == 0o600


def test_environment_exports_keep_each_value_one_verbatim_word(tmp_path):
    from cloud.remote import env_exports

    env = {"FOO": "x;touch INJECTED", "SPACED": "one two  three", "QUOTE": "it's $HOME"}
    r = subprocess.run(
        ["bash", "-c", env_exports(env) + 'printf "%s|%s|%s" "$FOO" "$SPACED" "$QUOTE"'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.stdout == "x;touch INJECTED|one two  three|it's $HOME" and not (tmp_path / "INJECTED").exists()
    with pytest.raises(ValueError, match="'1BAD'"):
        env_exports({"1BAD": "x"})


def test_toolkit_scripts_stop_at_the_first_failure():
    from cloud.remote import script

    r = subprocess.run(["bash", "-c", script("false | true\necho reached")], capture_output=True, text=True)
    assert r.returncode == 1 and "reached" not in r.stdout
    r = subprocess.run(["bash", "-c", script("echo $UNSET_RAYSWEEP_VAR")], capture_output=True, text=True)
    assert r.returncode == 1 and "unbound" in r.stderr
